"""Datasets: finding and reading image files, and each client's part of them.

Owns where data comes from. Images are uint8 numpy arrays shaped (N, C, H, W) with
int64 labels; `to_float` turns them into a float tensor in [-1, 1] for the model.
Fashion-MNIST and MNIST are read straight from IDX files (flat or torchvision's
`<root>/FashionMNIST/raw/` layout); CIFAR-10 goes through torchvision; CelebA (celeba.py)
from torchvision's layout or an image folder, center-cropped to 64 x 64. A client gets
its part either from an HDF5 shards file (`data.shards`, shards.py: one group per
client, and a client reads only its own group) or by recomputing the deterministic
split. The `split` CLI that writes shards files is fedmpi.cli.data.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedmpi.config import Config, DataCfg
from fedmpi.data import celeba
from fedmpi.data.partition import split_indices
from fedmpi.data.shards import ShardSpec, read_shard, read_test, shards_info
from fedmpi.errors import DataError

# dataset -> (channels, image_size, num_classes)
INFO = {
    "fashion_mnist": (1, 28, 10),
    "mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "celeba": (3, 64, 1),  # unlabelled (one class): IID / quantity-skew splits, FID
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_DIR = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
CIFAR_DIR = "cifar-10-batches-py"


def dataset_info(name: str) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of a dataset name."""
    if name not in INFO:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(INFO)}")
    return INFO[name]


def to_float(images_uint8):
    """uint8 (N, C, H, W) array or tensor -> float32 tensor scaled to [-1, 1]."""
    import torch  # imported here so the split CLI and partition work stay torch-free

    t = (
        images_uint8
        if isinstance(images_uint8, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(images_uint8))
    )
    return t.float() / 127.5 - 1.0


# ---------------------------------------------------------------- locating files


def _candidates(data_cfg: DataCfg) -> list[Path]:
    if data_cfg.root:
        return [Path(data_cfg.root).expanduser()]
    roots = [Path("data"), Path.home() / ".cache" / "fedmpi" / "data"]
    if data_cfg.dataset == "fashion_mnist":  # the Debian package dataset-fashion-mnist
        roots.insert(0, Path("/usr/share/datasets/fashion-mnist"))
    return roots


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / (name + ".gz"), folder / name):
        if candidate.is_file():
            return candidate
    return None


def _data_dir(root: Path, dataset: str, splits=("train", "test")) -> Path | None:
    """The folder under root that holds the dataset's files of `splits`, or None (a
    federator's root holds the test split alone)."""
    if dataset == "cifar10":
        first = {"train": "data_batch_1", "test": "test_batch"}
        return root if all((root / CIFAR_DIR / first[s]).is_file() for s in splits) else None
    if dataset == "celeba":
        return root if all(celeba.has_split(root, s) for s in splits) else None
    names = [n for s in splits for n in IDX_FILES[s]]
    for folder in (root, root / TORCHVISION_DIR[dataset] / "raw"):
        if all(_find_file(folder, n) for n in names):
            return folder
    return None


def _expected(dataset: str) -> str:
    if dataset == "cifar10":
        return f"{CIFAR_DIR}/ (torchvision CIFAR10 layout)"
    if dataset == "celeba":
        return celeba.EXPECTED
    names = IDX_FILES["train"] + IDX_FILES["test"]
    return (
        ", ".join(n + ".gz" for n in names)
        + f" (directly in the root or in <root>/{TORCHVISION_DIR[dataset]}/raw/)"
    )


def _missing_message(data_cfg: DataCfg, extra: str = "") -> str:
    searched = ", ".join(str(p.resolve()) for p in _candidates(data_cfg))
    hint = (
        "  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
        "(installs /usr/share/datasets/fashion-mnist)\n"
        if data_cfg.dataset == "fashion_mnist"
        else ""
    )
    return (
        f"{data_cfg.dataset} data not found. Searched: {searched}. "
        f"Expected files: {_expected(data_cfg.dataset)}.{extra}\nTo get them:\n{hint}"
        f"  - copy the files somewhere and set data.root (e.g. --data.root=/path/to/data)\n"
        f"  - run once on a machine with internet with data.download=true "
        f"(torchvision downloads into data.root or ./data)"
    )


