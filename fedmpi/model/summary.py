"""`python -m fedmpi.summary --config CONFIG`: parameters and float32 bytes per UNet region."""

from __future__ import annotations

from fedmpi.data import dataset_info
from fedmpi.model.regions import REGIONS, region_sizes
from fedmpi.model.unet import build_unet


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
