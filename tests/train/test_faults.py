"""Fault probes (issue 9): each finding run as a real mpirun job or CLI call.

NaN clients, a checkpoint that would run code, resume with another world size or model,
a corrupt newest checkpoint, partial log lines, a full disk, SIGTERM and a stalled rank.
Each asserts the exit code, the message, a bounded time to exit and, where it applies,
that the run folder resumes afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mpihelp import ROOT, load_states, mpi_env, mpirun, mpirun_path, train

from fedmpi.fl.ledger import read_ledger
from fedmpi.store.runfolder import MARKER, RunFolder

pytestmark = pytest.mark.mpi
TINY = "tests/configs/tiny.yaml"


def fault(n, kind, rank, round_index, run_dir, *overrides, timeout=240):
    """A tiny job in which client `rank` misbehaves in round `round_index`."""
    return mpirun(
        n,
        [
            "tests/mpi_scripts/fault_rank.py",
            kind,
            str(rank),
            str(round_index),
            "--",
            "--config",
            TINY,
            "--run-dir",
            str(run_dir),
            *overrides,
        ],
        timeout=timeout,
    )


def strict_rows(path):
    """metrics.jsonl parsed as strict JSON (NaN / Infinity tokens are errors)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def same_weights(run_a, run_b, round_index, clients):
    fa, ca = load_states(run_a, round_index, clients)
    fb, cb = load_states(run_b, round_index, clients)
    return all(torch.equal(a[k], b[k]) for a, b in zip([fa, *ca], [fb, *cb]) for k in a)


