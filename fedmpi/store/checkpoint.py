"""Checkpoint files: atomic saving, safe loading, and writing in the background.

A run folder's layout, its COMPLETE markers (with each file's sha256) and verified resume
points are `RunFolder`'s; this module serialises the files in it. Every file goes through
`atomic.atomic_write` (temporary name, then rename), so a crash never leaves a
half-written checkpoint.

The federator's file (the global model, 12 MB for the paper UNet) is written in the
background by default (`checkpoint.background`, `BackgroundWriter`): once every rank
has saved its own file, a thread serialises the federator's model, writes it and then
the marker, while the federator logs the round and starts the next one. The federator's
model does not change meanwhile: it waits for the thread at the start of the next round,
while the clients train. A write that fails is reported at the next checkpoint (or at the
end of the job), every rank stopping together; every exit path of the job waits for the
thread, so a job never ends with a write in flight. What a job killed outright (SIGKILL,
a node crash) can lose is the one round whose write was under way: it resumes from the
round before.

Checkpoints hold tensors and plain Python values only (the config as a dict of
primitives) and are read with `torch.load(weights_only=True)`: a file that needs
pickled objects (which could run code) is refused with a message naming it.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from fedmpi.errors import CheckpointError
from fedmpi.store.atomic import DiskError, atomic_write
from fedmpi.store.runfolder import FEDERATOR_FILE


def atomic_save(obj, path: Path) -> str:
    """torch.save `obj` to `path` atomically; returns the file's sha256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getbuffer())


class BackgroundWriter:
    """Runs file-writing jobs one after another in one thread (or at once when
    `enabled` is False). `submit` queues a job and `start` hands the queue to the
    thread (the round loop starts it after the round's own bookkeeping, which the
    thread would otherwise slow down); `join` blocks until every job so far has run;
    `wait` also returns the first failure's message since the last `wait` (a
    `DiskError`: the OS reason and the path), or None. A job writes what it writes in
    order (a checkpoint file, then its marker), so a marker is never written when its
    file was not."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="fedmpi-checkpoint") if enabled else None
        )
        self._queued: list[Callable[[], None]] = []
        self._jobs: list[Future] = []
        self._error: str | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._pool is None:
            self._run(job)
        else:
            self._queued.append(job)

    def start(self) -> None:
        """Hand the queued jobs to the thread."""
        if self._queued:
            # torch.save holds the GIL for milliseconds at a time: make the thread hand
            # it back within 0.5 ms (default 5 ms) when the main thread has work
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        for job in self._queued:
            self._jobs.append(self._pool.submit(self._run, job))
        self._queued = []

    def _run(self, job) -> None:
        try:
            job()
        except DiskError as e:
            self._error = self._error or str(e)

    def join(self) -> None:
        """Start anything queued and block until every job has finished (failures are
        kept for `wait`)."""
        self.start()
        jobs, self._jobs = self._jobs, []
        for f in jobs:
            f.result()  # re-raises anything that is not a DiskError (a bug)

    def wait(self) -> str | None:
        """`join`, then the first failure's message since the last `wait` (or None)."""
        self.join()
        error, self._error = self._error, None
        return error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> str | None:
        """Finish every pending job and stop the thread; returns `wait()`'s answer."""
        try:
            return self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """Load a fedmpi checkpoint safely (tensors and primitives only)."""
    path = Path(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it needs pickled Python objects, which could run code "
            f"({first[:200]}). fedmpi checkpoints hold tensors and plain values only; only "
            f"load this file with weights_only=False yourself if you trust where it came from"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # truncated zip, bad magic number, ...
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{path} is unreadable (corrupt or truncated?): {type(e).__name__}: {detail}"
        ) from None


def client_state(folder: Path, name: str, device="cpu") -> tuple[dict, dict]:
    """(full model state dict, checkpoint) of client file `name` in a checkpoint folder:
    the federator's model (the shared regions) overlaid with the client's own entries
    (its personal regions; a client file holding a whole model overrides everything)."""
    own = load_checkpoint(Path(folder) / name, device)
    state = dict(load_checkpoint(Path(folder) / FEDERATOR_FILE, device)["model"])
    state.update(own["model"])
    return state, own
