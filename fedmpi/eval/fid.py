"""Feature statistics, the Frechet distance and predicted-class summaries.

Owns the math only (numpy / scipy / torch, no MPI, no networks): `FeatureStats` keeps
running float64 sums (count, sum of features, sum of outer products) so that statistics
can be accumulated batch by batch and reduced across ranks as ONE flat buffer
(`to_array` / `from_array`) without ever gathering features (as NVlabs/edm does).
`frechet_distance` follows pytorch-fid's `calculate_frechet_distance`, so Inception
scores match pytorch-fid's. Also the small helpers every extractor shares (8-bit
quantization of images as `eval.preprocess` says, batched feature calls, a weights
file's digest). Which network
produces the features lives in extractors.py and classifier.py.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from fedmpi.store.atomic import atomic_write


def to_unit_quantized(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] on the 256 levels of an 8-bit image.

    pytorch-fid scores PNG files, and real data is uint8, so samples are quantized the
    same way before scoring: a score must not depend on sub-8-bit noise.
    """
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def to_unit_reference(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] as the reference's PNG files hold it: torchvision's `save_image`
    applied to the [-1, 1] tensor, the PNG read back and divided by 255.

    save_image takes its input as [0, 1] (make_grid without normalize does not rescale)
    and computes uint8(clamp(x * 255 + 0.5, 0, 255)): everything below 0, the darker half
    of the [-1, 1] range, becomes black. floor() equals the uint8 cast's truncation on
    [0, 255] and keeps the tensor float on any device.
    """
    return x.float().mul(255).add(0.5).clamp(0, 255).floor() / 255


PREPROCESS = {"exact": to_unit_quantized, "reference": to_unit_reference}


def to_unit(x: torch.Tensor, preprocess: str = "exact") -> torch.Tensor:
    """Images in [-1, 1] -> the [0, 1] input of a feature extractor (`eval.preprocess`).

    exact: (x + 1) / 2 on 256 levels (to_unit_quantized); reference: the reference's PNG
    round trip (to_unit_reference). Real and generated images go through the same one.
    """
    try:
        fn = PREPROCESS[preprocess]
    except KeyError:
        raise ValueError(
            f"unknown eval.preprocess {preprocess!r}; choose from {', '.join(PREPROCESS)}"
        ) from None
    return fn(x)


def batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device
) -> torch.Tensor:
    """fn over x in batches on `device`, without gradients; CPU float32 results joined."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(fn(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def file_digest(path: Path) -> str:
    """The first 12 hex digits of a file's SHA-256 (weights are keyed by content)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


class FeatureStats:
    """Running count, sum and sum of outer products of D-dimensional features."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, feats: torch.Tensor | np.ndarray) -> FeatureStats:
        if isinstance(feats, torch.Tensor):
            feats = feats.detach().cpu().numpy()
        x = np.asarray(feats, dtype=np.float64).reshape(len(feats), -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, stats expect {self.dim}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    # One contiguous float64 buffer so MPI can Reduce/Allreduce it in a single call.
    def to_array(self) -> np.ndarray:
        return np.concatenate([[float(self.n)], self.sum, self.outer.ravel()])

    @classmethod
    def from_array(cls, arr: np.ndarray, dim: int) -> FeatureStats:
        arr = np.asarray(arr, dtype=np.float64).ravel()
        if arr.size != 1 + dim + dim * dim:
            raise ValueError(f"buffer of {arr.size} values does not hold stats of dim {dim}")
        s = cls(dim)
        s.n = int(round(arr[0]))
        s.sum = arr[1 : 1 + dim].copy()
        s.outer = arr[1 + dim :].reshape(dim, dim).copy()
        return s

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {self.dim} and {other.dim}")
        out = FeatureStats(self.dim)
        out.n = self.n + other.n
        out.sum = self.sum + other.sum
        out.outer = self.outer + other.outer
        return out

    merge = __add__

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features accumulated")
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1), like np.cov(x, rowvar=False)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.n}")
        mu = self.mean()
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str | Path) -> None:
        """Written atomically (store.atomic_write): readers never see half a file."""
        buf = io.BytesIO()  # a file object: np.savez would append ".npz" to a name
        np.savez(buf, n=self.n, sum=self.sum, outer=self.outer)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as z:
            s = cls(z["sum"].shape[0])
            s.n, s.sum, s.outer = int(z["n"]), z["sum"].copy(), z["outer"].copy()
        return s


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed as pytorch-fid does."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"shape mismatch: means {mu1.shape} vs {mu2.shape}, "
            f"covariances {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    # A (near) singular product, e.g. fewer samples than dimensions, is expected and
    # handled below, so scipy's warning about it is only noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives a small imaginary part; a large one means a real problem.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def class_distribution(pred_labels, num_classes: int) -> dict:
    """Histogram of predicted classes: how many classes a sample set covers, and how evenly.

    classes_present: classes with at least one sample; classes_present_1pct: classes
    with at least 1% of the samples (ignores a few stray predictions);
    kl_from_uniform: KL(p || uniform) in nats, 0 for perfectly balanced, log(K) for one class.
    """
    if isinstance(pred_labels, torch.Tensor):
        pred_labels = pred_labels.detach().cpu().numpy()
    labels = np.asarray(pred_labels, dtype=np.int64).ravel()
    hist = np.bincount(labels, minlength=num_classes)[:num_classes]
    n = int(hist.sum())
    p = hist / max(n, 1)
    nz = p > 0
    kl = float(np.sum(p[nz] * np.log(p[nz] * num_classes))) if n else float("nan")
    return {
        "n": n,
        "histogram": hist.tolist(),
        "classes_present": int(np.count_nonzero(hist)),
        "classes_present_1pct": int(np.count_nonzero(hist >= 0.01 * n)) if n else 0,
        "kl_from_uniform": kl,
    }