def find_root(data_cfg: DataCfg, splits=("train", "test")) -> Path:
    """The data root: data.root if set, else the first candidate that holds the files
    of `splits`.

    Raises DataError naming every place searched when nothing is found.
    """
    dataset_info(data_cfg.dataset)
    for root in _candidates(data_cfg):
        if _data_dir(root, data_cfg.dataset, splits) is not None:
            return root
    raise DataError(_missing_message(data_cfg))


def _download(dataset: str, root: Path) -> None:
    """torchvision's downloader; writes the torchvision layout under root."""
    import torchvision.datasets as tvd

    if dataset == "celeba":
        tvd.CelebA(str(root), split="all", target_type=[], download=True)
        return
    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[dataset]
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _download_root(data_cfg: DataCfg, split: str) -> Path:
    """data.root (or ./data) after torchvision's download into it (data.download)."""
    root = Path(data_cfg.root).expanduser() if data_cfg.root else Path("data")
    try:
        _download(data_cfg.dataset, root)
    except Exception as e:  # no network, proxy, disk full...: all end the same way
        raise DataError(
            _missing_message(
                data_cfg, f" Download into {root.resolve()} failed: {type(e).__name__}: {e}."
            )
        ) from None
    if _data_dir(root, data_cfg.dataset, (split,)) is None:
        raise DataError(_missing_message(data_cfg, " The download left no usable files."))
    return root


# ---------------------------------------------------------------- reading files


def read_idx(path: str | Path) -> np.ndarray:
    """Strict IDX reader (unsigned-byte data only), gzip or raw, by file name."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    # BadGzipFile is an OSError, a truncated gzip an EOFError, damaged deflate data zlib.error
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot read ({type(e).__name__}: {e}); the file is corrupt "
            f"or truncated, delete it and fetch it again"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX size mismatch: dimensions {dims} need {expected} data "
            f"bytes, file has {len(raw) - header} (truncated or corrupt)"
        )
    # copy: arrays over the read-only bytes object would be read-only (torch warns)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _load_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_name, lbl_name = IDX_FILES[split]
    img_path, lbl_path = _find_file(folder, img_name), _find_file(folder, lbl_name)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected images shaped (N, H, W), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{lbl_path}: {labels.shape} labels do not match {len(images)} images in {img_path}"
        )
    return images[:, None], labels.astype(np.int64)


def _load_cifar(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        # Read as torchvision does, but alone: torchvision's CIFAR10 opens (checksums)
        # every training batch too, which the federator does not hold and must not read.
        import pickle

        path = root / CIFAR_DIR / "test_batch"
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return images, np.asarray(entry["labels"], dtype=np.int64)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise DataError(f"{path}: cannot read CIFAR-10 ({type(e).__name__}: {e})") from None
    import torchvision.datasets as tvd

    try:
        ds = tvd.CIFAR10(str(root), train=(split == "train"), download=False)
    except Exception as e:  # torchvision raises RuntimeError for a failed integrity check
        raise DataError(f"{root / CIFAR_DIR}: cannot read CIFAR-10 ({e})") from None
    images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return images, np.asarray(ds.targets, dtype=np.int64)


def load_arrays(data_cfg: DataCfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64) of the train or test split."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        root = find_root(data_cfg, (split,))  # only this split's files need to exist
    except DataError:
        if not data_cfg.download:
            raise
        root = _download_root(data_cfg, split)
    folder = _data_dir(root, data_cfg.dataset, (split,))
    if data_cfg.dataset == "cifar10":
        images, labels = _load_cifar(folder, split)
    elif data_cfg.dataset == "celeba":
        images, labels = celeba.load(folder, split)
    else:
        images, labels = _load_idx(folder, split)
    subset = data_cfg.train_subset if split == "train" else data_cfg.test_subset
    if subset is not None:  # larger than the dataset: everything
        images, labels = images[:subset], labels[:subset]
    return images, labels


# ---------------------------------------------------------------- per-client data


def _split_seed(cfg: Config) -> int:
    return cfg.split.seed if cfg.split.seed is not None else cfg.run.seed


def compute_split(cfg: Config, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """The configured split of these labels (same answer on every rank)."""
    s = cfg.split
    try:
        return split_indices(
            labels,
            num_clients,
            s.kind,
            beta=s.beta,
            min_size=s.min_size,
            classes_per_client=s.classes_per_client,
            seed=_split_seed(cfg),
            rng=s.rng,
        )
    except ValueError as e:
        raise DataError(
            f"cannot split {cfg.data.dataset} over {num_clients} clients: {e}"
        ) from None


def _shard_spec(cfg: Config) -> ShardSpec:
    """What a shard must hold for data.dataset (read_shard / read_test check it)."""
    channels, size, num_classes = dataset_info(cfg.data.dataset)
    return ShardSpec(cfg.data.dataset, (channels, size, size), num_classes)


def load_client_data(cfg: Config, client: int, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of client `client` (0-based) out of num_clients.

    From cfg.data.shards when set (data.train_subset was applied when the file was
    written), else by loading the training set and recomputing the split.
    """
    if not 0 <= client < num_clients:
        raise DataError(f"client {client} is out of range for {num_clients} clients")
    if cfg.split.num_clients is not None and cfg.split.num_clients != num_clients:
        raise DataError(
            f"split.num_clients is {cfg.split.num_clients} but {num_clients} "
            f"clients are running; make them agree (or set split.num_clients: null)"
        )
    if cfg.data.shards:
        spec = _shard_spec(cfg)
        images, labels, _ = read_shard(cfg.data.shards, client, spec, num_clients=num_clients)
        return images, labels
    images, labels = load_arrays(cfg.data, "train")
    part = compute_split(cfg, labels, num_clients)[client]
    return images[part], labels[part]


