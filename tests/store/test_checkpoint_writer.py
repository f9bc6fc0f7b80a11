"""checkpoint.BackgroundWriter: the thread that writes the federator's checkpoint file and
marker while the next round runs (checkpoint.background)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fedmpi.store.atomic import DiskError, sha256_file
from fedmpi.store.checkpoint import BackgroundWriter, atomic_save, load_checkpoint


def test_jobs_run_in_order_in_one_thread_once_started(tmp_path):
    done, threads = [], set()

    def job(i):
        def run():
            time.sleep(0.02 if i == 0 else 0)  # a slow first job must still finish first
            threads.add(threading.get_ident())
            done.append(i)

        return run

    with BackgroundWriter() as writer:
        for i in range(3):
            writer.submit(job(i))
        time.sleep(0.05)
        assert done == []  # queued, not started: the round's bookkeeping comes first
        writer.start()
        writer.join()
        assert done == [0, 1, 2]
        assert threads and threading.get_ident() not in threads


def test_a_failed_write_is_reported_once_and_later_jobs_still_run(tmp_path):
    ran = []

    def fail():
        raise DiskError(28, f"No space left on device while writing {tmp_path / 'x.pt'}")

    with BackgroundWriter() as writer:
        writer.submit(fail)
        writer.submit(lambda: ran.append(1))
        writer.join()  # join keeps the failure for wait
        assert ran == [1]
        message = writer.wait()
        assert "No space left on device" in message and "x.pt" in message
        assert writer.wait() is None


def test_a_bug_in_a_job_is_raised_not_hidden():
    writer = BackgroundWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.close()


def test_disabled_writer_runs_each_job_at_once(tmp_path):
    writer = BackgroundWriter(enabled=False)
    state = {"w": torch.arange(6.0)}
    digest = {}
    writer.submit(lambda: digest.setdefault("d", atomic_save(state, tmp_path / "a.pt")))
    assert digest["d"] == sha256_file(tmp_path / "a.pt")  # written before submit returned
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["w"], state["w"])
    assert writer.close() is None


def test_close_waits_for_a_write_in_flight(tmp_path):
    path = tmp_path / "slow.pt"

    def slow():
        time.sleep(0.2)
        atomic_save({"w": torch.ones(3)}, path)

    writer = BackgroundWriter()
    writer.submit(slow)
    writer.start()
    assert writer.close() is None
    assert path.is_file() and torch.equal(load_checkpoint(path)["w"], torch.ones(3))
