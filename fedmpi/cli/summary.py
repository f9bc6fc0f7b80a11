"""`python -m fedmpi.summary`: a config's UNet regions, parameters and bytes."""

from __future__ import annotations

import argparse
import sys

from fedmpi.config import ConfigError, load_config
from fedmpi.model.summary import format_summary, model_region_sizes, model_shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmpi.summary", description=__doc__)
    p.add_argument("--config", default=None)
    args, rest = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
        sizes = model_region_sizes(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels, size = model_shape(cfg)
    print(
        f"UNet dim={cfg.model.dim} dim_mults={list(cfg.model.dim_mults)} "
        f"input {channels}x{size}x{size}"
    )
    print(format_summary(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
