"""How a job stops: the exceptions every rank raises together, and preemption requests.

A `JobStop` carries its exit code (fedmpi.errors). Raised on every rank together (the
decision came from a collective) the job ends cleanly; `collective=False` means one rank
alone raised it, and the job must be aborted so that no rank is left waiting.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fedmpi.errors import EXIT_DISK, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USER_ERROR
from fedmpi.store.runfolder import STOP_FILE


class JobStop(RuntimeError):
    """Raised on EVERY rank together (the decision came from a collective), so the job
    can end with `exit_code` without MPI_Abort; the federator has logged the reason.
    `collective=False`: raised by one rank alone, which must abort the job."""

    exit_code = 1

    def __init__(self, message: str = "", collective: bool = True):
        super().__init__(message)
        self.collective = collective


class SetupError(JobStop):
    """Any rank failed during set-up or resume validation (message already shown)."""

    exit_code = EXIT_USER_ERROR


class Preempted(JobStop):
    """A checkpoint of the last complete round was written in response to a signal."""

    exit_code = EXIT_PREEMPTED


class NonFiniteError(JobStop):
    """A client's update was not finite and fed.on_nonfinite is 'abort'."""

    exit_code = EXIT_NONFINITE


class CheckpointWriteError(JobStop):
    """A rank could not write its checkpoint file (disk full, quota, permissions)."""

    exit_code = EXIT_DISK


class PreemptFlag:
    """Asks the job to checkpoint and stop: SIGUSR1 or SIGTERM on this rank, or the file
    RUN_DIR/PREEMPT. The file works whatever the launcher does with signals (Open MPI
    5's mpirun forwards SIGUSR1 to the ranks, 4.x's does not); slurm/run.sh writes it
    when Slurm sends the time-limit signal.

    SIGTERM is what `scancel`, `kill` and a time limit without --signal send. Where the
    ranks get it with time to act (srun tasks: Slurm waits KillWait, 30 s by default,
    before SIGKILL) it is a preemption like SIGUSR1: checkpoint, exit 75. Open MPI's
    mpirun instead kills its ranks about 0.25 s after forwarding SIGTERM, so the
    handler first prints, at once, where the run can be resumed from (`note`)."""

    def __init__(self, stop_file: Path | None = None, announce: bool = False):
        self.signalled = False
        self.signal_name = None
        self.stop_file = stop_file
        self.announce = announce  # this rank prints the note on SIGTERM (the federator)
        self.note = "no checkpoint has been written yet"
        self._next_check = 0.0
        self._before = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._before[sig] = signal.signal(sig, self._handler)
            except (ValueError, AttributeError):  # not the main thread / no such signal
                pass

    def restore(self) -> None:
        """The signal handlers as they were before (a job run inside a longer process)."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._before = {}

    TERM_GRACE = 10.0  # seconds a rank may take to stop cleanly after SIGTERM

    def _handler(self, signum, frame):
        self.signalled = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGTERM and not getattr(self, "_watchdog", None):
            # SIGTERM also comes from the launcher taking the job down after another rank
            # failed (MPI_Abort, kill -9): then the collective this rank waits in never
            # completes. Whatever happens, this process is gone TERM_GRACE seconds later.
            import threading

            self._watchdog = threading.Timer(self.TERM_GRACE, os._exit, args=(128 + signum,))
            self._watchdog.daemon = True
            self._watchdog.start()
        if signum == signal.SIGTERM and self.announce:
            msg = (
                f"fedmpi: SIGTERM received (scancel, kill or a time limit): stopping; "
                f"{self.note}. For a clean checkpoint-and-exit send SIGUSR1 or create "
                f"RUN_DIR/{STOP_FILE} instead (slurm/run.sh does so at the time limit).\n"
            )
            try:
                os.write(2, msg.encode())
            except OSError:
                pass

    @property
    def requested(self) -> bool:
        if not self.signalled and self.stop_file is not None:
            now = time.monotonic()
            if now >= self._next_check:  # a stat per second at most (shared filesystems)
                self._next_check = now + 1.0
                self.signalled = self.stop_file.exists()
        return self.signalled


class StopTraining(Exception):
    """Raised from a training step's callback when a stop was requested mid-round."""


def report_errors(job, error: str | None) -> None:
    """Allgather one optional error per rank; if any, the federator shows them (grouped
    by message) and every rank raises SetupError together."""
    errors = job.world.allgather(error)
    if not any(errors):
        return
    if job.world.is_federator:
        by_message: dict = {}
        for rank, msg in enumerate(errors):
            if msg:
                by_message.setdefault(msg, []).append(str(rank))
        for msg, ranks in by_message.items():
            who = "" if job.solo else f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)})"
            job.log(f"error{who}: {msg}")
    raise SetupError("set-up failed")
