"""Run folders are never overwritten by mistake: a folder another job holds, a read-only
folder, a folder that is not a run, a resume that cannot resume, a resume with settings
that change the result, and a federation whose every client diverged all end in one line
and a non-zero exit, with no file of the existing run changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from mpihelp import ROOT, mpi_env, train

from fedmpi.store.runfolder import RunFolder

TINY = [
    "--config",
    "tests/configs/tiny.yaml",
    "--train.epochs=1",
    "--data.train_subset=64",
    "--eval.grid=0",
]


def fedmpi_train(*args, timeout=120):
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "fedmpi.train", *map(str, args)],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    res.seconds = time.monotonic() - t0
    return res


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished centralized run of 1 epoch (4 steps)."""
    run = tmp_path_factory.mktemp("guards") / "run"
    res = fedmpi_train(*TINY, "--run-dir", run)
    assert res.returncode == 0, res.stdout + res.stderr
    return run


def copy_of(run, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_a_folder_held_by_a_running_job_is_refused(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        start = open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        (run / "LOCK").write_text(
            json.dumps({"host": os.uname().nodename, "pid": holder.pid, "start": start})
        )
        before = snapshot(run)
        res = fedmpi_train("--resume", run)
        assert res.returncode == 4, res.stdout + res.stderr
        assert f"the run folder {run} is in use by another job (pid {holder.pid}" in res.stdout
        assert f"delete {run / 'LOCK'}" in res.stdout and res.seconds < 60
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, recognised and cleared
    res = fedmpi_train("--resume", run, "--train.epochs=2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "clearing a stale lock" in res.stdout
    assert not (run / "LOCK").exists() and RunFolder(run).latest_complete() == 2


def test_two_jobs_on_one_folder_the_second_is_refused(tmp_path):
    """Two real jobs on the same --run-dir: the one that comes second exits 4 at once."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "fedmpi.train", *TINY, "--train.epochs=40", "--run-dir", str(run)],
        cwd=ROOT,
        env=mpi_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        second = fedmpi_train(*TINY, "--run-dir", run)
        assert second.returncode == 4 and "is in use by another job" in second.stdout, (
            second.stdout + second.stderr
        )
    finally:
        first.kill()
        first.wait()


@contextlib.contextmanager
def read_only(folder):
    """`folder` read-only for this process: a read-only bind mount as root (root ignores
    permission bits), chmod otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def test_read_only_out_dir_and_resume_folder_exit_4(finished_run, tmp_path):
    with read_only(tmp_path / "ro") as ro:
        res = fedmpi_train(*TINY, "--run.out_dir", ro)
        assert res.returncode == 4, res.stdout + res.stderr
        assert f"cannot create a run folder in {ro}" in res.stdout and "writable" in res.stdout
        res = fedmpi_train(*TINY, "--run-dir", ro / "x")
        assert res.returncode == 4 and "cannot write to the run folder" in res.stdout, res.stdout
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    with read_only(run):
        res = fedmpi_train("--resume", run, "--train.epochs=2")
    assert res.returncode == 4, res.stdout + res.stderr
    assert f"cannot write to the run folder {run}" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr and snapshot(run) == before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    res = fedmpi_train("--resume", tmp_path)
    assert res.returncode == 2 and "not a run folder (it has no config.yaml)" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_where_every_checkpoint_is_corrupt_fails_and_touches_nothing(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    (RunFolder(run).checkpoint_dir(1) / "model.pt").write_bytes(b"truncated")
    before = snapshot(run)
    res = fedmpi_train("--resume", run)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "none of its 1 checkpoints verifies" in res.stdout
    assert "nothing in the folder was changed" in res.stdout
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "override, named",
    [
        ("--diffusion.timesteps=50", "diffusion.timesteps is 100 in the checkpoint but 50 now"),
        ("--train.lr=0.5", "train.lr is 0.001 in the checkpoint but 0.5 now"),
        ("--run.seed=8", "run.seed is 7 in the checkpoint but 8 now"),
    ],
)
def test_resume_refuses_settings_that_change_the_result(finished_run, tmp_path, override, named):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    res = fedmpi_train("--resume", run, "--train.epochs=2", override)
    assert res.returncode == 2 and named in res.stdout, res.stdout + res.stderr
    assert "Only rounds to add" in res.stdout and snapshot(run) == before


def test_resume_accepts_rounds_evaluation_and_logging_changes(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    res = fedmpi_train(
        "--resume", run, "--train.epochs=2", "--train.log_every=3", "--eval.ddim_steps=4"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert RunFolder(run).latest_complete() == 2


@pytest.mark.mpi
def test_every_client_diverging_under_skip_stops_the_job(tmp_path):
    """train.lr=1e6 with fed.on_nonfinite=skip: every client is non-finite in round 1, so
    there is nothing left to average: exit 3 on every rank, no checkpoint of the untrained
    model as a result."""
    run = tmp_path / "run"
    res = train(3, run, "--train.lr=1e6", "--fed.on_nonfinite=skip", "--fed.local_steps=3")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Every client diverged, so fed.on_nonfinite=skip has none left" in res.stdout
    assert RunFolder(run).latest_complete() is None
