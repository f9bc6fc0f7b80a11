"""Feature extractors for Frechet distances, their weights, and cached reference stats.

Owns which network turns images into features, and where its weights come from:
- `InceptionExtractor` ("fid"): pytorch-fid's FID InceptionV3, 2048-d pool features,
  weights read from a LOCAL file only (fedmpi never downloads them);
- `ClassifierExtractor` ("fd_classifier"): a small CNN trained once on the dataset's
  real training set and cached on disk, 128-d penultimate features. It works offline;
  its scores are Frechet distances in another feature space and are never called FID.
Every extractor takes images as float tensors in [-1, 1], shaped (N, C, H, W), and
returns CPU float32 features (N, dim). The statistics math lives in fid.py.

    python -m fedmpi.extractors train-classifier --config CONFIG [--section.key=value ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmpi.fid import FeatureStats

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 + INCEPTION_FILE)


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


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
             device) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(fn(x[i:i + batch_size].to(device)).float().cpu())
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
    searched = [f"eval.inception_weights: {path if configured else '(not set)'}",
                f"torch hub cache: {hub_dir / INCEPTION_FILE}"
                + (" (not used: eval.inception_weights is set)" if configured else "")]
    raise MissingWeightsError(
        f"FID needs the Inception weights file {INCEPTION_FILE}, which is not on this "
        f"machine (fedmpi never downloads it).\nSearched:\n  - " + "\n  - ".join(searched)
        + f"\nTo fix: on a machine with internet, fetch it with\n"
        f"  curl -L -o {INCEPTION_FILE} {INCEPTION_URL}\n"
        f"  (or: wget {INCEPTION_URL})\n"
        f"then copy it to {hub_dir}/ on this machine, or anywhere and set "
        f"--eval.inception_weights=/path/to/{INCEPTION_FILE}.\n"
        f"Offline alternative: --eval.extractor=classifier (reports fd_classifier, a Frechet "
        f"distance in a small classifier's feature space, not comparable with FID).")


def build_fid_inception_net() -> nn.Module:
    """The FID Inception network (torchvision InceptionV3 patched as pytorch-fid does),
    uninitialized: the weights come from `load_state_dict` on a local file."""
    import torchvision
    from pytorch_fid import inception as pfi
    # init_weights=False: the truncated-normal init is slow and overwritten anyway.
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
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

    def __init__(self, weights_path: str | Path | None, device="cpu", batch_size: int = 50,
                 state_dict: dict | None = None, key: str | None = None):
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
            self.model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                         resize_input=True, normalize_input=True)
        self.model.eval().to(device)
        self.device, self.batch_size = device, batch_size
        # The weights' content, not their name: a wrong file must not reuse cached stats.
        self.key = key or f"inception-{_file_digest(weights_path)}"

    def payload(self) -> dict:
        """What another rank needs to rebuild this extractor (sent over MPI)."""
        return {"kind": "inception", "state_dict": self._state, "key": self.key}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_unit_quantized(x)           # InceptionV3 expects [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)        # as pytorch-fid's RGB conversion of grey PNGs
        return self.model(x)[0].flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(self._forward, x, self.batch_size, self.device)


# ---------------------------------------------------------------- classifier

# Everything that changes the trained classifier; its hash names the cache file.
CLASSIFIER_SETTINGS = {"arch": "cnn8-32-fc128", "version": 1, "epochs": 3,
                       "batch_size": 256, "lr": 3e-3, "schedule": "onecycle", "seed": 0}


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 feat_dim: int = 128, widths: tuple = (8, 32)):
        super().__init__()
        w1, w2 = widths
        self.args = {"in_channels": in_channels, "image_size": image_size,
                     "num_classes": num_classes, "feat_dim": feat_dim, "widths": list(widths)}

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                                 nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(in_channels, w1), block(w1, w2), nn.Flatten())
        self.penultimate = nn.Linear(w2 * (image_size // 4) ** 2, feat_dim)
        self.head = nn.Sequential(nn.BatchNorm1d(feat_dim), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(feat_dim, num_classes))

    def features(self, x):
        # Before the ReLU: dense features give a well-conditioned covariance.
        return self.penultimate(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


class ClassifierExtractor:
    name = "fd_classifier"

    def __init__(self, net: SmallCNN, dataset: str, settings_hash: str, accuracy: float,
                 device="cpu", batch_size: int = 500):
        self.net = net.eval().to(device)
        self.dataset, self.accuracy = dataset, accuracy
        self.key = f"classifier-{dataset}-{settings_hash}"
        self.dim = net.penultimate.out_features
        self.device, self.batch_size = device, batch_size

    def payload(self) -> dict:
        """What another rank needs to rebuild this extractor (sent over MPI)."""
        return {"kind": "classifier", "net_args": self.net.args, "dataset": self.dataset,
                "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                "settings_hash": self.key.rsplit("-", 1)[1], "accuracy": self.accuracy}

    def _prep(self, x):
        return _to_unit_quantized(x) * 2 - 1  # the classifier saw uint8 data in [-1, 1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda b: self.net.features(self._prep(b)), x, self.batch_size,
                        self.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda b: self.net(self._prep(b)).argmax(1), x, self.batch_size,
                        self.device).long()


def _settings_hash() -> str:
    blob = json.dumps(CLASSIFIER_SETTINGS, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def classifier_cache_path(dataset: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / f"classifier-{dataset}-{_settings_hash()}.pt"


def _accuracy(net, images, labels, device) -> float:
    net.eval()
    pred = _batched(lambda b: net(b).argmax(1), images, 1000, device)
    return float((pred == labels.cpu()).float().mean())


def train_classifier(train_images, train_labels, test_images, test_labels, device="cpu",
                     log=print) -> tuple[SmallCNN, float]:
    """Train SmallCNN with CLASSIFIER_SETTINGS; returns (net, test accuracy)."""
    s = CLASSIFIER_SETTINGS
    n, c, h, _ = train_images.shape
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    # fork_rng: seed the training without moving the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        net = SmallCNN(c, h, num_classes).to(device)
        gen = torch.Generator().manual_seed(s["seed"])
        steps_per_epoch = n // s["batch_size"]
        opt = torch.optim.Adam(net.parameters(), lr=s["lr"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"],
                                                    total_steps=s["epochs"] * steps_per_epoch)
        t0 = time.time()
        for epoch in range(s["epochs"]):
            net.train()
            perm = torch.randperm(n, generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * s["batch_size"]:(i + 1) * s["batch_size"]]
                x, y = train_images[idx].to(device), train_labels[idx].to(device)
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            log(f"classifier epoch {epoch + 1}/{s['epochs']}: loss {loss.item():.3f}, "
                f"{time.time() - t0:.0f}s")
    return net, _accuracy(net, test_images, test_labels, device)


def load_classifier(path: str | Path, device="cpu") -> ClassifierExtractor:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = SmallCNN(**ckpt["net_args"])
    net.load_state_dict(ckpt["state_dict"])
    return ClassifierExtractor(net, ckpt["dataset"], ckpt["settings_hash"], ckpt["accuracy"],
                               device)


def load_or_train_classifier(dataset: str, train_images, train_labels, test_images,
                             test_labels, cache_dir, device="cpu", log=print
                             ) -> ClassifierExtractor:
    """The cached classifier for `dataset`, trained (on the full real training set the
    caller passes) and cached first if needed. Images in [-1, 1], labels int64."""
    path = classifier_cache_path(dataset, cache_dir)
    if path.is_file():
        try:
            ext = load_classifier(path, device)
            log(f"classifier loaded from {path} (test accuracy {ext.accuracy:.4f})")
            return ext
        except Exception as e:  # a truncated or stale file: train again
            log(f"classifier cache {path} unreadable ({type(e).__name__}: {e}); retraining")
    t0 = time.time()
    net, acc = train_classifier(train_images, train_labels, test_images, test_labels,
                                device, log)
    seconds = time.time() - t0
    ckpt = {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "net_args": net.args,
            "dataset": dataset, "settings_hash": _settings_hash(),
            "settings": json.dumps(CLASSIFIER_SETTINGS), "accuracy": acc,
            "train_seconds": seconds, "num_train": len(train_images)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees no file or a whole one
    log(f"classifier trained in {seconds:.0f}s, test accuracy {acc:.4f}, saved to {path}")
    return ClassifierExtractor(net, dataset, _settings_hash(), acc, device)


# ---------------------------------------------------------------- dispatch and stats

def build_extractor(eval_cfg, dataset_name: str, data_loader_fn: Callable[[], tuple],
                    device="cpu", log=print):
    """The extractor eval_cfg.extractor names, or None for 'none'.

    data_loader_fn() -> (train_images, train_labels, test_images, test_labels), float
    in [-1, 1] / int64, the FULL training set; called only if the classifier must be
    trained. Inception weights are checked before anything else is done.
    """
    kind = eval_cfg.extractor
    if kind == "none":
        return None
    if kind == "inception":
        return InceptionExtractor(check_inception_weights(eval_cfg), device)
    if kind == "classifier":
        cache_dir = default_cache_dir(eval_cfg)
        path = classifier_cache_path(dataset_name, cache_dir)
        if path.is_file():
            try:
                return load_classifier(path, device)
            except Exception:
                pass  # load_or_train_classifier reports it and retrains
        return load_or_train_classifier(dataset_name, *data_loader_fn(), cache_dir, device, log)
    raise ValueError(f"unknown eval.extractor {kind!r}")


def extractor_from_payload(payload: dict, device="cpu"):
    """Rebuild an extractor from `payload()` of the rank that loaded or trained it."""
    if payload["kind"] == "inception":
        return InceptionExtractor(None, device, state_dict=payload["state_dict"],
                                  key=payload["key"])
    net = SmallCNN(**payload["net_args"])
    net.load_state_dict(payload["state_dict"])
    return ClassifierExtractor(net, payload["dataset"], payload["settings_hash"],
                               payload["accuracy"], device)


def compute_stats(extractor, images: torch.Tensor, batch_size: int = 1000) -> FeatureStats:
    """Feature statistics of images, a chunk at a time (never all features in memory)."""
    stats = FeatureStats(extractor.dim)
    for i in range(0, len(images), batch_size):
        stats.update(extractor.features(images[i:i + batch_size]))
    return stats


def reference_stats(extractor, test_images: torch.Tensor, cache_dir,
                    dataset_key: str) -> FeatureStats:
    """Stats of the real test set, computed once and cached in cache_dir."""
    path = (Path(cache_dir).expanduser()
            / f"ref-{dataset_key}-{extractor.key}-n{len(test_images)}.npz")
    if path.is_file():
        return FeatureStats.load(path)
    stats = compute_stats(extractor, test_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


# ---------------------------------------------------------------- CLI

def main(argv: Optional[list[str]] = None) -> int:
    import dataclasses
    from fedmpi.config import ConfigError, load_config
    from fedmpi.data import DataError, load_arrays, to_float

    p = argparse.ArgumentParser(prog="python -m fedmpi.extractors")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-classifier",
                       help="train (or load) the cached fd_classifier network")
    t.add_argument("--config", default=None)
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        # The cache key does not include subsets: always the full real data.
        data_cfg = dataclasses.replace(cfg.data, train_subset=None, test_subset=None)
        device = cfg.run.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        xtr, ytr = load_arrays(data_cfg, "train")
        xte, yte = load_arrays(data_cfg, "test")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ext = load_or_train_classifier(cfg.data.dataset, to_float(xtr), torch.from_numpy(ytr),
                                   to_float(xte), torch.from_numpy(yte),
                                   default_cache_dir(cfg.eval), device)
    print(f"test accuracy: {ext.accuracy:.4f}")
    print(f"cache: {classifier_cache_path(cfg.data.dataset, default_cache_dir(cfg.eval))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
