"""slurm/run.sh knob validation, without a Slurm cluster: the script runs under plain bash
with SLURM_* set by hand and MPIRUN pointing at a fake launcher that records its calls and
creates the --run-dir it is given (as fedmpi.cli.train would). A bad knob must stop the script
with exit 2 and a message naming it before the launcher is called or any folder is made;
a good set of knobs must reach the launcher with the run folder inside OUT_DIR.
(tests/test_slurm_job.py runs the same script end to end on a real local Slurm.)"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "slurm" / "run.sh"

# Knobs run.sh reads; cleared so that the caller's environment cannot change the outcome.
KNOBS = (
    "CONFIG",
    "RUN_NAME",
    "RUN_DIR",
    "OUT_DIR",
    "CLIENTS",
    "LAUNCHER",
    "MPIRUN",
    "MPIRUN_FLAGS",
    "SRUN_MPI",
    "SRUN_FLAGS",
    "SRUN_WAIT",
    "PYTHON",
    "REQUEUE",
    "TORCHINDUCTOR_CACHE_DIR",
)

FAKE_MPIRUN = """#!/bin/bash
# Records each call; for a launch, creates the --run-dir like fedmpi.cli.train would.
echo "$*" >> "{calls}"
echo "${{TORCHINDUCTOR_CACHE_DIR:-unset}}" > "{calls}.cache"
[ "$1" = --version ] && {{ echo "fake launcher"; exit 0; }}
while [ $# -gt 0 ]; do
  [ "$1" = --run-dir ] && mkdir -p "$2"
  shift
done
exit 0
"""


@pytest.fixture
def box(tmp_path):
    """cwd two levels below tmp_path (so RUN_NAME=../../x would land inside tmp_path),
    OUT_DIR, and the fake launcher with its call record."""
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_mpirun"
    fake.write_text(FAKE_MPIRUN.format(calls=calls))
    fake.chmod(0o755)
    return {"root": tmp_path, "cwd": cwd, "out": tmp_path / "out", "calls": calls, "fake": fake}


def run_sh(box, *args, **knobs):
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    env.update(
        SLURM_NTASKS="3",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="fedmpi",
        OUT_DIR=str(box["out"]),
        MPIRUN=str(box["fake"]),
        PYTHON="python",
    )
    env.update({k: str(v) for k, v in knobs.items()})
    env = {k: v for k, v in env.items() if v != "<unset>"}
    return subprocess.run(
        ["bash", str(RUN_SH), *args],
        cwd=box["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def tree(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


BAD = [
    ({"RUN_NAME": "../../x"}, "RUN_NAME='../../x'"),
    ({"RUN_NAME": "../x"}, "RUN_NAME='../x'"),
    ({"RUN_NAME": "a/b"}, "RUN_NAME='a/b'"),
    ({"RUN_NAME": "/tmp/abs"}, "RUN_NAME='/tmp/abs'"),
    ({"RUN_NAME": ".."}, "RUN_NAME='..'"),
    ({"RUN_NAME": ".hidden"}, "RUN_NAME='.hidden'"),
    ({"RUN_NAME": "x..y"}, "RUN_NAME='x..y'"),
    ({"RUN_NAME": "<unset>", "SLURM_JOB_NAME": "../up"}, "RUN_NAME='../up-4242'"),
    ({"CLIENTS": "two"}, "CLIENTS must be an integer >= 0, got 'two'"),
    ({"CLIENTS": "2.0"}, "CLIENTS must be an integer >= 0, got '2.0'"),
    ({"CLIENTS": "-2"}, "CLIENTS must be an integer >= 0, got '-2'"),
    ({"CLIENTS": "0"}, "CLIENTS=0 needs --ntasks=1, job has 3 tasks"),
    ({"CLIENTS": "02"}, "CLIENTS must be an integer >= 0, got '02'"),
    ({"CLIENTS": "3"}, "CLIENTS=3 needs --ntasks=4, job has 3 tasks"),
    ({"SLURM_NTASKS": "three"}, "NTASKS (SLURM_NTASKS"),
    ({"SLURM_NTASKS": "0"}, "must be an integer >= 1, got '0'"),
    ({"SLURM_NTASKS": "1", "CLIENTS": "1"}, "CLIENTS=1 needs --ntasks=2, job has 1 tasks"),
    ({"SRUN_WAIT": "1m"}, "SRUN_WAIT must be an integer >= 0, got '1m'"),
    ({"SRUN_WAIT": "-5"}, "SRUN_WAIT must be an integer >= 0, got '-5'"),
    ({"REQUEUE": "yes"}, "REQUEUE must be 1 (requeue after a checkpoint signal) or 0, got 'yes'"),
    ({"REQUEUE": "2"}, "REQUEUE must be 1 (requeue after a checkpoint signal) or 0, got '2'"),
]


@pytest.mark.parametrize("knobs,message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_knob_exits_2_before_launching(box, knobs, message):
    before = tree(box["root"])
    res = run_sh(box, **knobs)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "fedmpi:" in res.stderr and "integer expression expected" not in res.stderr
    assert not box["calls"].exists(), "the launcher was called: " + box["calls"].read_text()
    assert tree(box["root"]) == before  # no folder anywhere, OUT_DIR included


def test_good_knobs_reach_the_launcher_inside_out_dir(box):
    before = tree(box["root"])
    res = run_sh(
        box,
        "tests/configs/tiny.yaml",
        "--fed.rounds=1",
        RUN_NAME="my-run_1.b",
        CLIENTS="2",
        SRUN_WAIT="0",
        REQUEUE="0",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    launch = box["calls"].read_text().splitlines()[-1].split()
    run_dir = box["out"] / "my-run_1.b"
    assert launch[:2] == ["-n", "3"]
    assert launch[2:] == [
        "python",
        "-m",
        "fedmpi.train",
        "--config",
        "tests/configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        "--fed.rounds=1",
    ]
    assert run_dir.is_dir()
    assert tree(box["root"]) - before == {
        Path("calls.txt"),
        Path("calls.txt.cache"),
        Path("out"),
        Path("out/my-run_1.b"),
    }


def test_one_task_runs_the_centralized_baseline(box):
    """--ntasks=1 (what fedmpi.analysis.sweep submits for K = 1): one rank, the centralized run."""
    res = run_sh(box, "tests/configs/tiny.yaml", RUN_NAME="central", SLURM_NTASKS="1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 tasks (the centralized baseline)" in res.stdout
    launch = box["calls"].read_text().splitlines()[-1].split()
    assert launch[:2] == ["-n", "1"] and launch[2:5] == ["python", "-m", "fedmpi.train"]


def test_run_dir_may_be_any_path(box):
    # RUN_DIR is the explicit way to put the run elsewhere: RUN_NAME is then only a label.
    run_dir = box["root"] / "elsewhere" / "r1"
    res = run_sh(box, RUN_DIR=str(run_dir), RUN_NAME="../label")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"--run-dir {run_dir}" in box["calls"].read_text()
    assert run_dir.is_dir()


def test_compile_cache_is_shared_beside_the_runs(box):
    """torch.compile's cache goes next to the run folders (absolute, so every rank finds
    it), unless the user chose one."""
    cache = Path(str(box["calls"]) + ".cache")
    res = run_sh(box, RUN_NAME="r1", OUT_DIR="rel_out")
    assert res.returncode == 0, res.stdout + res.stderr
    assert cache.read_text().strip() == str(box["cwd"] / "rel_out" / ".compile_cache")
    assert not (box["cwd"] / "rel_out" / ".compile_cache").exists()  # torch makes it if used
    res = run_sh(box, RUN_NAME="r2", TORCHINDUCTOR_CACHE_DIR="/scratch/mine")
    assert res.returncode == 0, res.stdout + res.stderr
    assert cache.read_text().strip() == "/scratch/mine"
