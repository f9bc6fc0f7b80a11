"""CelebA at 64 x 64 (the reference's CelebA configuration): reading and caching.

Two layouts under a data root (data.root, ./data or ~/.cache/fedmpi/data):

- torchvision's (what `torchvision.datasets.CelebA(download=True)` writes, data.download):
  <root>/celeba/img_align_celeba/*.jpg with <root>/celeba/list_eval_partition.txt
  (0 train, 1 valid, 2 test): the training split is partition 0 (162,770 images), the
  test split partition 2 (19,962);
- an image folder: <root>/celeba/train/ and <root>/celeba/test/, images (.jpg, .jpeg,
  .png) at any depth, in sorted path order.

Every image is center-cropped to a square of its shorter side and resized to 64 x 64
(PIL, bicubic with antialiasing), as uint8 (N, 3, 64, 64). CelebA has no class labels
here: every label is 0 (one class), so IID and quantity-skew splits apply. Decoding
about 200,000 JPEGs takes minutes, so the array is cached once per folder and split under
~/.cache/fedmpi/data (written atomically; later jobs and every rank read the cache).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from fedmpi.errors import DataError

SIZE = 64
DIR = "celeba"
PARTITION = {"train": "0", "test": "2"}
SUFFIXES = (".jpg", ".jpeg", ".png")
EXPECTED = (
    f"{DIR}/img_align_celeba/*.jpg + {DIR}/list_eval_partition.txt (torchvision CelebA "
    f"layout), or images under {DIR}/train/ and {DIR}/test/"
)


def _torchvision_files(root: Path, split: str) -> list[Path] | None:
    folder, part = root / DIR / "img_align_celeba", root / DIR / "list_eval_partition.txt"
    if not (folder.is_dir() and part.is_file()):
        return None
    names = []
    for line in part.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == PARTITION[split]:
            names.append(folder / fields[0])
    return names


def _folder_files(root: Path, split: str) -> list[Path] | None:
    folder = root / DIR / split
    if not folder.is_dir():
        return None
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def files(root: Path, split: str) -> list[Path] | None:
    """The split's image files under `root` (torchvision's layout first), or None."""
    found = _torchvision_files(root, split)
    return found if found is not None else _folder_files(root, split)


def has_split(root: Path, split: str) -> bool:
    return bool(files(root, split))


def to_64(path: Path) -> np.ndarray:
    """One image, center-cropped to a square and resized to 64 x 64: uint8 (3, 64, 64)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        img = img.resize((SIZE, SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _cache_path(paths: list[Path], split: str) -> Path:
    key = hashlib.sha256(
        "\n".join(
            [split, str(SIZE), str(len(paths))] + [str(p.resolve()) for p in paths[:1]]
        ).encode()
    ).hexdigest()[:16]
    return Path.home() / ".cache" / "fedmpi" / "data" / f"celeba{SIZE}-{split}-{key}.npy"


def load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 3, 64, 64), int64 zeros (N,)) of a split, from the cache when present."""
    paths = files(root, split)
    if not paths:
        raise DataError(f"celeba: no {split} images under {root} (expected {EXPECTED})")
    cache = _cache_path(paths, split)
    if cache.is_file():
        images = np.load(cache, mmap_mode=None, allow_pickle=False)
        if images.shape == (len(paths), 3, SIZE, SIZE) and images.dtype == np.uint8:
            return images, np.zeros(len(images), dtype=np.int64)
    images = np.empty((len(paths), 3, SIZE, SIZE), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            images[i] = to_64(p)
        except (OSError, ValueError) as e:
            raise DataError(f"celeba: cannot read image {p}: {e}") from None
    try:  # best effort: a read-only home only costs the next job the decoding again
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, images, allow_pickle=False)
        os.replace(tmp, cache)
    except OSError:
        pass
    return images, np.zeros(len(images), dtype=np.int64)
