"""Data files: IDX parsing, locating data, HDF5 client shards and the split CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedmpi.data.datasets as D
import fedmpi.data.shards as S
from fedmpi.config import DataCfg, load_config

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def make_fake_fmnist(root: Path, n_train=200, n_test=50, layout="flat", gz=True):
    """A tiny Fashion-MNIST look-alike: pixel value = label * 10 + image number % 10."""
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.broadcast_to((labels * 10 + np.arange(n) % 10)[:, None, None], (n, 28, 28))
        img_name, lbl_name = D.IDX_FILES[split]
        ext = ".gz" if gz else ""
        D.write_idx(folder / (img_name + ext), images)
        D.write_idx(folder / (lbl_name + ext), labels)
        out[split] = (images, labels)
    return out


def test_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("a.idx", "a.idx.gz"):
        D.write_idx(tmp_path / name, a)
        assert np.array_equal(D.read_idx(tmp_path / name), a)
    # header by hand: magic 0x00000803, dims big-endian
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (2).to_bytes(4, "big")


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda b: b[:-7], "size mismatch"),
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "not unsigned byte"),
        (lambda b: b[:6], "truncated IDX header"),
    ],
)
def test_corrupt_idx_names_file(tmp_path, damage, match):
    path = tmp_path / "bad-images-idx3-ubyte"
    D.write_idx(path, np.zeros((4, 2, 2), np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(D.DataError, match=match) as e:
        D.read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    D.write_idx(path, np.zeros(1000, np.uint8) + 7)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(D.DataError, match="corrupt or truncated") as e:
        D.read_idx(path)
    assert str(path) in str(e.value)


def test_missing_root_message(tmp_path):
    cfg = DataCfg(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(D.DataError) as e:
        D.load_arrays(cfg, "train")
    msg = str(e.value)
    for needle in (
        str(tmp_path / "nowhere"),
        "train-images-idx3-ubyte.gz",
        "apt-get install dataset-fashion-mnist",
        "data.root",
        "data.download=true",
    ):
        assert needle in msg


def test_failed_download_is_data_error(tmp_path, monkeypatch):
    def offline(dataset, root):
        raise RuntimeError("no network")

    monkeypatch.setattr(D, "_download", offline)
    with pytest.raises(D.DataError, match="no network"):
        D.load_arrays(DataCfg(root=str(tmp_path), download=True), "test")


@pytest.mark.parametrize("layout,gz", [("flat", True), ("torchvision", True), ("flat", False)])
def test_layouts_and_subsets(tmp_path, layout, gz):
    fake = make_fake_fmnist(tmp_path, layout=layout, gz=gz)
    cfg = DataCfg(root=str(tmp_path), download=False, train_subset=30)
    assert D.find_root(cfg) == tmp_path
    images, labels = D.load_arrays(cfg, "train")
    assert images.shape == (30, 1, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images[:, 0], fake["train"][0][:30])
    assert np.array_equal(labels, fake["train"][1][:30])
    assert D.load_arrays(cfg, "test")[0].shape == (50, 1, 28, 28)


def test_dataset_info():
    assert D.dataset_info("fashion_mnist") == (1, 28, 10)
    assert D.dataset_info("cifar10") == (3, 32, 10)
    with pytest.raises(D.DataError):
        D.dataset_info("imagenet")


@needs_fmnist
def test_real_fashion_mnist():
    cfg = DataCfg(download=False)
    assert D.find_root(cfg) == FMNIST
    x, y = D.load_arrays(cfg, "train")
    xt, yt = D.load_arrays(cfg, "test")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert np.array_equal(np.bincount(y), np.full(10, 6000))
    f = D.to_float(x[:256])
    assert f.dtype.is_floating_point and tuple(f.shape) == (256, 1, 28, 28)
    assert f.min().item() == -1.0 and f.max().item() == 1.0


def write_fake_shards(tmp_path, k=3):
    fake = make_fake_fmnist(tmp_path / "raw")
    (xi, yi), (xt, yt) = fake["train"], fake["test"]
    xi, xt = xi[:, None], xt[:, None]
    parts = D.split_indices(yi, k, "label_skew", min_size=5, seed=1)
    path = tmp_path / "shards.h5"
    S.write_shards(
        path,
        xi,
        yi,
        parts,
        xt,
        yt,
        {"dataset": "fashion_mnist", "split_kind": "label_skew", "seed": 1},
    )
    return path, xi, yi, parts, xt, yt


def test_shards_round_trip(tmp_path):
    path, xi, yi, parts, xt, yt = write_fake_shards(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away
    for k, part in enumerate(parts):
        images, labels, indices = S.read_shard(path, k)
        assert np.array_equal(indices, part)
        assert np.array_equal(images, xi[indices]) and np.array_equal(labels, yi[indices])
    images, labels = S.read_test(path)
    assert np.array_equal(images, xt) and np.array_equal(labels, yt)
    info = S.shards_info(path)
    assert info["num_clients"] == 3 and info["dataset"] == "fashion_mnist"
    assert info["split_kind"] == "label_skew" and info["seed"] == 1
    assert info["sizes"] == [len(p) for p in parts] and info["meta"]["seed"] == 1


def test_shards_errors(tmp_path):
    path = write_fake_shards(tmp_path)[0]
    with pytest.raises(D.DataError, match=r"holds 3 clients.*client 3"):
        S.read_shard(path, 3)
    with pytest.raises(D.DataError, match="does not exist"):
        S.read_shard(tmp_path / "nope.h5", 0)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(D.DataError, match="not a readable HDF5"):
        S.read_test(junk)
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(D.DataError, match="not a fedmpi shards file"):
        S.shards_info(tmp_path / "other.h5")


def test_load_client_data_split_and_shards(tmp_path):
    fake = make_fake_fmnist(tmp_path)
    over = {
        "data.root": str(tmp_path),
        "data.download": False,
        "split.kind": "label_skew",
        "split.min_size": 5,
    }
    cfg = load_config(None, over)
    x, y = D.load_arrays(cfg.data, "train")
    parts = D.split_indices(y, 4, "label_skew", min_size=5, seed=cfg.run.seed)
    got = [D.load_client_data(cfg, k, 4) for k in range(4)]
    for (gx, gy), p in zip(got, parts):
        assert np.array_equal(gx, x[p]) and np.array_equal(gy, y[p])
    # the same data through a shards file
    path = tmp_path / "s.h5"
    xt, yt = D.load_arrays(cfg.data, "test")
    S.write_shards(path, x, y, parts, xt, yt, {"dataset": "fashion_mnist"})
    scfg = load_config(None, {**over, "data.shards": str(path), "data.test_subset": 20})
    for (gx, gy), k in zip(got, range(4)):
        sx, sy = D.load_client_data(scfg, k, 4)
        assert np.array_equal(sx, gx) and np.array_equal(sy, gy)
    with pytest.raises(D.DataError, match="split for 4 clients but 5"):
        D.load_client_data(scfg, 0, 5)
    tx, ty = D.load_test_data(scfg)
    assert np.array_equal(tx, fake["test"][0][:20, None]) and len(ty) == 20


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "fedmpi.data", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_split_report_and_out(tmp_path):
    make_fake_fmnist(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tmp_path}\n  download: false\nsplit:\n  num_clients: 4\n")
    r = run_cli(
        "split",
        "--config",
        str(cfg),
        "--report",
        "--split.kind=shards",
        "--split.classes_per_client=3",
        "--out",
        str(tmp_path / "s.h5"),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "4 clients, split shards" in lines[0]
    assert lines[1].split()[:3] == ["client", "size", "share"]
    assert len([ln for ln in lines if ln.split() and ln.split()[0].isdigit()]) == 4
    assert S.shards_info(tmp_path / "s.h5")["num_clients"] == 4
    rows = json.loads((tmp_path / "r.json").read_text())["clients"]
    assert all(sum(1 for v in row["histogram"] if v) == 3 for row in rows)


def test_cli_errors_exit_2(tmp_path):
    r = run_cli("split", "--report", f"--data.root={tmp_path}", "--data.download=false")
    assert r.returncode == 2 and "--clients" in r.stderr
    r = run_cli(
        "split", "--clients", "2", "--report", f"--data.root={tmp_path}", "--data.download=false"
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not found" in r.stderr
    r = run_cli("split", "--clients", "2", "--report", "--split.kind=nope")
    assert r.returncode == 2 and "split.kind" in r.stderr