def test_nan_client_aborts_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    res = fault(3, "nan", 2, 2, run, "--fed.rounds=3", "--checkpoint.keep=1")
    assert time.time() - t0 < 180
    assert res.returncode == 3, res.stdout + res.stderr
    assert "round 2: the model of client 2 is not finite" in res.stdout
    assert "last good checkpoint is round 1" in res.stdout
    assert RunFolder(run).latest_complete() == 1 and RunFolder(run).verify(1) is None
    fed, clients = load_states(run, 1, 2)
    assert all_finite(fed) and all(all_finite(c) for c in clients)
    assert [r["round"] for r in strict_rows(run / "metrics.jsonl") if r["kind"] == "round"] == [1]
    resumed = train(3, run, "--fed.rounds=3", "--checkpoint.keep=1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "continuing after round 1" in resumed.stdout


def test_nan_client_skipped_when_asked(tmp_path):
    run = tmp_path / "run"
    res = fault(4, "nan", 2, 1, run, "--fed.on_nonfinite=skip", "--fed.method=usplit")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[round 1/2]" in res.stdout and "NaN: client 2 skipped" in res.stdout
    rows = [r for r in strict_rows(run / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["nonfinite_clients"] for r in rows] == [[2], []]
    assert rows[0]["client_loss"][1] is None  # strict JSON: null, not NaN
    for r in (1, 2):
        fed, clients = load_states(run, r, 3)
        assert all_finite(fed) and all(all_finite(c) for c in clients)
    # bytes recorded honestly: the skipped client still took part in the collectives
    assert json.loads((run / "comm_summary.json").read_text())["matches_analytical"] is True


def _evil_checkpoint(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"round": 1, "model": Evil()}, path)


@pytest.fixture(scope="module")
def one_round_run(tmp_path_factory):
    """A finished tiny 1-round run (3 ranks), trained once for the module: the tests that
    start from such a run work on their own copy (run folders are relocatable)."""
    run = tmp_path_factory.mktemp("one_round") / "run"
    res = train(3, run, "--fed.rounds=1")
    assert res.returncode == 0, res.stdout + res.stderr
    return run


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_that_runs_code_is_refused(tmp_path, one_round_run):
    run, marker = copy_run(one_round_run, tmp_path), tmp_path / "pwned"
    target = RunFolder(run).checkpoint_dir(1) / "federator.pt"
    _evil_checkpoint(target, marker)
    # an attacker who can write the file can also fix the recorded hash
    from fedmpi.store.atomic import sha256_file

    rec = json.loads((RunFolder(run).checkpoint_dir(1) / MARKER).read_text())
    rec["files"]["federator.pt"] = sha256_file(target)
    (RunFolder(run).checkpoint_dir(1) / MARKER).write_text(json.dumps(rec))
    res = train(3, run, "--fed.rounds=2")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "refusing to load" in res.stdout and "federator.pt" in res.stdout
    assert not marker.exists()
    ev = subprocess.run(
        [sys.executable, "-m", "fedmpi.evaluate", str(run), "--extractor", "classifier"],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ev.returncode == 2, ev.stdout + ev.stderr
    assert "refusing to load" in ev.stderr and "federator.pt" in ev.stderr
    assert not marker.exists()


def test_resume_with_another_world_size_or_model_is_refused(tmp_path, one_round_run):
    run = copy_run(one_round_run, tmp_path)
    res = train(4, run, "--fed.rounds=2")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "K=2 clients" in res.stdout and "mpirun -n 3" in res.stdout
    assert "continuing" not in res.stdout
    res = train(3, run, "--fed.rounds=2", "--model.dim=16")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "model.dim is 8 in the checkpoint but 16 now" in res.stdout
    assert (
        RunFolder(run).latest_complete() == 1 and RunFolder(run).verify(1) is None
    )  # nothing touched


def test_corrupt_checkpoint_and_partial_log_lines_fall_back(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train(3, run, "--checkpoint.keep=2").returncode == 0
    shutil.copytree(run, ref)  # the uninterrupted run, kept before the damage below
    victim = RunFolder(run).checkpoint_dir(2) / "client_002.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "round", "rou')
    with (run / "comm.csv").open("a") as f:
        f.write("2,1,0,enc")
    res = train(3, run, "--checkpoint.keep=2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checkpoint of round 2 is unusable" in res.stdout and "client_002.pt" in res.stdout
    assert "continuing after round 1" in res.stdout
    assert same_weights(ref, run, 2, 2)
    assert read_ledger(run / "comm.csv") == read_ledger(ref / "comm.csv")
    assert [r["round"] for r in strict_rows(run / "metrics.jsonl") if r["kind"] == "round"] == [
        1,
        2,
    ]


def test_disk_full_while_checkpointing(tmp_path, one_round_run):
    run = copy_run(one_round_run, tmp_path)
    size_kb = (RunFolder(run).checkpoint_dir(1) / "federator.pt").stat().st_size // 1024
    cmd = [
        mpirun_path(),
        "-n",
        "3",
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        "-m",
        "fedmpi.train",
        "--config",
        TINY,
        "--run-dir",
        str(run),
        "--fed.rounds=2",
    ]
    # RLIMIT_FSIZE below a checkpoint's size: writes fail with EFBIG like a full disk
    limit = f'ulimit -f {max(64, size_kb // 2)}; exec "$@"'
    t0 = time.time()
    res = subprocess.run(
        ["bash", "-c", limit, "bash", *cmd],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert time.time() - t0 < 150
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "File too large while writing" in out and "round_000002" in out
    assert not list(run.rglob(".*.tmp*"))  # no temporary files left behind
    assert RunFolder(run).latest_complete() == 1 and RunFolder(run).verify(1) is None
    again = train(3, run, "--fed.rounds=2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continuing after round 1" in again.stdout


def _rank_pids(run_dir) -> list[int]:
    """Pids of the python ranks whose command line names this run folder."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"python") and str(run_dir).encode() in argv:
                pids.append(int(entry))
    return pids


def test_disk_full_in_a_background_checkpoint_write(tmp_path, one_round_run):
    """Round 2's federator.pt is written by the background thread (checkpoint.background)
    and fails; the next checkpoint (round 3's) reports it on every rank: exit 4, the OS
    message and the path, round 2 never marked, round 1 intact and resumable."""
    run = copy_run(one_round_run, tmp_path)
    size_kb = (RunFolder(run).checkpoint_dir(1) / "federator.pt").stat().st_size // 1024
    cmd = [
        mpirun_path(),
        "-n",
        "3",
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        "-m",
        "fedmpi.train",
        "--config",
        TINY,
        "--run-dir",
        str(run),
        "--fed.rounds=3",
    ]
    limit = f'ulimit -f {max(64, size_kb // 2)}; exec "$@"'
    res = subprocess.run(
        ["bash", "-c", limit, "bash", *cmd],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 4, out
    assert "[round 2/3]" in out and "[round 3/3]" not in out  # found at round 3's checkpoint
    assert "File too large while writing" in out and "round_000002" in out
    assert not (RunFolder(run).checkpoint_dir(2) / MARKER).exists()
    assert not list(run.rglob(".*.tmp*"))
    assert RunFolder(run).latest_complete() == 1 and RunFolder(run).verify(1) is None
    again = train(3, run, "--fed.rounds=2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continuing after round 1" in again.stdout


@pytest.mark.parametrize("target", ["ranks", "mpirun"])
def test_sigterm_stops_with_a_resumable_checkpoint(tmp_path, target):
    """SIGTERM to every rank (what Slurm does to srun tasks, with KillWait to act):
    checkpoint, exit 75. SIGTERM to Open MPI's mpirun kills the ranks ~0.25 s later
    (and its output with them): the run still resumes from its last complete round."""
    run = tmp_path / "run"
    opts = ["--fed.rounds=3", "--fed.local_steps=15"]
    cmd = [
        mpirun_path(),
        "-n",
        "3",
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        "-m",
        "fedmpi.train",
        "--config",
        TINY,
        "--run-dir",
        str(run),
        *opts,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while (
        RunFolder(run).latest_complete() is None and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.2)
    t0 = time.time()
    if target == "ranks":
        pids = _rank_pids(run)
        assert len(pids) == 3
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60
    done = RunFolder(run).latest_complete()
    assert done in (1, 2) and RunFolder(run).verify(done) is None
    if target == "ranks":
        assert proc.returncode == 75, out + err
        assert "preempted (SIGTERM)" in out and "checkpoint of round" in out
    else:
        assert proc.returncode != 0
        # mpirun may exit before its killed ranks are reaped: the folder's lock is theirs
        # until they are gone (the next job must not start while one of them lives)
        _wait_until_gone(run / "LOCK", timeout=30)
    resumed = train(3, run, *opts)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"continuing after round {done}" in resumed.stdout


def _wait_until_gone(lock: Path, timeout: float) -> None:
    """Wait until the process holding `lock` (if any) has exited."""
    try:
        pid = int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    deadline = time.time() + timeout
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)


def test_stalled_rank_times_out(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    res = fault(3, "stop", 2, 2, run, "--fed.round_timeout=5", timeout=150)
    assert time.time() - t0 < 120
    assert res.returncode == 5, res.stdout + res.stderr
    assert "phase 'round 2: local training'" in res.stderr
    assert "fed.round_timeout=5" in res.stderr
    assert RunFolder(run).latest_complete() == 1 and RunFolder(run).verify(1) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("train:\n  lr: 1e-3\n  lr: 2e-3\n", "lr"),
        ("train:\n  lr: .inf\n", "train.lr"),
        ("checkpoint:\n  keep: -1\n", "checkpoint.keep"),
    ],
)
def test_bad_config_file_is_refused_before_any_work(tmp_path, capsys, text, message):
    # the CLI's main() in this process (no MPI launcher: rank 0's own config check, what
    # `python -m fedmpi.train` runs and exits with), not a fresh interpreter per case
    from fedmpi.cli.train import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc = main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert rc == 2, out.out + out.err
    assert message in out.out + out.err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_hdf5_shard_is_refused_with_one_line(tmp_path):
    # NaN pixels in client 1's shard: refused when the shard is read (exit 2, one line
    # naming the file and the dataset in it), never trained on until train.lr gets the blame
    import h5py
    import numpy as np

    from fedmpi.data.shards import write_shards

    x = np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28)).astype(np.uint8)
    y = np.arange(40) % 10
    bad = tmp_path / "bad.h5"
    parts = [np.arange(0, 40, 2), np.arange(1, 40, 2)]
    write_shards(bad, x, y, parts, x[:10], y[:10], {"dataset": "fashion_mnist"})
    with h5py.File(bad, "r+") as f:
        del f["client_1/images"]
        f["client_1/images"] = np.full((20, 1, 28, 28), np.nan)
    t0 = time.time()
    res = train(3, tmp_path / "run", f"--data.shards={bad}", timeout=150)
    assert time.time() - t0 < 120
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    message = f"{bad}: /client_1/images holds float64 images (NaN possible); shards hold uint8"
    lines = [line for line in out.splitlines() if message in line]
    assert len(lines) == 1 and f"--clients 2 --out {bad}`" in lines[0], out
    assert "Traceback" not in out and "train.lr" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()
