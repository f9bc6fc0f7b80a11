"""`python -m fedmpi.summary --config CONFIG`: parameters and float32 bytes per UNet region."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .data import dataset_info
from .regions import REGIONS, region_sizes
from .unet import build_unet


def model_shape(cfg) -> tuple[int, int]:
    """(channels, image size): from the config when set, else from the dataset."""
    channels, size, _ = dataset_info(cfg.data.dataset)
    return cfg.model.channels or channels, cfg.model.image_size or size


def model_region_sizes(cfg) -> dict[str, int]:
    channels, size = model_shape(cfg)
    return region_sizes(build_unet(cfg.model, channels, size))


def format_summary(sizes: dict[str, int]) -> str:
    total = sum(sizes.values())
    lines = [f"{'region':<11} {'parameters':>12} {'share':>7} {'bytes (fp32)':>14}"]
    for r in REGIONS:
        lines.append(f"{r:<11} {sizes[r]:>12,} {sizes[r] / total:>7.1%} {4 * sizes[r]:>14,}")
    lines.append(f"{'total':<11} {total:>12,} {1:>7.1%} {4 * total:>14,}")
    return "\n".join(lines)


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
    print(f"UNet dim={cfg.model.dim} dim_mults={list(cfg.model.dim_mults)} "
          f"input {channels}x{size}x{size}")
    print(format_summary(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
