"""`python -m fedmpi.extractors`: train or check the offline classifier used for fd_classifier."""

from __future__ import annotations

import argparse
import sys

import torch

from fedmpi.config import ConfigError
from fedmpi.data import DataError
from fedmpi.eval.classifier import load_or_train_classifier
from fedmpi.eval.extractors import default_cache_dir


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    from fedmpi.config import load_config
    from fedmpi.data import load_arrays, to_float

    p = argparse.ArgumentParser(
        prog="python -m fedmpi.extractors",
        description="Train (or load) the fd_classifier network on the test split alone.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "train-classifier",
        help="train (or load) the cached fd_classifier network on the test split",
    ).add_argument("--config", default=None)
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        device = cfg.run.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # The whole test split, as the federator's Evaluator uses (test_subset only
        # limits the reference statistics); the training set is never opened.
        x, y = load_arrays(dataclasses.replace(cfg.data, test_subset=None), "test")
        ext = load_or_train_classifier(
            cfg.data.dataset, to_float(x), torch.from_numpy(y), default_cache_dir(cfg.eval), device
        )
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"held-out accuracy: {ext.accuracy:.4f}")
    print(
        f"cache: {default_cache_dir(cfg.eval) / (ext.key + '.pt')} "
        f"(usable elsewhere as --eval.classifier_weights=FILE)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
