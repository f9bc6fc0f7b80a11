"""Config loading (fedmpi.config): shipped files, overrides, and errors that name the key
and the file before anything heavy starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmpi.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs/paper").glob("*.yaml"))
PAPER = sorted((ROOT / "configs/paper").glob("*.yaml"))


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


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/paper/fmnist_full.yaml",
                      ["--train.lr=2e-4", "--fed.method", "udec", "--model.dim_mults=[1,2]",
                       "--fed.rounds=3", "--fed.freeze_unshared=true", "--split.num_clients=4",
                       "--run.name", "my_run"])
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
    cfg = load_config(None, ["--train.lr=1", "--data.train_subset=null",
                             "--diffusion.beta_end=3e-2"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.data.train_subset is None
    assert cfg.diffusion.beta_end == pytest.approx(0.03)


def test_parse_overrides():
    assert parse_overrides(["--train.lr=2e-4", "--fed.method", "udec"]) == {
        "train.lr": 2e-4, "fed.method": "udec"}
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
    ({"trian": {"lr": 1e-4}}, "trian"),                          # unknown section
    ({"train": {"lrate": 1e-4}}, "train.lrate"),                 # unknown key
    ({"train": {"batch_size": "big"}}, "train.batch_size"),      # wrong type
    ({"train": {"batch_size": 12.5}}, "train.batch_size"),       # float for int
    ({"fed": {"freeze_unshared": "yes please"}}, "fed.freeze_unshared"),
    ({"model": {"dim_mults": [1, "2"]}}, "model.dim_mults"),
    ({"train": {"lr": -1e-4}}, "train.lr"),                      # impossible values
    ({"train": {"lr": 0}}, "train.lr"),
    ({"diffusion": {"beta_start": 0.02, "beta_end": 0.01}}, "diffusion.beta_end"),
    ({"diffusion": {"beta_start": 0.02, "beta_end": 0.02}}, "diffusion.beta_end"),
    ({"fed": {"method": "fedprox"}}, "fed.method"),
    ({"eval": {"ddim_steps": 200}, "diffusion": {"timesteps": 100}}, "eval.ddim_steps"),
    ({"fed": {"rounds": 0}}, "fed.rounds"),
    ({"fed": {"local_epochs": -1}}, "fed.local_epochs"),
]


@pytest.mark.parametrize("data,key", BAD, ids=[k for _, k in BAD])
def test_bad_file_raises_naming_key_and_file(tmp_path, data, key):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert key in msg
    assert str(path) in msg


@pytest.mark.parametrize("args,key", [
    (["--trian.lr=1"], "trian"),
    (["--train.lrate=1"], "train.lrate"),
    (["--train.batch_size=big"], "train.batch_size"),
    (["--train.lr=-2e-4"], "train.lr"),
    (["--fed.method=fedprox"], "fed.method"),
    (["--eval.ddim_steps=2000"], "eval.ddim_steps"),
])
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
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK",
                        "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE", "I_MPI_HYDRA_TOPOLIB")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "fedmpi.train", "--config", str(bad)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "train.lrate" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # failed before creating a run folder
