"""Metric files of a run: JSON lines (one row per event) and CSV tables, plus sample grids."""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed job loses nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row) -> None:
        row.setdefault("time", round(time.time(), 3))
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV file, writing the header when the file is new."""
    if not rows:
        return
    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    save_image(images.detach().float().cpu().add(1).div(2).clamp(0, 1), path, nrow=nrow, padding=2)
