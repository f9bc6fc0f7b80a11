"""The one way fedmpi writes a file that must never be seen half-written.

`atomic_write(path, data)` writes bytes or text to a temporary file in the same folder
and renames it over `path`: a reader (or a resume after a crash)
sees the old file or the new one, never a mix. Checkpoints, markers, logs rewritten on
resume, configs and CSV tables all go through it.

A failed write (disk full, quota, read-only file system, file too large) removes the
temporary file, leaves the old file untouched, and raises `DiskError` whose message
names the OS error and the path ("No space left on device while writing runs/x/...").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedmpi.errors import EXIT_DISK, DiskError  # noqa: F401  (re-exported for callers)


def atomic_write(path: str | Path, data: bytes | str) -> str:
    """Write `data` to `path` atomically; returns the sha256 hex digest of the bytes."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # No fsync (costly on shared file systems): the rename protects against a
        # crashed process; after a node crash a renamed file may still be incomplete,
        # which the sha256 recorded in a checkpoint's COMPLETE marker detects on resume.
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = e.strerror or str(e)
        raise DiskError(e.errno, f"{reason} while writing {path}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
