"""The virtual-client keys of the config (fed.clients, fed.participation, fed.sampling,
fed.server_opt, eval.clients) and their checks with privacy.dp: a bad combination is
refused at load time with one line that names the problem and the fix."""

from __future__ import annotations

import pytest
import yaml

from fedmpi.config import ConfigError, load_config

DP = {"privacy.dp": True}


def refused(overrides: dict) -> str:
    """The loader's message for these overrides (one line)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_dp_with_fixed_size_sampling_is_refused():
    text = refused({**DP, "fed.participation": 0.3, "fed.sampling": "fixed"})
    assert "'privacy.dp'" in text and "'fed.participation' 0.3" in text
    assert "--fed.sampling=poisson" in text
    # fixed is the default sampling: the same without saying it
    assert "--fed.sampling=poisson" in refused({**DP, "fed.participation": 0.3})


def test_dp_with_sampling_and_usplit_is_refused():
    text = refused(
        {**DP, "fed.participation": 0.5, "fed.sampling": "poisson", "fed.method": "usplit"}
    )
    assert "'privacy.dp'" in text and "usplit" in text
    assert "--fed.method=full" in text and "--fed.participation=1" in text
    # usplit with DP is fine while every client takes part, and sampling is fine elsewhere
    load_config(None, {**DP, "fed.method": "usplit"})
    load_config(None, {"fed.participation": 0.5, "fed.sampling": "poisson", "fed.method": "usplit"})


def test_distributed_dp_with_sampling_is_refused():
    secure = {**DP, "fed.secure": True, "privacy.mode": "distributed"}
    text = refused({**secure, "fed.participation": 0.5, "fed.sampling": "poisson"})
    assert "distributed" in text and "--privacy.mode=central" in text
    load_config(None, secure)  # every client in every round: fine
    load_config(None, {**DP, "fed.participation": 0.5, "fed.sampling": "poisson"})  # central


def test_secure_needs_enough_client_ranks():
    from fedmpi.fl.aggregate import check_secure_plans
    from fedmpi.fl.population import Population

    cfg = load_config(None, {"fed.secure": True})
    with pytest.raises(ConfigError, match="mpirun -n 3"):  # one rank: nothing to hide in
        check_secure_plans(cfg, Population.place([5] * 8, 1, participation=0.5))
    check_secure_plans(cfg, Population.place([5] * 8, 2, participation=0.5))
    opt_out = load_config(None, {"fed.secure": True, "fed.secure_min_reporters": 1})
    check_secure_plans(opt_out, Population.place([5] * 8, 1, participation=0.5))


@pytest.mark.parametrize(
    "key, value, fix",
    [
        ("fed.participation", 0.0, "(0, 1]"),
        ("fed.participation", 1.5, "(0, 1]"),
        ("fed.participation", -0.1, "(0, 1]"),
        ("fed.sampling", "uniform", "fixed, poisson"),
        ("fed.server_opt", "sgd", "none, fedavgm, fedadam, fedyogi"),
        ("fed.clients", 0, "[1, 1000000]"),
        ("fed.clients", -3, "[1, 1000000]"),
        ("eval.clients", 0, "> 0"),
    ],
)
def test_bad_values_are_refused_naming_key_and_allowed_values(key, value, fix):
    text = refused({key: value})
    assert f"'{key}'" in text and fix in text, text


def test_bad_values_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "clients.yaml"
    path.write_text(yaml.safe_dump({"fed": {"clients": 0}, "privacy": {"dp": True}}))
    with pytest.raises(ConfigError, match=r"clients\.yaml.*'fed\.clients'"):
        load_config(path)


@pytest.mark.parametrize("method", ["full", "udec", "ulatdec"])
def test_dp_with_poisson_sampling_loads(method):
    cfg = load_config(
        None, {**DP, "fed.participation": 0.1, "fed.sampling": "poisson", "fed.method": method}
    )
    assert cfg.privacy.dp and cfg.fed.participation == 0.1 and cfg.fed.sampling == "poisson"
    assert cfg.fed.method == method


def test_dp_with_full_participation_loads_with_either_sampling():
    for sampling in ("fixed", "poisson"):
        cfg = load_config(None, {**DP, "fed.participation": 1.0, "fed.sampling": sampling})
        assert cfg.fed.participation == 1.0


def test_defaults_and_good_values():
    f = load_config(None).fed
    assert f.clients is None and f.participation == 1.0 and f.sampling == "fixed"
    assert f.server_opt == "none" and f.prox_mu == 0.0 and f.client_state_mb > 0
    assert load_config(None).eval.clients is None
    cfg = load_config(
        None,
        [
            "--fed.clients=100",
            "--fed.participation=0.05",
            "--fed.sampling=fixed",
            "--fed.server_opt=fedyogi",
            "--fed.client_state_mb=0",
            "--eval.clients=10",
        ],
    )
    assert cfg.fed.clients == 100 and cfg.fed.participation == 0.05
    assert cfg.fed.server_opt == "fedyogi" and cfg.fed.client_state_mb == 0.0
    assert cfg.eval.clients == 10
    assert load_config(None).replace({"fed.participation": 0.5}).fed.participation == 0.5
    with pytest.raises(ConfigError, match="fed.sampling=poisson"):
        load_config(None, DP).replace({"fed.participation": 0.5})
