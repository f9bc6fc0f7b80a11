"""Config loading (fedmpi.config): shipped files, overrides, and errors that name the key
and the file before anything heavy starts."""

import math
import os
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from fedmpi.config import CHOICES, RANGES, Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (
    sorted((ROOT / "configs").glob("*.yaml"))
    + sorted((ROOT / "configs/paper").glob("*.yaml"))
    + sorted((ROOT / "configs/reproduce").glob("*.yaml"))
)
PAPER = sorted((ROOT / "configs/paper").glob("fmnist_*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in PAPER}
    assert {f"fmnist_{m}.yaml" for m in ("full", "usplit", "udec", "ulatdec")} <= names
    assert (ROOT / "configs/quickstart.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # every key written in the file is reflected in the loaded config
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(value, list):
                assert got == tuple(value), f"{section}.{key}"
            else:
                assert got == value, f"{section}.{key}"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_settings(path):
    cfg = load_config(path)
    method = path.stem.split("_", 1)[1]
    assert cfg.fed.method == method
    assert cfg.fed.rounds == 15
    assert cfg.fed.local_epochs == 5
    assert cfg.fed.local_steps is None
    assert cfg.train.batch_size == 128
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.diffusion.timesteps == 1000
    assert cfg.diffusion.schedule == "linear"
    assert cfg.diffusion.beta_start == pytest.approx(1e-4)
    assert cfg.diffusion.beta_end == pytest.approx(0.02)
    assert cfg.model.dim == 28 and cfg.model.dim_mults == (1, 2, 4)
    assert cfg.data.dataset == "fashion_mnist"
    # the quickstart recipe stays out of the paper's settings
    assert cfg.train.ema_decay == 0 and cfg.train.warmup_steps == 0 and cfg.train.grad_clip == 0
    assert cfg.train.lr_schedule == "constant" and cfg.diffusion.weighting == "none"


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()


def test_overrides_apply_with_types():
    cfg = load_config(
        ROOT / "configs/paper/fmnist_full.yaml",
        [
            "--train.lr=2e-4",
            "--fed.method",
            "udec",
            "--model.dim_mults=[1,2]",
            "--fed.rounds=3",
            "--fed.freeze_unshared=true",
            "--split.num_clients=4",
            "--run.name",
            "my_run",
        ],
    )
    assert cfg.train.lr == 2e-4 and type(cfg.train.lr) is float
    assert cfg.fed.method == "udec"
    assert cfg.model.dim_mults == (1, 2) and type(cfg.model.dim_mults) is tuple
    assert cfg.fed.rounds == 3 and type(cfg.fed.rounds) is int
    assert cfg.fed.freeze_unshared is True
    assert cfg.split.num_clients == 4
    assert cfg.run.name == "my_run"
    # untouched keys keep the file's values
    assert cfg.train.batch_size == 128 and cfg.fed.local_epochs == 5


def test_override_int_to_float_and_null():
    cfg = load_config(
        None, ["--train.lr=1", "--data.train_subset=null", "--diffusion.beta_end=3e-2"]
    )
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.data.train_subset is None
    assert cfg.diffusion.beta_end == pytest.approx(0.03)


def test_parse_overrides():
    assert parse_overrides(["--train.lr=2e-4", "--fed.method", "udec"]) == {
        "train.lr": 2e-4,
        "fed.method": "udec",
    }
    for bad in (["train.lr=1"], ["--lr=1"], ["--train.lr"]):
        with pytest.raises(ConfigError):
            parse_overrides(bad)


def test_replace_revalidates():
    cfg = load_config(None)
    assert cfg.replace({"fed.rounds": 2}).fed.rounds == 2
    with pytest.raises(ConfigError):
        cfg.replace({"fed.rounds": 0})


def _write(tmp_path, data, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BAD = [
    ({"trian": {"lr": 1e-4}}, "trian"),  # unknown section
    ({"train": {"lrate": 1e-4}}, "train.lrate"),  # unknown key
    ({"train": {"batch_size": "big"}}, "train.batch_size"),  # wrong type
    ({"train": {"batch_size": 12.5}}, "train.batch_size"),  # float for int
    ({"fed": {"freeze_unshared": "yes please"}}, "fed.freeze_unshared"),
    ({"model": {"dim_mults": [1, "2"]}}, "model.dim_mults"),
    ({"train": {"lr": -1e-4}}, "train.lr"),  # impossible values
    ({"train": {"lr": 0}}, "train.lr"),
    ({"diffusion": {"beta_start": 0.02, "beta_end": 0.01}}, "diffusion.beta_end"),
    ({"diffusion": {"beta_start": 0.02, "beta_end": 0.02}}, "diffusion.beta_end"),
    ({"fed": {"method": "fedprox"}}, "fed.method"),
    ({"eval": {"ddim_steps": 200}, "diffusion": {"timesteps": 100}}, "eval.ddim_steps"),
    ({"fed": {"rounds": 0}}, "fed.rounds"),
    ({"fed": {"local_epochs": -1}}, "fed.local_epochs"),
    ({"checkpoint": {"keep": -1}}, "checkpoint.keep"),
    ({"eval": {"eta": 1.5}}, "eval.eta"),
    ({"split": {"beta": 0.0}}, "split.beta"),
    ({"diffusion": {"beta_start": 1e-4, "beta_end": 1.0}}, "diffusion.beta_end"),
    ({"fed": {"on_nonfinite": "ignore"}}, "fed.on_nonfinite"),
    ({"fed": {"round_timeout": -1.0}}, "fed.round_timeout"),
]


@pytest.mark.parametrize("data,key", BAD, ids=[k for _, k in BAD])
def test_bad_file_raises_naming_key_and_file(tmp_path, data, key):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert key in msg
    assert str(path) in msg


@pytest.mark.parametrize(
    "args,key",
    [
        (["--trian.lr=1"], "trian"),
        (["--train.lrate=1"], "train.lrate"),
        (["--train.batch_size=big"], "train.batch_size"),
        (["--train.lr=-2e-4"], "train.lr"),
        (["--fed.method=fedprox"], "fed.method"),
        (["--eval.ddim_steps=2000"], "eval.ddim_steps"),
    ],
)
def test_bad_override_raises_naming_key(args, key):
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/paper/fmnist_full.yaml", args)
    assert key in str(exc.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(exc.value)
    bad = _write(tmp_path, "train: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "broken.yaml" in str(exc.value)
    top = _write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError):
        load_config(top)


def test_train_cli_exits_2_on_bad_config(tmp_path):
    bad = _write(tmp_path, {"train": {"lrate": 1e-4}})
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "PMIX_RANK",
            "PMI_RANK",
            "MPI_LOCALNRANKS",
            "MV2_COMM_WORLD_SIZE",
            "I_MPI_HYDRA_TOPOLIB",
        )
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "fedmpi.train", "--config", str(bad)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "train.lrate" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # failed before creating a run folder


def _numeric_keys():
    """Every schema key whose type is int, float or a tuple of ints (Optional ones too)."""
    out = []
    for section, cls in typing.get_type_hints(Config).items():
        for f, tp in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if args[0] in (int, float, tuple):
                out.append((f"{section}.{f}", args[0]))
    return out


NUMERIC = _numeric_keys()


def test_every_numeric_key_has_a_range():
    keys = {k for k, _ in NUMERIC}
    assert len(keys) > 30  # the walk found the schema
    assert not keys - set(RANGES), (
        f"numeric keys without a RANGES entry: {sorted(keys - set(RANGES))}"
    )
    assert not set(RANGES) - keys, (
        f"RANGES entries that are not numeric keys: {sorted(set(RANGES) - keys)}"
    )
    schema = {
        f"{s}.{f.name}" for s, cls in typing.get_type_hints(Config).items() for f in fields(cls)
    }
    assert set(CHOICES) <= schema


def _outside(key, tp):
    """Values just outside RANGES[key] on each bounded side."""
    r = RANGES[key]
    step = 1 if tp in (int, tuple) else 0.5
    vals = []
    if r.lo != -math.inf:
        vals.append(r.lo if r.lo_open else r.lo - step)
    if r.hi != math.inf:
        vals.append(r.hi if r.hi_open else r.hi + step)
    return [[v] if tp is tuple else v for v in vals]


@pytest.mark.parametrize(
    "key,value", [(k, v) for k, tp in NUMERIC for v in _outside(k, tp)], ids=lambda x: str(x)
)
def test_out_of_range_value_is_refused(key, value):
    with pytest.raises(ConfigError) as exc:
        load_config(None, {key: value})
    assert f"'{key}' must be" in str(exc.value)


@pytest.mark.parametrize(
    "over",
    [
        {"checkpoint.keep": 0},
        {"eval.eta": 0.0},
        {"eval.eta": 1.0},
        {"fed.round_timeout": 0.0},
        {"fed.round_timeout": 600},
        {"fed.on_nonfinite": "skip"},
        {"run.seed": 0},
        {"split.min_size": 0},
        {"eval.grid": 0},
    ],
)
def test_boundary_values_are_accepted(over):
    cfg = load_config(None, over)
    for key, value in over.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_new_fed_keys_defaults():
    cfg = load_config(None)
    assert cfg.fed.on_nonfinite == "abort"
    assert cfg.fed.round_timeout == 0.0 and type(cfg.fed.round_timeout) is float


def test_dp_mode_must_match_secure_aggregation(tmp_path):
    """Distributed DP without fed.secure would hand the federator every client's update
    with only its 1/sqrt(m) share of the noise; central DP with fed.secure would give
    it the noise-free sum. Both are refused, naming the way out; the two valid
    combinations load, and without DP the mode does not matter."""
    with pytest.raises(ConfigError, match=r"'fed\.secure' is off") as err:
        load_config(None, {"privacy.dp": True, "privacy.mode": "distributed"})
    assert "--fed.secure=true" in str(err.value) and "--privacy.mode=central" in str(err.value)
    path = _write(tmp_path, {"privacy": {"dp": True, "mode": "distributed"}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'privacy\.mode' is 'distributed'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'fed\.secure' is on.*--privacy\.mode=distributed"):
        load_config(None, {"privacy.dp": True, "fed.secure": True})
    load_config(path, {"fed.secure": True})
    load_config(None, {"privacy.dp": True, "privacy.mode": "central"})
    load_config(None, {"privacy.mode": "distributed"})  # DP off: nothing is released


FLOATS = [k for k, tp in NUMERIC if tp is float]


@pytest.mark.parametrize(
    "text", [".inf", "-.inf", ".nan", ".NaN", "1e400", "1.0e+400", "-1e400", "1" + "0" * 400]
)
@pytest.mark.parametrize("key", FLOATS)
def test_non_finite_number_in_file_is_refused(tmp_path, key, text):
    section, name = key.split(".")
    path = _write(tmp_path, f"{section}:\n  {name}: {text}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert f"'{key}' must be a finite number" in msg and str(path) in msg


@pytest.mark.parametrize(
    "arg",
    [
        "--train.lr=1e400",
        "--train.lr=.inf",
        "--eval.eta=.nan",
        "--fed.round_timeout=-.inf",
        "--split.beta=1e999",
    ],
)
def test_non_finite_override_is_refused(arg):
    key = arg[2:].split("=")[0]
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/paper/fmnist_full.yaml", [arg])
    assert f"'{key}' must be a finite number" in str(exc.value)
    assert "command-line" in str(exc.value)


def test_yaml12_exponent_floats_in_files(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string '1e-4'; a config file means the number.
    path = _write(tmp_path, "train:\n  lr: 2e-4\ndiffusion:\n  beta_end: 3E-2\n", "ok.yaml")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.diffusion.beta_end == pytest.approx(0.03)
    assert load_config(None, ["--train.lr=.5e-3"]).train.lr == pytest.approx(5e-4)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error(tmp_path, text):
    path = _write(tmp_path, text, "empty.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and "empty" in msg and "configs/" in msg


@pytest.mark.parametrize(
    "text,key,lines",
    [
        ("train:\n  lr: 1.0e-4\n  batch_size: 8\n  lr: 2.0e-4\n", "lr", (2, 4)),
        ("train:\n  lr: 1.0e-4\nfed:\n  rounds: 2\ntrain:\n  batch_size: 8\n", "train", (1, 5)),
        ("fed: {rounds: 2, rounds: 3}\n", "rounds", (1, 1)),
    ],
)
def test_duplicate_key_is_an_error(tmp_path, text, key, lines):
    path = _write(tmp_path, text, "dup.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and f"key '{key}'" in msg and "twice" in msg
    assert f"line {lines[0]} and line {lines[1]}" in msg


def test_merge_keys_are_not_duplicates(tmp_path):
    # '<<: *base' then an explicit key is an override, not a repeated key.
    path = _write(
        tmp_path,
        "eval: &base\n  batch_size: 50\n  grid: 0\n"
        "train:\n  <<: {batch_size: 16, lr: 1.0e-3}\n  batch_size: 8\n",
        "merge.yaml",
    )
    cfg = load_config(path)
    assert cfg.train.batch_size == 8 and cfg.train.lr == pytest.approx(1e-3)
