"""Feature extractors for Frechet distances, their weights, and cached reference stats.

Owns which network turns images into features, and where its weights come from:
- `InceptionExtractor` ("fid"): pytorch-fid's FID InceptionV3, 2048-d pool features,
  weights read from a LOCAL file only (fedmpi never downloads them);
- `ClassifierExtractor` ("fd_classifier"): a small CNN, 128-d penultimate features. It
  is trained on the held-out TEST split, never on the training set: the federator
  (rank 0), which scores the models, is in a real deployment another institution than
  the clients and owns only the evaluation split. 80% of the test images are fitted,
  20% held out to measure the accuracy it reports; the net is cached on disk under a
  key that says so (classifier-<dataset>-testsplit-<data digest>-<settings hash>.pt).
  Or it is loaded from a file given as `eval.classifier_weights` (no data read at all).
  It works offline; its scores are Frechet distances in another feature space and are
  never called FID. The reference statistics come from the same test split the
  classifier partly fitted: a fixed offset shared by every model scored, so scores
  compare runs with each other, not with numbers from other feature spaces.
Every extractor takes images as float tensors in [-1, 1], shaped (N, C, H, W), and
returns CPU float32 features (N, dim). The statistics math lives in fid.py.

    python -m fedmpi.extractors train-classifier --config CONFIG [--section.key=value ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmpi.config import ConfigError
from fedmpi.data import DataError
from fedmpi.eval.fid import FeatureStats

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
)


class MissingWeightsError(ValueError):
    """The Inception weights file is not on this machine."""


def default_cache_dir(eval_cfg=None) -> Path:
    d = getattr(eval_cfg, "cache_dir", None) or "~/.cache/fedmpi"
    return Path(d).expanduser()


def _to_unit_quantized(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] on the 256 levels of an 8-bit image.

    pytorch-fid scores PNG files, and real data is uint8, so samples are quantized the
    same way before scoring: a score must not depend on sub-8-bit noise.
    """
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device
) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(fn(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


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


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


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
    ):
        """Load from a local weights file, or from a state dict another rank read."""
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
        self.device, self.batch_size = device, batch_size
        # The weights' content, not their name: a wrong file must not reuse cached stats.
        self.key = key or f"inception-{_file_digest(weights_path)}"

    def payload(self) -> dict:
        """What another rank needs to rebuild this extractor (sent over MPI)."""
        return {"kind": "inception", "state_dict": self._state, "key": self.key}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_unit_quantized(x)  # InceptionV3 expects [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # as pytorch-fid's RGB conversion of grey PNGs
        return self.model(x)[0].flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(self._forward, x, self.batch_size, self.device)


# ---------------------------------------------------------------- classifier

# Everything that changes the trained classifier; its hash is part of the cache key.
# Version 2 trains on the test split; version 1 trained on the training set, which the
# federator does not own, and its cache files (another hash) are never read again.
CLASSIFIER_SETTINGS = {
    "arch": "cnn8-32-fc128",
    "version": 2,
    "data": "test split",
    "holdout": 0.2,
    "epochs": 20,
    "batch_size": 128,
    "lr": 3e-3,
    "schedule": "onecycle",
    "augment": "flip+shift2-per-image",
    "seed": 0,
}
MIN_CLASSIFIER_IMAGES = 20  # fewer leave no fit part and held-out part worth the names


class SmallCNN(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        feat_dim: int = 128,
        widths: tuple = (8, 32),
    ):
        super().__init__()
        w1, w2 = widths
        self.args = {
            "in_channels": in_channels,
            "image_size": image_size,
            "num_classes": num_classes,
            "feat_dim": feat_dim,
            "widths": list(widths),
        }

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1, bias=False),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(in_channels, w1), block(w1, w2), nn.Flatten())
        self.penultimate = nn.Linear(w2 * (image_size // 4) ** 2, feat_dim)
        self.head = nn.Sequential(
            nn.BatchNorm1d(feat_dim), nn.ReLU(), nn.Dropout(0.2), nn.Linear(feat_dim, num_classes)
        )

    def features(self, x):
        # Before the ReLU: dense features give a well-conditioned covariance.
        return self.penultimate(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


class ClassifierExtractor:
    name = "fd_classifier"

    def __init__(
        self,
        net: SmallCNN,
        dataset: str,
        key: str,
        accuracy: float,
        device="cpu",
        batch_size: int = 500,
    ):
        """`key` names the weights (cache file stem or file digest); reference statistics
        are cached under it. `accuracy` is measured on images the net never trained on."""
        self.net = net.eval().to(device)
        self.dataset, self.key, self.accuracy = dataset, key, accuracy
        self.dim = net.penultimate.out_features
        self.device, self.batch_size = device, batch_size

    def payload(self) -> dict:
        """What another rank needs to rebuild this extractor (sent over MPI)."""
        return {
            "kind": "classifier",
            "net_args": self.net.args,
            "dataset": self.dataset,
            "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
            "key": self.key,
            "accuracy": self.accuracy,
        }

    def _prep(self, x):
        return _to_unit_quantized(x) * 2 - 1  # the classifier saw uint8 data in [-1, 1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda b: self.net.features(self._prep(b)), x, self.batch_size, self.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(
            lambda b: self.net(self._prep(b)).argmax(1), x, self.batch_size, self.device
        ).long()


def _settings_hash() -> str:
    blob = json.dumps(CLASSIFIER_SETTINGS, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Content hash of the images and labels a classifier is trained on (part of its
    cache key: another test split, e.g. a smaller file, trains another classifier)."""
    h = hashlib.sha256()
    h.update(images.contiguous().cpu().numpy().tobytes())
    h.update(labels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def classifier_cache_path(dataset: str, cache_dir: str | Path, digest: str) -> Path:
    """The cache file of the classifier trained on the test split whose data_digest is
    `digest`: classifier-<dataset>-testsplit-<data digest>-<settings hash>.pt"""
    return (
        Path(cache_dir).expanduser()
        / f"classifier-{dataset}-testsplit-{digest}-{_settings_hash()}.pt"
    )


def holdout_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of n test images: a seeded permutation, the last
    CLASSIFIER_SETTINGS['holdout'] of it held out to measure accuracy."""
    s = CLASSIFIER_SETTINGS
    if n < MIN_CLASSIFIER_IMAGES:
        raise DataError(
            f"the fd_classifier network trains on the test split, which has only "
            f"{n} images (at least {MIN_CLASSIFIER_IMAGES} needed); give a larger "
            f"test set, or a trained classifier with --eval.classifier_weights=PATH"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s["seed"]))
    held = max(1, round(n * s["holdout"]))
    return perm[: n - held], perm[n - held :]


def _accuracy(net, images, labels, device) -> float:
    net.eval()
    pred = _batched(lambda b: net(b).argmax(1), images, 1000, device)
    return float((pred == labels.cpu()).float().mean())


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random horizontal flip and a random shift of up to 2 pixels, per image: a few
    thousand test images overfit the CNN without them (Fashion-MNIST, 20 epochs: fit
    accuracy 1.00 and held-out 0.886 without; held-out 0.878 with one shift per batch,
    0.891 with one per image)."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)  # -1: black, the images' background
    dy, dx = torch.randint(0, 5, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (b, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (b, 1, 1, w)
    return padded[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, device="cpu", log=print
) -> tuple[SmallCNN, float, int]:
    """Train SmallCNN with CLASSIFIER_SETTINGS on the fit part of the test split.

    Returns (net, accuracy on the held-out part, number of images fitted). Images in
    [-1, 1] (N, C, H, W), labels int64."""
    s = CLASSIFIER_SETTINGS
    fit, held = holdout_split(len(images))
    n, (c, h, _) = len(fit), images.shape[1:]
    num_classes = int(labels.max()) + 1
    batch = min(s["batch_size"], n)
    steps_per_epoch = max(1, n // batch)
    # fork_rng: seed the training without moving the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        net = SmallCNN(c, h, num_classes).to(device)
        gen = torch.Generator().manual_seed(s["seed"])
        opt = torch.optim.Adam(net.parameters(), lr=s["lr"])
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, s["lr"], total_steps=s["epochs"] * steps_per_epoch
        )
        t0 = time.time()
        for epoch in range(s["epochs"]):
            net.train()
            perm = fit[torch.randperm(n, generator=gen)]
            for i in range(steps_per_epoch):
                idx = perm[i * batch : (i + 1) * batch]
                x = _augment(images[idx], gen).to(device)
                loss = F.cross_entropy(net(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if (epoch + 1) % 5 == 0 or epoch + 1 == s["epochs"]:
                log(
                    f"classifier epoch {epoch + 1}/{s['epochs']}: loss {loss.item():.3f}, "
                    f"{time.time() - t0:.0f}s"
                )
    return net, _accuracy(net, images[held], labels[held], device), n


def load_classifier(path: str | Path, device="cpu", key: str | None = None) -> ClassifierExtractor:
    """A classifier file written by load_or_train_classifier (weights_only: no code runs)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = SmallCNN(**ckpt["net_args"])
    net.load_state_dict(ckpt["state_dict"])
    return ClassifierExtractor(net, ckpt["dataset"], key or ckpt["key"], ckpt["accuracy"], device)


def load_classifier_weights(path: str | Path, dataset: str, device="cpu") -> ClassifierExtractor:
    """eval.classifier_weights: a classifier file made elsewhere (e.g. the cache file of
    `python -m fedmpi.extractors train-classifier`); keyed by its content."""
    path = Path(path).expanduser()
    how = (
        "write one with `python -m fedmpi.extractors train-classifier --config CONFIG` "
        "(it prints the file) or leave eval.classifier_weights unset to train one on the "
        "test split"
    )
    try:
        ext = load_classifier(path, device, key=f"classifier-file-{_file_digest(path)}")
    except Exception as e:  # missing, truncated, pickled code, another format: all refused
        raise ConfigError(
            f"eval.classifier_weights: {path} is not a usable fedmpi classifier "
            f"file ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            f"{how}"
        ) from None
    if ext.dataset != dataset:
        raise ConfigError(
            f"eval.classifier_weights: {path} is a classifier for {ext.dataset}, "
            f"but data.dataset is {dataset}; {how}"
        )
    return ext


def load_or_train_classifier(
    dataset: str,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    cache_dir,
    device="cpu",
    log=print,
) -> ClassifierExtractor:
    """The classifier trained on this test split (the federator's own data), from the
    cache or trained and cached first. Images in [-1, 1], labels int64."""
    path = classifier_cache_path(dataset, cache_dir, data_digest(test_images, test_labels))
    if path.is_file():
        try:
            ext = load_classifier(path, device)
            log(f"classifier loaded from {path} (held-out accuracy {ext.accuracy:.4f})")
            return ext
        except Exception as e:  # a truncated or stale file: train again
            log(f"classifier cache {path} unreadable ({type(e).__name__}: {e}); retraining")
    t0 = time.time()
    net, acc, num_fit = train_classifier(test_images, test_labels, device, log)
    seconds = time.time() - t0
    ckpt = {
        "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
        "net_args": net.args,
        "dataset": dataset,
        "key": path.stem,
        "settings": json.dumps(CLASSIFIER_SETTINGS),
        "accuracy": acc,
        "trained_on": "test split",
        "num_fit": num_fit,
        "num_heldout": len(test_images) - num_fit,
        "train_seconds": seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees no file or a whole one
    log(
        f"classifier trained in {seconds:.0f}s on {num_fit} of the {len(test_images)} test "
        f"images, held-out accuracy {acc:.4f} on the other {len(test_images) - num_fit}; "
        f"saved to {path}"
    )
    return ClassifierExtractor(net, dataset, path.stem, acc, device)


# ---------------------------------------------------------------- dispatch and stats


def build_extractor(
    eval_cfg, dataset_name: str, test_data_fn: Callable[[], tuple], device="cpu", log=print
):
    """The extractor eval_cfg.extractor names, or None for 'none'.

    test_data_fn() -> (test_images, test_labels), float in [-1, 1] / int64: the whole
    test split, the only data the classifier may learn from; called only for the
    classifier without eval.classifier_weights. Inception weights are checked before
    anything else is done.
    """
    kind = eval_cfg.extractor
    if kind == "none":
        return None
    if kind == "inception":
        return InceptionExtractor(check_inception_weights(eval_cfg), device)
    if kind == "classifier":
        if eval_cfg.classifier_weights:
            return load_classifier_weights(eval_cfg.classifier_weights, dataset_name, device)
        return load_or_train_classifier(
            dataset_name, *test_data_fn(), default_cache_dir(eval_cfg), device, log
        )
    raise ValueError(f"unknown eval.extractor {kind!r}")


def extractor_from_payload(payload: dict, device="cpu"):
    """Rebuild an extractor from `payload()` of the rank that loaded or trained it."""
    if payload["kind"] == "inception":
        return InceptionExtractor(
            None, device, state_dict=payload["state_dict"], key=payload["key"]
        )
    net = SmallCNN(**payload["net_args"])
    net.load_state_dict(payload["state_dict"])
    return ClassifierExtractor(net, payload["dataset"], payload["key"], payload["accuracy"], device)


def compute_stats(extractor, images: torch.Tensor, batch_size: int = 1000) -> FeatureStats:
    """Feature statistics of images, a chunk at a time (never all features in memory)."""
    stats = FeatureStats(extractor.dim)
    for i in range(0, len(images), batch_size):
        stats.update(extractor.features(images[i : i + batch_size]))
    return stats


def reference_stats(
    extractor, test_images: torch.Tensor, cache_dir, dataset_key: str
) -> FeatureStats:
    """Stats of the real test set, computed once and cached in cache_dir."""
    path = (
        Path(cache_dir).expanduser() / f"ref-{dataset_key}-{extractor.key}-n{len(test_images)}.npz"
    )
    if path.is_file():
        return FeatureStats.load(path)
    stats = compute_stats(extractor, test_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


# ---------------------------------------------------------------- CLI
