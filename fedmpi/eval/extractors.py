"""Feature extractors for Frechet distances, their weights, and cached reference stats.

Owns which network turns images into features, and where its weights come from:
- `InceptionExtractor` ("fid"): pytorch-fid's FID InceptionV3, 2048-d pool features,
  weights read from a LOCAL file only (fedmpi never downloads them);
- `ClassifierExtractor` ("fd_classifier", classifier.py): a small CNN, 128-d penultimate
  features, trained on the held-out TEST split (the federator's own data) and cached, or
  loaded from `eval.classifier_weights`. It works offline; its scores are Frechet
  distances in another feature space and are never called FID. The reference
  statistics come from the same test split the classifier partly fitted: a fixed offset
  shared by every model scored, so scores compare runs with each other, not with
  numbers from other feature spaces.
`build_extractor` picks one from the config, `extractor_from_payload` rebuilds it on
another rank, `reference_set` caches the real test set's statistics (and features).
Every extractor takes images as float tensors in [-1, 1], shaped (N, C, H, W), maps them
to [0, 1] as `eval.preprocess` says (fid.to_unit; real and generated alike), and
returns CPU float32 features (N, dim). The statistics math lives in fid.py.

    python -m fedmpi.extractors train-classifier --config CONFIG [--section.key=value ...]
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn as nn

from fedmpi.errors import ConfigError

# The classifier's names stay importable from here (tests/dist/test_locality.py).
from fedmpi.eval.classifier import (  # noqa: F401
    CLASSIFIER_SETTINGS,
    ClassifierExtractor,
    SmallCNN,
    _settings_hash,
    classifier_cache_path,
    data_digest,
    holdout_split,
    load_classifier_weights,
    load_or_train_classifier,
)
from fedmpi.eval.fid import FeatureStats, batched, file_digest, to_unit
from fedmpi.eval.manifold import knn_radii
from fedmpi.store.atomic import atomic_write

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
)


class MissingWeightsError(ConfigError):
    """The Inception weights file is not on this machine (a user error: exit 2)."""


def default_cache_dir(eval_cfg=None) -> Path:
    d = getattr(eval_cfg, "cache_dir", None) or "~/.cache/fedmpi"
    return Path(d).expanduser()


# ---------------------------------------------------------------- Inception (FID)


def check_inception_weights(eval_cfg) -> Path:
    """The local Inception weights file: eval.inception_weights if set, else the torch
    hub cache. Raises MissingWeightsError, saying how to get the file, before any work."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    configured = getattr(eval_cfg, "inception_weights", None)
    path = Path(configured).expanduser() if configured else hub_dir / INCEPTION_FILE
    if path.is_file():
        return path
    searched = [
        f"eval.inception_weights: {path if configured else '(not set)'}",
        f"torch hub cache: {hub_dir / INCEPTION_FILE}"
        + (" (not used: eval.inception_weights is set)" if configured else ""),
    ]
    raise MissingWeightsError(
        f"FID needs the Inception weights file {INCEPTION_FILE}, which is not on this "
        f"machine (fedmpi never downloads it).\nSearched:\n  - "
        + "\n  - ".join(searched)
        + f"\nTo fix: on a machine with internet, fetch it with\n"
        f"  curl -L -o {INCEPTION_FILE} {INCEPTION_URL}\n"
        f"  (or: wget {INCEPTION_URL})\n"
        f"then copy it to {hub_dir}/ on this machine, or anywhere and set "
        f"--eval.inception_weights=/path/to/{INCEPTION_FILE}.\n"
        f"Offline alternative: --eval.extractor=classifier (reports fd_classifier, a Frechet "
        f"distance in a small classifier's feature space, not comparable with FID)."
    )


def require_weights(eval_cfg) -> None:
    """Every entry point's check before any work (train, evaluate, sweep): a config that
    scores Inception FID without the weights file raises MissingWeightsError."""
    if eval_cfg.extractor == "inception":
        check_inception_weights(eval_cfg)


