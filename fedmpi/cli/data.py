"""`python -m fedmpi.data split`: compute a split, print its per-client table, write HDF5 shards."""

from __future__ import annotations

import argparse
import sys

from fedmpi.config import ConfigError, load_config
from fedmpi.data.datasets import _split_seed, compute_split, dataset_info, load_arrays
from fedmpi.data.partition import client_table, plot_report, save_report_json, split_table
from fedmpi.data.shards import write_shards
from fedmpi.errors import DataError


def _cmd_split(args, overrides: list[str]) -> None:
    cfg = load_config(args.config, overrides)
    k = args.clients if args.clients is not None else cfg.split.num_clients
    if k is None:
        raise ConfigError("give the number of clients with --clients K or split.num_clients")
    if k < 1:
        raise ConfigError(f"--clients must be >= 1, got {k}")
    if not (args.out or args.report or args.json or args.png):
        raise ConfigError("nothing to do: give --out FILE and/or --report / --json / --png")
    images, labels = load_arrays(cfg.data, "train")
    parts = compute_split(cfg, labels, k)
    num_classes = dataset_info(cfg.data.dataset)[2]
    rows = client_table(labels, parts, num_classes)
    s = cfg.split
    if args.report:
        print(
            f"{cfg.data.dataset}: {len(labels)} training images, {k} clients, split {s.kind} "
            f"(beta={s.beta}, min_size={s.min_size}, classes_per_client={s.classes_per_client}, "
            f"seed={_split_seed(cfg)}, rng={s.rng})"
        )
        print(split_table(rows))
    if args.json:
        save_report_json(rows, args.json)
    if args.png:
        plot_report(rows, args.png)
    if args.out:
        test_images, test_labels = load_arrays(cfg.data, "test")
        meta = {
            "dataset": cfg.data.dataset,
            "split_kind": s.kind,
            "seed": _split_seed(cfg),
            "num_clients": k,
            "split": cfg.to_dict()["split"],
            "train_subset": cfg.data.train_subset,
            "test_subset": cfg.data.test_subset,
            "num_classes": num_classes,
        }
        write_shards(args.out, images, labels, parts, test_images, test_labels, meta)
        print(
            f"wrote {args.out}: {k} clients, sizes {[len(p) for p in parts]}, "
            f"{len(test_labels)} test images"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmpi.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser(
        "split",
        help="split the training set over clients",
        epilog="Extra --section.key=value arguments override the config.",
    )
    sp.add_argument("--config", help="YAML config (default: built-in defaults)")
    sp.add_argument("--clients", type=int, help="number of clients (default: split.num_clients)")
    sp.add_argument("--out", help="HDF5 shards file to write")
    sp.add_argument("--report", action="store_true", help="print the per-client class table")
    sp.add_argument("--json", help="write the per-client table as JSON")
    sp.add_argument("--png", help="write a stacked bar chart of the per-client classes")
    args, overrides = parser.parse_known_args(argv)
    try:
        _cmd_split(args, overrides)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
