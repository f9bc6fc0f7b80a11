"""Run folders, atomic checkpoints and resume points.

Layout of a run folder::

    RUN_DIR/config.yaml                 resolved config
    RUN_DIR/metrics.jsonl, eval.csv, comm.csv, comm_summary.json, samples/*.png
    RUN_DIR/checkpoints/round_000004/   federator.pt, client_001.pt, ..., COMPLETE

Every file is written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint. A checkpoint folder counts only once its COMPLETE marker
exists; the marker is written by rank 0 after every rank has confirmed its own file,
so `--resume` continues from the last round that every rank completed.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .config import Config, save_config

MARKER = "COMPLETE"


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def mark_complete(run_dir: Path, index: int, keep: int) -> None:
    """Mark checkpoint `index` complete and delete complete ones beyond the newest `keep`."""
    d = checkpoint_dir(run_dir, index)
    atomic_write_text(f"{index}\n", d / MARKER)
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

