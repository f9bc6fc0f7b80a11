"""What can go wrong that a user can fix, and the exit code each ending gets.

Every entry point maps an exception to exactly one of these codes (`exit_code`), on every
rank. Nothing here imports anything: every package may raise these.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNHANDLED = 1  # a bug: the traceback is printed and the whole MPI job is aborted
EXIT_USER_ERROR = 2  # bad config, data, weights or checkpoint: the message names the fix
EXIT_NONFINITE = 3  # a client's update or the average was NaN / inf (fed.on_nonfinite: abort)
EXIT_DISK = 4  # a folder or a write failed (disk full, quota, permissions); checkpoints intact
EXIT_STALLED = 5  # a rank did not reach a collective within fed.round_timeout
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the last complete round is checkpointed; resubmit to resume
EXIT_INTERRUPTED = 130  # Ctrl-C


class UserError(ValueError):
    """A problem the user can fix (the message says how); exit 2."""


class ConfigError(UserError):
    """A config file or override is wrong: unknown key, wrong type, impossible value."""


class DataError(UserError):
    """Data files are missing, corrupt or do not fit (shards file, dataset folder)."""


class CheckpointError(RuntimeError):
    """A checkpoint file is unsafe, corrupt or does not fit this run; exit 2."""


class DiskError(OSError):
    """Writing a file or making a folder failed; the message names the reason and the path.
    Exit 4: earlier checkpoints are intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class StallError(RuntimeError):
    """The slowest rank did not arrive at a collective within fed.round_timeout; exit 5."""


def exit_code(error: BaseException) -> int:
    """The exit code for an error that ends a job or a command."""
    if isinstance(error, (UserError, CheckpointError)):
        return EXIT_USER_ERROR
    if isinstance(error, DiskError):
        return EXIT_DISK
    if isinstance(error, StallError):
        return EXIT_STALLED
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return getattr(error, "exit_code", EXIT_UNHANDLED)
