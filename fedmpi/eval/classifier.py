"""The offline classifier behind fd_classifier: SmallCNN, its training, cache and loading.

Owns the small CNN whose 128-d penultimate features give fd_classifier, and where its
weights come from. It is trained on the held-out TEST split, never on the training set:
the federator (rank 0), which scores the models, is in a real deployment another
institution than the clients and owns only the evaluation split. 80% of the test images
are fitted, 20% held out to measure the accuracy it reports; the net is cached on disk
under a key that says so (classifier-<dataset>-testsplit-<data digest>-<settings
hash>.pt). Or it is loaded from a file given as `eval.classifier_weights` (no data read
at all). Which extractor a run uses is decided in extractors.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmpi.config import ConfigError
from fedmpi.data import DataError
from fedmpi.eval.fid import batched, file_digest, to_unit, to_unit_quantized
from fedmpi.store.atomic import atomic_write

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
        preprocess: str = "exact",
    ):
        """`key` names the weights (cache file stem or file digest); reference statistics
        are cached under it. `accuracy` is measured on images the net never trained on.
        `preprocess` (eval.preprocess) maps the images whose features are scored."""
        self.net = net.eval().to(device)
        self.dataset, self.key, self.accuracy = dataset, key, accuracy
        self.dim = net.penultimate.out_features
        self.device, self.batch_size, self.preprocess = device, batch_size, preprocess

    def payload(self) -> dict:
        """What another rank needs to rebuild this extractor (sent over MPI)."""
        return {
            "kind": "classifier",
            "net_args": self.net.args,
            "dataset": self.dataset,
            "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
            "key": self.key,
            "accuracy": self.accuracy,
            "preprocess": self.preprocess,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of x preprocessed as eval.preprocess says (the net's input is [-1, 1])."""
        return batched(
            lambda b: self.net.features(to_unit(b, self.preprocess) * 2 - 1),
            x,
            self.batch_size,
            self.device,
        )

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes, always of the exact 8-bit images the classifier trained on:
        class coverage is fedmpi's own measure, not part of the reference's FID."""
        return batched(
            lambda b: self.net(to_unit_quantized(b) * 2 - 1).argmax(1),
            x,
            self.batch_size,
            self.device,
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
    pred = batched(lambda b: net(b).argmax(1), images, 1000, device)
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
        ext = load_classifier(path, device, key=f"classifier-file-{file_digest(path)}")
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
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write(path, buf.getvalue())  # a concurrent reader sees no file or a whole one
    log(
        f"classifier trained in {seconds:.0f}s on {num_fit} of the {len(test_images)} test "
        f"images, held-out accuracy {acc:.4f} on the other {len(test_images) - num_fit}; "
        f"saved to {path}"
    )
    return ClassifierExtractor(net, dataset, path.stem, acc, device)
