"""HDF5 client shards: the file `python -m fedmpi.data split --out` writes.

Owns the shards format (fedmpi-shards-v1): one group per client (images, labels,
original indices) plus `test`, and the file's attributes (dataset, split kind, seed,
sizes, the whole meta as JSON). A client reads only its own group; the federator only
`test`. Written to a temporary file and renamed, so readers never see half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fedmpi.errors import DataError

SHARDS_FORMAT = "fedmpi-shards-v1"


def write_shards(
    path: str | Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    parts: list[np.ndarray],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    meta: dict,
) -> None:
    """One group per client (images, labels, original indices) plus `test`; atomic.

    meta should hold 'dataset', 'split_kind' and 'seed' (stored as attributes of
    their own for quick checks); all of it is also stored as JSON.
    """
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = SHARDS_FORMAT
            f.attrs["num_clients"] = len(parts)
            f.attrs["dataset"] = str(meta.get("dataset", ""))
            f.attrs["split_kind"] = str(meta.get("split_kind", ""))
            f.attrs["seed"] = int(meta.get("seed", -1))
            f.attrs["sizes"] = np.array([len(p) for p in parts], dtype=np.int64)
            f.attrs["meta"] = json.dumps(meta)
            for k, idx in enumerate(parts):
                _write_group(f.create_group(f"client_{k}"), train_images[idx], train_labels[idx])
                f[f"client_{k}"].create_dataset("indices", data=np.asarray(idx, dtype=np.int64))
            _write_group(f.create_group("test"), test_images, test_labels)
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)


def _write_group(group, images, labels) -> None:
    # gzip level 1 with per-image chunks: small files, fast enough on 2 cores, and any
    # HDF5 tool can read it (lzf is h5py-only).
    chunks = (min(len(images), 1024),) + images.shape[1:] if len(images) else None
    group.create_dataset(
        "images",
        data=np.asarray(images, dtype=np.uint8),
        chunks=chunks,
        compression="gzip" if len(images) else None,
        compression_opts=1 if len(images) else None,
    )
    group.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))


def _open_shards(path: str | Path):
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"shards file {path} does not exist; write it with "
            f"`python -m fedmpi.data split --config CONFIG --out {path}`"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    if f.attrs.get("format") != SHARDS_FORMAT:
        f.close()
        raise DataError(
            f"{path}: not a fedmpi shards file (no '{SHARDS_FORMAT}' format "
            f"attribute); write it with `python -m fedmpi.data split`"
        )
    return f


def _read_group(path, f, name: str) -> tuple[np.ndarray, ...]:
    try:
        g = f[name]
        keys = ("images", "labels", "indices") if "indices" in g else ("images", "labels")
        return tuple(g[key][()] for key in keys)
    except (KeyError, OSError) as e:
        raise DataError(f"{path}: group '{name}' is missing or damaged ({e})") from None


def read_shard(path: str | Path, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, original indices) of one client; reads only that group."""
    with _open_shards(path) as f:
        k = int(f.attrs["num_clients"])
        if not (isinstance(client, (int, np.integer)) and 0 <= client < k):
            raise DataError(
                f"{path} holds {k} clients (numbered 0..{k - 1}); "
                f"client {client!r} is not one of them"
            )
        images, labels, indices = _read_group(path, f, f"client_{client}")
    return images, labels, indices


def read_test(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with _open_shards(path) as f:
        images, labels = _read_group(path, f, "test")[:2]
    return images, labels


def shards_info(path: str | Path) -> dict:
    """The file's attributes, with 'meta' decoded from JSON."""
    with _open_shards(path) as f:
        info = {
            k: (
                v.tolist()
                if isinstance(v, np.ndarray)
                else v.item()
                if isinstance(v, np.generic)
                else v
            )
            for k, v in f.attrs.items()
        }
    info["meta"] = json.loads(info.get("meta", "{}"))
    return info
