"""Feature statistics, Frechet distance, and the Inception / classifier extractors."""

import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from fedmpi.config import DataCfg, EvalCfg
from fedmpi.eval.classifier import classifier_cache_path, data_digest, load_or_train_classifier
from fedmpi.eval.extractors import (
    INCEPTION_FILE,
    INCEPTION_URL,
    InceptionExtractor,
    MissingWeightsError,
    build_extractor,
    build_fid_inception_net,
    check_inception_weights,
    compute_stats,
    reference_set,
)
from fedmpi.eval.fid import (
    FeatureStats,
    class_distribution,
    frechet_distance,
    frechet_distance_stats,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (dataset-fashion-mnist)",
)


# ---------------------------------------------------------------- Frechet distance


def random_orthogonal(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_commuting_closed_form():
    # Same eigenvectors: sqrt(S1 S2) = Q diag(sqrt(a b)) Q^T.
    rng = np.random.default_rng(2)
    q = random_orthogonal(8, rng)
    a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert got == pytest.approx(expected, rel=1e-7)


def test_frechet_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 10)), rng.normal(size=(30, 10)) * 1.5 + 0.3
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its sqrtm(disp=False)
        ref = calculate_frechet_distance(*args)
    assert frechet_distance(*args) == pytest.approx(ref, rel=1e-9)


# ---------------------------------------------------------------- FeatureStats


def test_running_stats_match_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(103, 7)) * 3 + 5
    s = FeatureStats(7)
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 103)):  # uneven batches, numpy and torch
        s.update(x[lo:hi] if lo % 2 else torch.from_numpy(x[lo:hi]))
    assert s.n == 103
    np.testing.assert_allclose(s.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_stats_array_round_trip_merge_and_save(tmp_path):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(33, 4)) + 1
    a, b = FeatureStats(4).update(x), FeatureStats(4).update(y)
    arr = a.to_array()
    assert arr.dtype == np.float64 and arr.shape == (1 + 4 + 16,)
    back = FeatureStats.from_array(arr, 4)
    assert back.n == 20 and np.array_equal(back.to_array(), arr)
    # Summing buffers (what an MPI reduce does) equals stats of the concatenation.
    both = FeatureStats(4).update(np.concatenate([x, y]))
    merged = FeatureStats.from_array(a.to_array() + b.to_array(), 4)
    for m in (merged, a + b):
        assert m.n == 53
        np.testing.assert_allclose(m.mean(), both.mean(), rtol=1e-12)
        np.testing.assert_allclose(m.cov(), both.cov(), rtol=1e-10)
    a.save(tmp_path / "a.npz")
    assert np.array_equal(FeatureStats.load(tmp_path / "a.npz").to_array(), arr)
    assert frechet_distance_stats(a, FeatureStats.load(tmp_path / "a.npz")) == pytest.approx(
        0, abs=1e-8
    )


def test_class_distribution():
    d = class_distribution(np.array([0, 0, 1, 2, 2, 2] + [3] * 94), 10)
    assert d["histogram"][:4] == [2, 1, 3, 94] and d["n"] == 100
    assert d["classes_present"] == 4 and d["classes_present_1pct"] == 4
    d = class_distribution(torch.arange(1000) % 10, 10)
    assert d["classes_present"] == 10 and d["kl_from_uniform"] == pytest.approx(0, abs=1e-12)
    d = class_distribution(np.full(50, 7), 10)
    assert d["classes_present"] == 1 and d["kl_from_uniform"] == pytest.approx(np.log(10))
    d = class_distribution(np.array([1] * 999 + [2]), 10)
    assert d["classes_present"] == 2 and d["classes_present_1pct"] == 1


# ---------------------------------------------------------------- Inception


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for cfg in (
        EvalCfg(extractor="inception"),
        EvalCfg(extractor="inception", inception_weights=str(tmp_path / "nope.pth")),
    ):
        with pytest.raises(MissingWeightsError) as e:
            build_extractor(cfg, "fashion_mnist", lambda: pytest.fail("loaded data"), "cpu")
        msg = str(e.value)
        assert isinstance(e.value, ValueError)
        assert INCEPTION_FILE in msg and INCEPTION_URL in msg and "curl" in msg
        assert "eval.extractor=classifier" in msg
        assert str(tmp_path / "hub" / "checkpoints") in msg


