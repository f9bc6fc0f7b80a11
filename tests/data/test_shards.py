"""HDF5 client shards are checked, never trusted (issue 25, item 3).

Each test writes a good shards file, damages one thing in it with h5py, and asserts that
reading it through the user's path (load_client_data / load_test_data with a config) is a
one-line DataError naming the file, the dataset inside it, what is wrong and the fix.
"""

import h5py
import numpy as np
import pytest

import fedmpi.data.datasets as D
import fedmpi.data.shards as S
from fedmpi.config import load_config

K = 3


def good_shards(path, n=24, n_test=10, size=28):
    """A valid fashion_mnist shards file of K clients (n // K images each) and a test set."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 1, size, size)).astype(np.uint8)
    y = np.arange(n) % 10
    parts = [np.arange(k, n, K) for k in range(K)]
    xt, yt = x[:n_test], y[:n_test]
    S.write_shards(path, x, y, parts, xt, yt, {"dataset": "fashion_mnist", "seed": 1})
    return path


def replace(path, name, array):
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = array


def cfg_for(path, dataset="fashion_mnist"):
    return load_config(None, {"data.shards": str(path), "data.dataset": dataset})


def refused(path, read, where, *needles):
    """The DataError of `read()`: one line naming the file, `where` and the fix."""
    with pytest.raises(D.DataError) as e:
        read()
    msg = str(e.value)
    assert "\n" not in msg, msg
    fix = f"rewrite the shards with `python -m fedmpi.data split --config CONFIG --clients {K} "
    for needle in (f"{path}: {where}", fix + f"--out {path}`", *needles):
        assert needle in msg, msg
    return msg


def client_1(path):
    return lambda: D.load_client_data(cfg_for(path), 1, K)


def test_good_shards_read_through_the_checks(tmp_path):
    path = good_shards(tmp_path / "s.h5")
    x, y = D.load_client_data(cfg_for(path), 1, K)
    assert x.shape == (8, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert D.load_test_data(cfg_for(path))[0].shape == (10, 1, 28, 28)


@pytest.mark.parametrize(
    "images, needles",
    [
        (np.zeros((8, 28, 28), np.uint8), ["is shaped (8, 28, 28), not (N, C, H, W)"]),
        (np.zeros((8, 1, 28, 28)), ["holds float64 images (NaN possible); shards hold uint8"]),
        (np.full((8, 1, 28, 28), np.nan, np.float32), ["float32 images (NaN possible)"]),
        (np.zeros((8, 1, 28, 28), np.int64), ["holds int64 images; shards hold uint8"]),
        (
            np.zeros((8, 1, 32, 32), np.uint8),
            ["images are 1x32x32 (C x H x W) but fashion_mnist images are 1x28x28"],
        ),
        (np.zeros((8, 3, 28, 28), np.uint8), ["images are 3x28x28 (C x H x W)"]),
    ],
)
def test_bad_client_images_are_refused(tmp_path, images, needles):
    path = good_shards(tmp_path / "s.h5")
    replace(path, "client_1/images", images)
    refused(path, client_1(path), "/client_1/images", *needles)
    D.load_client_data(cfg_for(path), 0, K)  # the other clients' groups are fine


def test_a_whole_file_of_another_image_size_is_refused(tmp_path):
    # a cifar-sized file (no 'dataset' attribute to give it away) read as fashion_mnist
    path = good_shards(tmp_path / "s.h5", size=32)
    with h5py.File(path, "r+") as f:
        del f.attrs["dataset"]
    refused(path, client_1(path), "/client_1/images", "1x32x32")
    refused(path, lambda: D.load_test_data(cfg_for(path)), "/test/images", "1x32x32")


@pytest.mark.parametrize(
    "labels, needles",
    [
        (np.array([0, 1, 2, 3, 4, 5, 6, 10]), ["labels hold values in [0, 10], outside [0, 10)"]),
        (np.array([-1, 1, 2, 3, 4, 5, 6, 7]), ["values in [-1, 7]", "of fashion_mnist"]),
        (np.arange(7), ["labels is int64 shaped (7,) for 8 images"]),
        (np.zeros((8, 1), np.int64), ["shaped (8, 1) for 8 images", "1-D integers"]),
        (np.zeros(8), ["labels is float64 shaped (8,)"]),
    ],
)
def test_bad_labels_are_refused(tmp_path, labels, needles):
    path = good_shards(tmp_path / "s.h5")
    replace(path, "client_1/labels", labels)
    refused(path, client_1(path), "/client_1/labels", *needles)


def test_bad_test_group_is_refused(tmp_path):
    path = good_shards(tmp_path / "s.h5")
    replace(path, "test/images", np.zeros((10, 1, 28, 28)))
    refused(path, lambda: D.load_test_data(cfg_for(path)), "/test/images", "float64")
    replace(path, "test/images", np.zeros((10, 1, 28, 28), np.uint8))
    replace(path, "test/labels", np.full(10, 12))
    refused(path, lambda: D.load_test_data(cfg_for(path)), "/test/labels", "[12, 12]")


def test_empty_client_is_refused(tmp_path):
    path = good_shards(tmp_path / "s.h5")
    replace(path, "client_1/images", np.zeros((0, 1, 28, 28), np.uint8))
    replace(path, "client_1/labels", np.zeros(0, np.int64))
    replace(path, "client_1/indices", np.zeros(0, np.int64))
    refused(path, client_1(path), "/client_1 holds no images", "at least one")


def test_test_set_of_another_dataset_is_refused(tmp_path):
    path = good_shards(tmp_path / "s.h5")  # 'dataset' attribute: fashion_mnist
    with pytest.raises(D.DataError, match="holds fashion_mnist but data.dataset is mnist"):
        D.load_test_data(cfg_for(path, "mnist"))


def test_missing_client_count_is_refused(tmp_path):
    path = good_shards(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        del f.attrs["num_clients"]
    with pytest.raises(D.DataError, match="no readable 'num_clients' attribute") as e:
        D.load_client_data(cfg_for(path), 1, K)
    assert "--clients K --out" in str(e.value)


def test_truncated_or_damaged_file_is_a_data_error(tmp_path):
    path = good_shards(tmp_path / "s.h5")
    raw = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataError, match="not a readable HDF5 file") as e:
        D.load_client_data(cfg_for(cut), 1, K)
    assert str(cut) in str(e.value)
    # the compressed pixels of client 1 overwritten: gzip refuses them
    with h5py.File(path, "r") as f:
        chunk = f["client_1/images"].id.get_chunk_info(0)
    damaged = bytearray(raw)
    start = chunk.byte_offset + 8
    damaged[start : start + 64] = bytes(b ^ 0xFF for b in damaged[start : start + 64])
    path.write_bytes(bytes(damaged))
    with pytest.raises(D.DataError, match="group 'client_1' is missing or damaged"):
        D.load_client_data(cfg_for(path), 1, K)
    D.load_client_data(cfg_for(path), 0, K)  # client 0 reads only its own group
