"""Run folders, atomic checkpoints, safe loading and verified resume points.

Layout of a run folder::

    RUN_DIR/config.yaml                 resolved config
    RUN_DIR/metrics.jsonl, eval.csv, comm.csv, comm_summary.json, samples/*.png
    RUN_DIR/checkpoints/round_000004/   federator.pt, client_001.pt, ..., COMPLETE

Every file goes through `atomic.atomic_write` (temporary name, then rename), so a
crash never leaves a half-written checkpoint. A checkpoint folder counts only once its
COMPLETE marker exists; rank 0 writes the marker after every rank has saved its file,
and the marker records the sha256 of every file (JSON). `verified_checkpoints` lists
the complete rounds whose files still match their hashes, newest first, so a resume
falls back past a truncated or corrupted newest round. Old checkpoints are pruned only
after a newer one is complete (and, by the round loop, finite).

The federator's file (the global model, 12 MB for the paper UNet) is written in the
background by default (`checkpoint.background`, `BackgroundWriter`): once every rank
has saved its own file (the clients' files hold their own state, small for FULL /
USPLIT), a thread serialises the federator's model, writes it and then the marker,
while the federator logs the round and starts the next one. The federator's model
does not change meanwhile: the federator waits for the thread at the start of the next
round, while the clients train (no copy of the model is needed). A write that fails is
reported at the next checkpoint (or at the end of the job), every rank stopping
together; the last round's checkpoint, the one taken at preemption and every exit path
of the job wait for the thread, so a job never ends with a write in flight. What a job
killed outright (SIGKILL, a node crash) can lose is the one round whose write was under
way: it resumes from the round before.

Checkpoints hold tensors and plain Python values only (the config as a dict of
primitives) and are read with `torch.load(weights_only=True)`: a file that needs
pickled objects (which could run code) is refused with a message naming it.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from fedmpi.config import Config, dump_config
from fedmpi.store.atomic import DiskError, atomic_write, sha256_file

MARKER = "COMPLETE"


from fedmpi.errors import CheckpointError  # noqa: E402


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


def atomic_write_text(text: str, path: Path) -> str:
    return atomic_write(path, text)


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
    state = dict(load_checkpoint(Path(folder) / "federator.pt", device)["model"])
    state.update(own["model"])
    return state, own


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML, written atomically (a run folder's config.yaml)."""
    atomic_write(path, dump_config(cfg))


def new_run_dir(cfg: Config, name: str | None = None) -> Path:
    """A fresh folder under run.out_dir: <name>-<YYYYmmdd-HHMMSS>[-n]."""
    base = Path(cfg.run.out_dir) / f"{name or cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")

    return path


def checkpoint_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{index:06d}"


def mark_complete(run_dir: Path, index: int, keep: int, files: dict | None = None) -> None:
    """Mark checkpoint `index` complete (recording each file's sha256), then delete
    complete ones beyond the newest `keep` (0: keep all). Call only for a checkpoint
    whose every file is written and finite: older ones are deleted after this."""
    d = checkpoint_dir(run_dir, index)
    record = {"round": index, "files": dict(sorted((files or {}).items()))}
    atomic_write_text(json.dumps(record, indent=1) + "\n", d / MARKER)
    if keep > 0:
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(r"round_(\d+)", d.name)
        if m and (d / MARKER).is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def latest_complete(run_dir: Path) -> int | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def verify(run_dir: Path, index: int) -> str | None:
    """None if every file of checkpoint `index` matches its recorded sha256, else why not.
    Markers written before hashes were recorded (a bare round number) are trusted."""
    d = checkpoint_dir(run_dir, index)
    try:
        text = (d / MARKER).read_text()
    except OSError as e:
        return f"{d / MARKER}: {e.strerror}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None if text.strip().isdigit() else f"{d / MARKER} is corrupt"
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return f"{d / MARKER} is corrupt"
    for name, digest in record["files"].items():
        p = d / name
        if not p.is_file():
            return f"{p} is missing"
        if sha256_file(p) != digest:
            return (
                f"{p} does not match the sha256 recorded when it was written (corrupt or truncated)"
            )
    return None


def marker_files(run_dir: Path, index: int) -> dict:
    """{file name: sha256} recorded in checkpoint `index`'s marker ({} for old markers)."""
    try:
        record = json.loads((checkpoint_dir(run_dir, index) / MARKER).read_text())
        return dict(record.get("files", {})) if isinstance(record, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def newest_verified(run_dir: Path, warn=print) -> int | None:
    """The newest complete checkpoint whose files verify; warns about each one skipped."""
    for index in reversed(complete_checkpoints(run_dir)):
        problem = verify(run_dir, index)
        if problem is None:
            return index
        warn(
            f"warning: checkpoint of round {index} is unusable: {problem}; "
            f"falling back to an earlier one"
        )
    return None
