"""Run folders, atomic checkpoints, safe loading and verified resume points.

Layout of a run folder::

    RUN_DIR/config.yaml                 resolved config
    RUN_DIR/metrics.jsonl, eval.csv, comm.csv, comm_summary.json, samples/*.png
    RUN_DIR/checkpoints/round_000004/   federator.pt, client_001.pt, ..., COMPLETE

Every file goes through `atomic.atomic_write` (temporary name, fsync, rename), so a
crash never leaves a half-written checkpoint. A checkpoint folder counts only once its
COMPLETE marker exists; rank 0 writes the marker after every rank has saved its file,
and the marker records the sha256 of every file (JSON). `verified_checkpoints` lists
the complete rounds whose files still match their hashes, newest first, so a resume
falls back past a truncated or corrupted newest round. Old checkpoints are pruned only
after a newer one is complete (and, by the round loop, finite).

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
import time
from pathlib import Path
from typing import Optional

import torch

from .atomic import atomic_write, sha256_file
from .config import Config, save_config

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint file is unsafe, corrupt or does not fit this run."""


def atomic_save(obj, path: Path) -> str:
    """torch.save `obj` to `path` atomically; returns the file's sha256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getbuffer())


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
        raise CheckpointError(f"{path} is unreadable (corrupt or truncated?): "
                              f"{type(e).__name__}: {detail}") from None


def client_state(folder: Path, name: str, device="cpu") -> tuple[dict, dict]:
    """(full model state dict, checkpoint) of client file `name` in a checkpoint folder:
    the federator's model (the shared regions) overlaid with the client's own entries
    (its personal regions; a client file holding a whole model overrides everything)."""
    own = load_checkpoint(Path(folder) / name, device)
    state = dict(load_checkpoint(Path(folder) / "federator.pt", device)["model"])
    state.update(own["model"])
    return state, own


def new_run_dir(cfg: Config, name: Optional[str] = None) -> Path:
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


def mark_complete(run_dir: Path, index: int, keep: int, files: Optional[dict] = None) -> None:
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


def latest_complete(run_dir: Path) -> Optional[int]:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def verify(run_dir: Path, index: int) -> Optional[str]:
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
            return f"{p} does not match the sha256 recorded when it was written (corrupt or truncated)"
    return None


def marker_files(run_dir: Path, index: int) -> dict:
    """{file name: sha256} recorded in checkpoint `index`'s marker ({} for old markers)."""
    try:
        record = json.loads((checkpoint_dir(run_dir, index) / MARKER).read_text())
        return dict(record.get("files", {})) if isinstance(record, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def newest_verified(run_dir: Path, warn=print) -> Optional[int]:
    """The newest complete checkpoint whose files verify; warns about each one skipped."""
    for index in reversed(complete_checkpoints(run_dir)):
        problem = verify(run_dir, index)
        if problem is None:
            return index
        warn(f"warning: checkpoint of round {index} is unusable: {problem}; "
             f"falling back to an earlier one")
    return None
