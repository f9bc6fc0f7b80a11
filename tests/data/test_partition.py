"""Client splits: complete, disjoint, deterministic, and skewed the way they claim."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fedmpi.data.partition import (
    client_table,
    plot_report,
    save_report_json,
    split_indices,
    split_table,
)

FMNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
KINDS = ("iid", "label_skew", "quantity_skew", "shards")


@pytest.fixture(scope="module")
def labels():
    """Real Fashion-MNIST training labels when installed, else a balanced stand-in."""
    if FMNIST_LABELS.is_file():
        with gzip.open(FMNIST_LABELS, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))


def tv_from_global(labels, parts, min_size=0):
    """Mean total-variation distance of each client's class mix from the global mix."""
    glob = np.bincount(labels, minlength=10) / len(labels)
    return np.mean(
        [
            0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum()
            for p in parts
            if len(p) >= min_size
        ]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_complete_disjoint_sorted(labels, kind):
    parts = split_indices(labels, 5, kind)
    assert len(parts) == 5
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_in_seed(labels, kind):
    a = split_indices(labels, 5, kind, seed=7)
    b = split_indices(labels, 5, kind, seed=7)
    c = split_indices(labels, 5, kind, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_one_client_gets_everything(labels):
    for kind in KINDS:
        (p,) = split_indices(labels, 1, kind)
        assert np.array_equal(p, np.arange(len(labels)))


def test_iid_equal_and_balanced(labels):
    parts = split_indices(labels, 5, "iid")
    assert {len(p) for p in parts} == {12000}
    assert tv_from_global(labels, parts) < 0.03


def test_label_skew_is_skewed_and_meets_min_size(labels):
    for seed in (2023, 1, 2):
        parts = split_indices(labels, 10, "label_skew", beta=0.5, min_size=10, seed=seed)
        assert min(len(p) for p in parts) >= 10
        assert tv_from_global(labels, parts) > 0.3
    # larger beta -> closer to IID
    mild = split_indices(labels, 10, "label_skew", beta=100.0, seed=2023)
    assert tv_from_global(labels, mild) < 0.1


def test_quantity_skew_sizes_uneven_labels_iid(labels):
    parts = split_indices(labels, 5, "quantity_skew", beta=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10
    assert sizes.max() > 2 * sizes.min()
    assert tv_from_global(labels, parts, min_size=1000) < 0.05


@pytest.mark.parametrize("k,c", [(5, 2), (10, 3), (3, 4), (4, 10)])
def test_shards_exact_classes_per_client(labels, k, c):
    parts = split_indices(labels, k, "shards", classes_per_client=c, seed=3)
    for p in parts:
        assert len(np.unique(labels[p])) == c


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_clients=11, kind="iid"), "more clients than samples"),
        (dict(num_clients=0, kind="iid"), "positive"),
        (dict(num_clients=2, kind="bogus"), "unknown split kind"),
        (dict(num_clients=3, kind="label_skew", min_size=5), "min_size=5"),
        (dict(num_clients=3, kind="quantity_skew", min_size=4), "min_size=4"),
        (dict(num_clients=2, kind="shards", classes_per_client=1), "cannot cover"),
        (dict(num_clients=2, kind="shards", classes_per_client=5), "between 1 and"),
    ],
)
def test_impossible_requests_raise(kwargs, match):
    tiny = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=match):
        split_indices(tiny, **kwargs)


def test_unreachable_min_size_gives_up_clearly():
    # 2 classes of 10, 20 clients of min 1: with beta tiny each class goes to ~1 client
    labels = np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match=r"beta=1e-05.*min_size=1"):
        split_indices(labels, 20, "label_skew", beta=1e-5, min_size=1)


def test_reports(labels, tmp_path):
    parts = split_indices(labels, 3, "label_skew", seed=5)
    rows = client_table(labels, parts, 10)
    assert [r["size"] for r in rows] == [len(p) for p in parts]
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9
    assert sum(sum(r["histogram"]) for r in rows) == len(labels)
    text = split_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["client", "size", "share"] and lines[0].split()[-1] == "c9"
    assert lines[-1].split()[:2] == ["total", str(len(labels))]
    save_report_json(rows, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["clients"] == rows
    plot_report(rows, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