def test_inception_extractor_local_weights(tmp_path, monkeypatch):
    from pytorch_fid import inception as pfi

    torch.manual_seed(0)
    state = build_fid_inception_net().state_dict()  # random init stands in for the real file
    weights = tmp_path / INCEPTION_FILE
    torch.save(state, weights)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    cfg = EvalCfg(extractor="inception", inception_weights=str(weights))
    assert check_inception_weights(cfg) == weights
    # Any attempt to download would fail the test.
    with mock.patch.object(
        pfi, "load_state_dict_from_url", side_effect=AssertionError("tried to download")
    ):
        ext = build_extractor(cfg, "fashion_mnist", lambda: pytest.fail("loaded data"), "cpu")
    assert isinstance(ext, InceptionExtractor) and ext.name == "fid" and ext.dim == 2048
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    feats = ext.features(x)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # Same as pytorch-fid's own InceptionV3 on the same weights, fed [0, 1] RGB (as from PNGs).
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        ref_model = pfi.InceptionV3([3]).eval()
    x01 = ((x + 1) * 127.5).round() / 255
    with torch.no_grad():
        ref = ref_model(x01.repeat(1, 3, 1, 1))[0].flatten(1)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- classifier


@pytest.fixture(scope="session")
def fmnist():
    from fedmpi.data import load_arrays, to_float

    cfg = DataCfg(root=str(FMNIST), download=False)
    xtr, ytr = load_arrays(cfg, "train")
    xte, yte = load_arrays(cfg, "test")
    return to_float(xtr), torch.from_numpy(ytr), to_float(xte), torch.from_numpy(yte)


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fedmpi-cache")


@pytest.fixture(scope="session")
def classifier(fmnist, classifier_cache):
    # The expensive part of this file (~1 minute on 2 cores): trained once per session,
    # on the test split only (as the federator does: it owns no training data).
    return load_or_train_classifier("fashion_mnist", fmnist[2], fmnist[3], classifier_cache, "cpu")


@needs_fmnist
def test_classifier_accuracy_and_cache(classifier, classifier_cache, fmnist):
    assert classifier.name == "fd_classifier" and classifier.dim == 128
    assert classifier.accuracy >= 0.87  # on the 2000 held-out test images it never fitted
    path = classifier_cache_path(
        "fashion_mnist", classifier_cache, data_digest(fmnist[2], fmnist[3])
    )
    assert path.is_file() and path.name.startswith("classifier-fashion_mnist-testsplit-")
    assert torch.load(path, weights_only=True)["accuracy"] == classifier.accuracy
    # The cache is used: no training, and the network is the same.
    cfg = EvalCfg(extractor="classifier", cache_dir=str(classifier_cache))
    with mock.patch(
        "fedmpi.eval.classifier.train_classifier", side_effect=AssertionError("trained")
    ):
        again = build_extractor(cfg, "fashion_mnist", lambda: (fmnist[2], fmnist[3]), "cpu")
    assert again.key == classifier.key and again.accuracy == classifier.accuracy
    x = fmnist[2][:64]
    torch.testing.assert_close(again.features(x), classifier.features(x))
    # Training images it never saw are classified well too.
    assert (again.predict(fmnist[0][:1000]) == fmnist[1][:1000]).float().mean() > 0.85
    assert build_extractor(EvalCfg(extractor="none"), "fashion_mnist", None, "cpu") is None


@needs_fmnist
def test_classifier_frechet_separates_real_from_bad(classifier, fmnist):
    xtr, _, xte, _ = fmnist
    n = 2000
    g = torch.Generator().manual_seed(0)
    test = compute_stats(classifier, xte[:n])
    real = frechet_distance_stats(test, compute_stats(classifier, xtr[:n]))
    noise = frechet_distance_stats(
        test, compute_stats(classifier, torch.randn(n, 1, 28, 28, generator=g).clamp(-1, 1))
    )
    single = frechet_distance_stats(test, compute_stats(classifier, xte[:1].repeat(n, 1, 1, 1)))
    assert 10 * real < noise and 10 * real < single, (real, noise, single)

    d = class_distribution(classifier.predict(xte[:n]), 10)
    assert d["classes_present"] == 10 and d["classes_present_1pct"] == 10
    assert d["kl_from_uniform"] < 0.05
    d = class_distribution(classifier.predict(xte[:1].repeat(100, 1, 1, 1)), 10)
    assert d["classes_present"] == 1


@needs_fmnist
def test_reference_stats_cached(classifier, fmnist, tmp_path):
    x = fmnist[2][:500]
    a = reference_set(classifier, x, tmp_path, "fashion_mnist-test")[0]
    files = list(tmp_path.glob("ref-fashion_mnist-test-classifier-*-n500.npz"))
    assert len(files) == 1 and a.n == 500
    with mock.patch.object(classifier, "features", side_effect=AssertionError("recomputed")):
        b = reference_set(classifier, x, tmp_path, "fashion_mnist-test")[0]
    assert np.array_equal(a.to_array(), b.to_array())
