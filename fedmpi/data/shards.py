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
from typing import NamedTuple

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
    try:
        marker = f.attrs.get("format")
    except OSError:  # damaged attribute storage
        marker = None
    if marker != SHARDS_FORMAT:
        f.close()
        raise DataError(
            f"{path}: not a fedmpi shards file (no '{SHARDS_FORMAT}' format "
            f"attribute); write it with `python -m fedmpi.data split`"
        )
    return f


class ShardSpec(NamedTuple):
    """What the configured dataset needs of a shard: its name (compared with the file's
    'dataset' attribute), (C, H, W) of every image, and the number of classes."""

    dataset: str
    image_shape: tuple[int, int, int]
    num_classes: int


def _clients_attr(f) -> int | None:
    try:
        return int(f.attrs["num_clients"])
    except (KeyError, OSError, TypeError, ValueError):
        return None


def _fix(path, f) -> str:
    """The one fix of a bad shards file: write it again."""
    k = _clients_attr(f)
    return (
        f"rewrite the shards with `python -m fedmpi.data split --config CONFIG "
        f"--clients {'K' if k is None else k} --out {path}`"
    )


def _check_group(path, f, name: str, spec: ShardSpec | None, min_images: int) -> None:
    """Every check of one group that its HDF5 metadata answers (no pixel is read).

    Raises DataError with one line: the file, the dataset inside it, what is wrong, the fix.
    """
    g = f[name]
    images = g["images"]
    where, fix = f"{path}: /{name}", _fix(path, f)
    if images.dtype != np.uint8:
        nan = " (NaN possible)" if images.dtype.kind in "fc" else ""
        raise DataError(
            f"{where}/images holds {images.dtype} images{nan}; shards hold uint8 pixels; {fix}"
        )
    if images.ndim != 4:
        raise DataError(f"{where}/images is shaped {images.shape}, not (N, C, H, W); {fix}")
    if spec is not None and tuple(images.shape[1:]) != spec.image_shape:
        c, h, w = spec.image_shape
        raise DataError(
            f"{where}/images are {'x'.join(map(str, images.shape[1:]))} (C x H x W) but "
            f"{spec.dataset} images are {c}x{h}x{w}; {fix}"
        )
    n = images.shape[0]
    if n < min_images:
        raise DataError(f"{where} holds no images; every client needs at least one; {fix}")
    for key in ("labels", "indices") if "indices" in g else ("labels",):
        d = g[key]
        if d.ndim != 1 or d.shape[0] != n or d.dtype.kind not in "iu":
            raise DataError(
                f"{where}/{key} is {d.dtype} shaped {d.shape} for {n} images; "
                f"{key} are 1-D integers, one per image; {fix}"
            )


def _check_labels(path, f, name: str, labels: np.ndarray, spec: ShardSpec | None) -> None:
    if spec is None or not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= spec.num_classes:
        raise DataError(
            f"{path}: /{name}/labels hold values in [{lo}, {hi}], outside "
            f"[0, {spec.num_classes}) of {spec.dataset}; {_fix(path, f)}"
        )


def _read_group(path, f, name: str, spec: ShardSpec | None, min_images: int = 0):
    """(images, labels[, indices]) of one group, checked: the metadata first, then the
    labels' range, then the images."""
    try:
        _check_group(path, f, name, spec, min_images)
        g = f[name]
        labels = g["labels"][()]
        _check_labels(path, f, name, labels, spec)
        rest = (g["indices"][()],) if "indices" in g else ()
        return (g["images"][()], labels.astype(np.int64, copy=False), *rest)
    except DataError:
        raise
    except (KeyError, OSError, ValueError, TypeError, AttributeError) as e:
        # a missing dataset (KeyError), a group where a dataset belongs (AttributeError),
        # damaged data or metadata (OSError)
        raise DataError(
            f"{path}: group '{name}' is missing or damaged ({e}); {_fix(path, f)}"
        ) from None


def _check_dataset(path, f, spec: ShardSpec | None) -> None:
    held = f.attrs.get("dataset", "")
    if spec is not None and held and held != spec.dataset:
        raise DataError(f"{path} holds {held} but data.dataset is {spec.dataset}")


def read_shard(
    path: str | Path, client: int, spec: ShardSpec | None = None, num_clients: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, original indices) of one client; reads only that group.

    Checked, never trusted: uint8 images shaped (N, C, H, W) with N >= 1, one integer
    label per image, and with `spec` the dataset's name, (C, H, W) and label range, with
    `num_clients` the number the file was split for; DataError otherwise.
    """
    with _open_shards(path) as f:
        _check_dataset(path, f, spec)
        k = _num_clients(path, f)
        if num_clients is not None and k != num_clients:
            raise DataError(
                f"{path} was split for {k} clients but {num_clients} are running; re-run "
                f"`python -m fedmpi.data split --clients {num_clients}` or change the "
                f"number of processes"
            )
        if not (isinstance(client, (int, np.integer)) and 0 <= client < k):
            raise DataError(
                f"{path} holds {k} clients (numbered 0..{k - 1}); "
                f"client {client!r} is not one of them"
            )
        images, labels, indices = _read_group(path, f, f"client_{client}", spec, min_images=1)
    return images, labels, indices


def read_test(path: str | Path, spec: ShardSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the test group, checked as read_shard checks a client's."""
    with _open_shards(path) as f:
        _check_dataset(path, f, spec)
        images, labels = _read_group(path, f, "test", spec)[:2]
    return images, labels


def _num_clients(path, f) -> int:
    k = _clients_attr(f)
    if k is None:
        raise DataError(f"{path}: no readable 'num_clients' attribute; {_fix(path, f)}")
    return k


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
