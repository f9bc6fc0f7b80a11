"""Hostile configs end in one short line and exit 2, fast and in bounded memory."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mpihelp import ROOT

from fedmpi.config import ConfigError, load_config


def alias_bomb(path, key_path=("train", "lr"), levels=10):
    """A few hundred bytes of YAML whose value under `key_path` expands to 9**levels strings."""
    lines, indent = [], ""
    for part in key_path:
        lines.append(f"{indent}{part}:")
        indent += "  "
    lines.append(f'{indent}- &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]')
    for i in range(1, levels):
        lines.append(f"{indent}- &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1000
    return path


PEAK = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(p.returncode)"
)


def run_limited(args, timeout=60):
    """Run a fedmpi command; returns (process, seconds, its peak memory in MB), the peak
    measured by a fresh parent whose only child the command is."""
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    peak_kb = int(res.stderr.rsplit("peak_kb", 1)[1].split()[0])
    res.stderr = res.stderr.rsplit("peak_kb", 1)[0]
    return res, time.monotonic() - t0, peak_kb / 1024


@pytest.mark.parametrize("command", [["--print-config"], []])
def test_yaml_alias_bomb_is_one_line_fast_and_small(tmp_path, command):
    bomb = alias_bomb(tmp_path / "bomb.yaml")
    res, seconds, peak_mb = run_limited(
        ["-m", "fedmpi.train", "--config", str(bomb), f"--run.out_dir={tmp_path}", *command]
    )
    assert res.returncode == 2, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "'train.lr' must be a number" in out and len(out) < 1000, out[:2000]
    assert seconds < 30 and peak_mb < 1000, (seconds, peak_mb)
    assert not any(tmp_path.glob("*-*")), "no run folder is created"


def test_alias_bomb_in_a_list_key_is_short_too(tmp_path):
    bomb = alias_bomb(tmp_path / "bomb.yaml", ("model", "dim_mults"), levels=9)
    with pytest.raises(ConfigError) as e:
        load_config(bomb)
    assert "'model.dim_mults' must be a list of integers" in str(e.value)
    assert len(str(e.value)) < 600


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", "..", ".hidden", "", "x" * 200])
def test_run_name_is_one_plain_folder_name(name):
    with pytest.raises(ConfigError, match="'run.name' is .* names a folder inside run.out_dir"):
        load_config(ROOT / "tests/configs/tiny.yaml", {"run.name": name})


def test_run_names_that_sweeps_and_slurm_write_are_fine():
    for name in ("K2-iid-udec-s7", "my-run_1.b", "fmnist_full", "run+1=2"):
        assert load_config(ROOT / "tests/configs/tiny.yaml", {"run.name": name}).run.name == name


@pytest.mark.parametrize("key", ["train.batch_size", "eval.batch_size"])
def test_absurd_batch_sizes_are_refused(key):
    with pytest.raises(ConfigError, match=rf"'{key}' must be in \[1, 65536\], got 1000000000"):
        load_config(ROOT / "tests/configs/tiny.yaml", {key: 1_000_000_000})
    assert load_config(ROOT / "tests/configs/tiny.yaml", {key: 65536})