def build_fid_inception_net() -> nn.Module:
    """The FID Inception network (torchvision InceptionV3 patched as pytorch-fid does),
    uninitialized: the weights come from `load_state_dict` on a local file."""
    import torchvision
    from pytorch_fid import inception as pfi

    # init_weights=False: the truncated-normal init is slow and overwritten anyway.
    net = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    )
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class InceptionExtractor:
    name = "fid"
    dim = 2048

    def __init__(
        self,
        weights_path: str | Path | None,
        device="cpu",
        batch_size: int = 50,
        state_dict: dict | None = None,
        key: str | None = None,
        preprocess: str = "exact",
    ):
        """Load from a local weights file, or from a state dict another rank read.
        `preprocess` (eval.preprocess) turns [-1, 1] images into the network's input."""
        from pytorch_fid import inception as pfi

        net = build_fid_inception_net()
        if state_dict is None:
            weights_path = Path(weights_path)
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state_dict)
        self._state = state_dict
        # pytorch-fid's InceptionV3 wrapper (block layout, 299 resize, [0,1] -> [-1,1])
        # builds its network through fid_inception_v3(), which downloads; hand it ours.
        with mock.patch.object(pfi, "fid_inception_v3", lambda: net):
            self.model = pfi.InceptionV3(
                [pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True
            )
        self.model.eval().to(device)
        self.device, self.batch_size, self.preprocess = device, batch_size, preprocess
        # The weights' content, not their name: a wrong file must not reuse cached stats.
        self.key = key or f"inception-{file_digest(weights_path)}"

    def payload(self) -> dict:
        """What another rank needs to rebuild this extractor (sent over MPI)."""
        return {
            "kind": "inception",
            "state_dict": self._state,
            "key": self.key,
            "preprocess": self.preprocess,
        }

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit(x, self.preprocess)  # InceptionV3 expects [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # as pytorch-fid's RGB conversion of grey PNGs
        return self.model(x)[0].flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return batched(self._forward, x, self.batch_size, self.device)


# ---------------------------------------------------------------- dispatch and stats


def build_extractor(
    eval_cfg, dataset_name: str, test_data_fn: Callable[[], tuple], device="cpu", log=print
):
    """The extractor eval_cfg.extractor names, or None for 'none'.

    test_data_fn() -> (test_images, test_labels), float in [-1, 1] / int64: the whole
    test split, the only data the classifier may learn from; called only for the
    classifier without eval.classifier_weights. Inception weights are checked before
    anything else is done. The extractor preprocesses images as eval.preprocess says.
    """
    kind = eval_cfg.extractor
    preprocess = getattr(eval_cfg, "preprocess", "exact")
    if kind == "none":
        return None
    if kind == "inception":
        return InceptionExtractor(check_inception_weights(eval_cfg), device, preprocess=preprocess)
    if kind == "classifier":
        if eval_cfg.classifier_weights:
            ext = load_classifier_weights(eval_cfg.classifier_weights, dataset_name, device)
        else:
            ext = load_or_train_classifier(
                dataset_name, *test_data_fn(), default_cache_dir(eval_cfg), device, log
            )
        ext.preprocess = preprocess  # how images are scored; the trained net is the same
        return ext
    raise ValueError(f"unknown eval.extractor {kind!r}")


def extractor_from_payload(payload: dict, device="cpu"):
    """Rebuild an extractor from `payload()` of the rank that loaded or trained it."""
    if payload["kind"] == "inception":
        return InceptionExtractor(
            None,
            device,
            state_dict=payload["state_dict"],
            key=payload["key"],
            preprocess=payload["preprocess"],
        )
    net = SmallCNN(**payload["net_args"])
    net.load_state_dict(payload["state_dict"])
    return ClassifierExtractor(
        net,
        payload["dataset"],
        payload["key"],
        payload["accuracy"],
        device,
        preprocess=payload["preprocess"],
    )


def feature_chunks(extractor, images: torch.Tensor, batch_size: int = 1000):
    """The extractor's features of images, a chunk at a time."""
    for i in range(0, len(images), batch_size):
        yield extractor.features(images[i : i + batch_size])


def compute_stats(extractor, images: torch.Tensor, batch_size: int = 1000) -> FeatureStats:
    """Feature statistics of images, a chunk at a time (never all features in memory)."""
    stats = FeatureStats(extractor.dim)
    for feats in feature_chunks(extractor, images, batch_size):
        stats.update(feats)
    return stats


def reference_stats_path(extractor, cache_dir, dataset_key: str, n: int) -> Path:
    """The cache file of the real statistics: keyed by the data, the extractor's weights,
    the image count and the preprocessing (exact keeps the name it had before
    eval.preprocess existed, so earlier caches stay valid; reference adds '-reference')."""
    preprocess = getattr(extractor, "preprocess", "exact")
    tag = "" if preprocess == "exact" else f"-{preprocess}"
    return Path(cache_dir).expanduser() / f"ref-{dataset_key}-{extractor.key}{tag}-n{n}.npz"


def reference_set(
    extractor, test_images: torch.Tensor, cache_dir, dataset_key: str, k: int = 0
) -> tuple[FeatureStats, tuple[torch.Tensor, torch.Tensor] | None]:
    """The real test set's feature statistics and, for k > 0, its (features, k-NN radii)
    for precision and recall (fedmpi.eval.manifold), each computed once and cached in
    cache_dir (per preprocessing: the real images go through the same one as the
    generated). A cold cache runs the extractor over the images once for both; with
    k = 0 the features stream through the statistics and are never all in memory."""
    stats_path = reference_stats_path(extractor, cache_dir, dataset_key, len(test_images))
    knn_path = stats_path.with_name(f"{stats_path.stem}-knn{k}.npz")
    stats = FeatureStats.load(stats_path) if stats_path.is_file() else None
    manifold = None
    if k and knn_path.is_file():
        with np.load(knn_path) as z:
            manifold = torch.from_numpy(z["feats"]), torch.from_numpy(z["radii"])
    if stats is not None and (manifold is not None or not k):
        return stats, manifold
    if not k:
        stats = compute_stats(extractor, test_images)
    else:
        chunks = [f.float().cpu() for f in feature_chunks(extractor, test_images)]
        if stats is None:
            stats = FeatureStats(extractor.dim)
            for feats in chunks:  # the same chunks compute_stats adds: the same sums
                stats.update(feats)
        if manifold is None:
            feats = torch.cat(chunks)
            manifold = feats, knn_radii(feats, k)
            buf = io.BytesIO()
            np.savez(buf, feats=manifold[0].numpy(), radii=manifold[1].numpy())
            atomic_write(knn_path, buf.getvalue())
    if not stats_path.is_file():
        stats.save(stats_path)
    return stats, manifold