def client_sizes(cfg: Config, num_clients: int) -> list[int]:
    """Every client's number of training images (the shards file's record of them, or
    the split of the training labels), for placing clients on ranks."""
    if cfg.data.shards:
        info = shards_info(cfg.data.shards)
        sizes = [int(n) for n in info.get("sizes", [])]
        if len(sizes) != num_clients:
            raise DataError(
                f"{cfg.data.shards} was split for {len(sizes)} clients but {num_clients} "
                f"are running; re-run `python -m fedmpi.data split --clients {num_clients}` "
                f"or set --fed.clients={len(sizes)}"
            )
        return sizes
    _, labels = load_arrays(cfg.data, "train")
    return [len(p) for p in compute_split(cfg, labels, num_clients)]


def load_clients_data(cfg: Config, num_clients: int, choose) -> dict[int, np.ndarray]:
    """The training images of the clients `choose(sizes)` picks (0-based, out of
    num_clients) from every client's declared size: the training set is read and split
    once, for the sizes and the images alike (shards: the file's 'sizes' record, each
    loaded client checked against it)."""
    if not cfg.data.shards:
        images, labels = load_arrays(cfg.data, "train")
        parts = compute_split(cfg, labels, num_clients)
        return {c: images[parts[c]] for c in choose([len(p) for p in parts])}
    declared = client_sizes(cfg, num_clients)
    out = {}
    for c in choose(declared):
        out[c] = load_client_data(cfg, c, num_clients)[0]
        if len(out[c]) != declared[c]:
            raise DataError(
                f"{cfg.data.shards}: client {c} holds {len(out[c])} images but the file's "
                f"'sizes' record says {declared[c]}; write the file again with "
                f"`python -m fedmpi.data split`"
            )
    return out


def load_test_data(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The global test set (from the shards file when set), cut to data.test_subset."""
    if cfg.data.shards:
        images, labels = read_test(cfg.data.shards, _shard_spec(cfg))
        n = cfg.data.test_subset
        return (images[:n], labels[:n]) if n is not None else (images, labels)
    return load_arrays(cfg.data, "test")
