"""docs/privacy.md's threat-model table covers every mode and says what the code does:
every rank learns every n_k (the round's flag allgather), the modes the config refuses
are refused, and every epsilon names its neighbouring relation."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmpi.config import ConfigError, load_config
from fedmpi.fl.privacy import ADJACENCY

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests/configs/tiny.yaml"
MODES = {
    "plain": {},
    "secure": {"fed.secure": True},
    "central DP (plain aggregation)": {"privacy.dp": True, "privacy.mode": "central"},
    "distributed DP (requires secure)": {
        "privacy.dp": True,
        "privacy.mode": "distributed",
        "fed.secure": True,
    },
    "secure + central DP": {"privacy.dp": True, "privacy.mode": "central", "fed.secure": True},
    "several clients per rank": {"fed.clients": 8},
    "central DP with client sampling": {
        "privacy.dp": True,
        "fed.participation": 0.1,
        "fed.sampling": "poisson",
    },
    "compressed uploads": {"fed.compress": "bf16"},
    "int8 with secure aggregation": {"fed.compress": "int8", "fed.secure": True},
}


def threat_table() -> dict[str, dict[str, str]]:
    lines = (ROOT / "docs/privacy.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| mode | who can see"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def test_every_mode_has_a_row():
    assert set(threat_table()) == set(MODES)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_row_matches_the_code(mode):
    row = threat_table()[mode]
    refused_always = row["refused"].startswith("always")
    if refused_always:
        with pytest.raises(ConfigError):
            load_config(TINY, MODES[mode])
        return
    cfg = load_config(TINY, MODES[mode])
    assert row["n_k of every client"] == "every rank"  # the flag allgather
    if cfg.privacy.dp:
        assert row["adjacency"] == ADJACENCY and row["epsilon reported"].startswith("epsilon")
    else:
        assert row["epsilon reported"] == "none"


def test_distributed_dp_without_secure_is_refused_as_the_table_says():
    assert "without `fed.secure`" in threat_table()["distributed DP (requires secure)"]["refused"]
    with pytest.raises(ConfigError, match="fed.secure"):
        load_config(TINY, {"privacy.dp": True, "privacy.mode": "distributed"})


def test_dp_with_sampling_refuses_what_the_table_says():
    refused = threat_table()["central DP with client sampling"]["refused"]
    assert "fixed-size sampling" in refused and "USPLIT" in refused
    base = MODES["central DP with client sampling"]
    for change in ({"fed.sampling": "fixed"}, {"fed.method": "usplit"}):
        with pytest.raises(ConfigError):
            load_config(TINY, {**base, **change})


def test_compression_refuses_what_the_table_says():
    refused = threat_table()["compressed uploads"]["refused"]
    assert "privacy.dp" in refused and "with `fed.secure`" in refused
    for scheme in ("bf16", "topk"):
        with pytest.raises(ConfigError, match="fed.secure"):
            load_config(TINY, {"fed.compress": scheme, "fed.secure": True})
    for scheme in ("bf16", "int8", "topk"):
        with pytest.raises(ConfigError, match="privacy.dp"):
            load_config(TINY, {"fed.compress": scheme, "privacy.dp": True})
    assert "more than 127 client ranks" in threat_table()["int8 with secure aggregation"]["refused"]
