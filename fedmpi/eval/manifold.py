"""Precision and recall of a generated distribution (Kynkaanniemi et al., "Improved
Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019).

Each set of feature vectors spans a manifold estimate: the union of balls around its
points, each ball's radius the distance to the point's k-th nearest neighbour in its own
set. Precision is the fraction of generated samples inside the real manifold (are the
samples realistic?); recall the fraction of real images inside the generated manifold
(is all of the data covered?). A model that drops classes keeps its precision and loses
recall, which the Frechet distance folds into one number. The features are the
extractor's (Inception for FID, the offline classifier for fd_classifier), the paper's
k = 3.
"""

from __future__ import annotations

import numpy as np
import torch

_CHUNK = 1024  # rows of a distance block: 1024 x 10,000 float32 = 40 MB


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def knn_radii(feats, k: int = 3) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row (itself excluded)."""
    x = _as_tensor(feats)
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k = {k} points, got {len(x)}")
    out = torch.empty(len(x))
    for i in range(0, len(x), _CHUNK):
        d = torch.cdist(x[i : i + _CHUNK], x)
        # the k + 1 smallest include the point itself (distance 0)
        out[i : i + _CHUNK] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def inside(points, centers, radii: torch.Tensor) -> torch.Tensor:
    """For each point: does it lie in at least one ball (centers, radii)? (bool)"""
    p, c = _as_tensor(points), _as_tensor(centers)
    hit = torch.zeros(len(p), dtype=torch.bool)
    for i in range(0, len(p), _CHUNK):
        d = torch.cdist(p[i : i + _CHUNK], c)
        hit[i : i + _CHUNK] = (d <= radii.unsqueeze(0)).any(dim=1)
    return hit


def precision_recall(real, fake, k: int = 3, real_radii=None) -> dict:
    """{'precision', 'recall'} of generated features `fake` against real features `real`
    (`real_radii`: knn_radii(real, k), passed when the real set is scored many times)."""
    if real_radii is None:
        real_radii = knn_radii(real, k)
    precision = inside(fake, real, real_radii).float().mean().item()
    recall = inside(real, fake, knn_radii(fake, k)).float().mean().item()
    return {"precision": precision, "recall": recall}
