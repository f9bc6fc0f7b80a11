"""Precision and recall of generated features (fedmpi.eval.manifold), against a
brute-force numpy implementation and on distributions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi.eval import manifold


def brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.'s definition, written out with numpy in float64."""

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centers, r):
        d = np.sqrt(((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1))
        return (d <= r[None, :]).any(axis=1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_matches_the_definition(monkeypatch):
    monkeypatch.setattr(manifold, "_CHUNK", 37)  # several blocks, a ragged last one
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    fake = rng.normal(0.3, 1.2, size=(200, 8))
    for k in (1, 3, 5):
        got = manifold.precision_recall(real, fake, k)
        p, r = brute(real, fake, k)
        # float32 distances: a point exactly on a ball's edge may flip; none does here
        assert got["precision"] == pytest.approx(p, abs=1 / 200)
        assert got["recall"] == pytest.approx(r, abs=1 / 300)
        assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    radii = manifold.knn_radii(real, 3)
    d = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    np.testing.assert_allclose(radii.numpy(), np.sort(d, axis=1)[:, 3], rtol=1e-5)
    assert manifold.precision_recall(real, fake, 3, radii) == manifold.precision_recall(
        real, fake, 3
    )


def test_dropped_classes_show_as_low_recall():
    """Two well-separated classes in the real set; a model that generates only one of
    them is precise (its samples are real-looking) but recalls only half of the data;
    samples off the data have neither."""
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, size=(400, 4))
    b = rng.normal(20, 1, size=(400, 4))
    real = np.concatenate([a, b])
    both = manifold.precision_recall(real, np.concatenate([a[:200] + 0.01, b[:200]]), 3)
    one = manifold.precision_recall(real, rng.normal(0, 1, size=(400, 4)), 3)
    off = manifold.precision_recall(real, rng.normal(10, 1, size=(400, 4)), 3)
    assert both["precision"] > 0.9 and both["recall"] > 0.6
    assert one["precision"] > 0.9 and 0.35 < one["recall"] <= 0.5
    assert off["precision"] == 0 and off["recall"] == 0


def test_too_few_points_refused():
    with pytest.raises(ValueError, match="more than k = 3"):
        manifold.knn_radii(np.zeros((3, 2)), 3)
