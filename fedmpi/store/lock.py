"""A run folder's lock: one job at a time writes a run folder.

The job's federator creates RUN_DIR/LOCK with `O_CREAT | O_EXCL` before it writes anything
in the folder, and removes it when the job ends, however it ends (an exit code, a
preemption, an error). Exclusive creation is atomic on local file systems and on the
shared ones HPC sites use (NFSv3 and later, Lustre, GPFS), where `flock` is often not
honoured across nodes; so two jobs on one machine or on two nodes never both hold it.

The file records who holds it: host, pid, the process's start time, the Slurm job id
and the command. A lock left behind by a job killed outright (SIGKILL, a node crash) is
stale. It is recognised and cleared automatically when the holder was on this host and
its process is gone, or when the new job is the same Slurm job (a requeue keeps its job
id, possibly on another node). Any other lock is reported with its holder and the fix:
wait for that job, or, if it is known to be dead (its node crashed), delete RUN_DIR/LOCK.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from fedmpi.errors import DiskError

LOCK_FILE = "LOCK"


class FolderBusy(DiskError):
    """Another job holds the run folder's lock (a DiskError: exit 4)."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: no such process here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }


def _is_stale(held: dict) -> bool:
    """Whether the holder is certainly gone (or is this very job, requeued by Slurm)."""
    me = _holder()
    if held.get("slurm_job") and held.get("slurm_job") == me["slurm_job"]:
        return True
    if held.get("host") != me["host"]:
        return False  # another node: its processes cannot be seen from here
    start = _start_time(int(held.get("pid", -1)))
    return start is None or (held.get("start") is not None and start != held.get("start"))


class RunLock:
    """Held while a job writes its run folder; `release()` (or leaving `with`) frees it."""

    def __init__(self, folder: Path, log=print):
        self.path = Path(folder) / LOCK_FILE
        self.log = log
        self.held = False

    def acquire(self) -> RunLock:
        record = json.dumps(_holder(), indent=1) + "\n"
        for _ in range(2):  # a stale lock is cleared once, then taken
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = self._read()
                if not _is_stale(held):
                    raise FolderBusy(0, self._busy_message(held)) from None
                self.log(f"warning: clearing a stale lock of {self.path.parent} ({_who(held)})")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise DiskError(
                    e.errno,
                    f"cannot write to the run folder {self.path.parent} ({e.strerror}): "
                    f"choose a writable folder (run.out_dir, --run-dir) or fix its permissions",
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return self
        raise FolderBusy(0, self._busy_message(self._read()))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict:
        try:
            held = json.loads(self.path.read_text())
            return held if isinstance(held, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def _busy_message(self, held: dict) -> str:
        return (
            f"the run folder {self.path.parent} is in use by another job ({_who(held)}); "
            f"wait for it to end, or, if that job is dead (its node crashed), delete "
            f"{self.path} and start again"
        )


def _who(held: dict) -> str:
    if not held:
        return "holder unknown: the lock file is unreadable"
    job = f", Slurm job {held['slurm_job']}" if held.get("slurm_job") else ""
    return f"pid {held.get('pid')} on {held.get('host')}{job}, since {held.get('since')}"
