"""UNet communication regions: names, parameter membership, flat buffers.

A region is a top-level child of the UNet (`encoder`, `bottleneck`, `decoder`), so its
parameters are exactly those whose names start with ``"<region>."``. Aggregation moves
one contiguous float32 buffer per region; `flatten` / `unflatten` convert between that
buffer and the model's parameters, always in `named_parameters()` order so every rank
lays a region out identically.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

REGIONS = ("encoder", "bottleneck", "decoder")


def region_of(param_name: str) -> str:
    region = param_name.split(".", 1)[0]
    if region not in REGIONS:
        raise KeyError(f"parameter '{param_name}' belongs to no region")
    return region


def region_params(model: nn.Module, region: str) -> list[torch.nn.Parameter]:
    if region not in REGIONS:
        raise KeyError(f"unknown region '{region}' (known: {', '.join(REGIONS)})")
    return [p for name, p in model.named_parameters() if region_of(name) == region]


def region_sizes(model: nn.Module) -> dict[str, int]:
    """Number of parameters in each region, in REGIONS order."""
    sizes = {r: 0 for r in REGIONS}
    for name, p in model.named_parameters():
        sizes[region_of(name)] += p.numel()
    return sizes


def flatten(model: nn.Module, region: str, out: np.ndarray | None = None) -> np.ndarray:
    """The region's parameters as one contiguous float32 numpy buffer (on the CPU)."""
    params = region_params(model, region)
    n = sum(p.numel() for p in params)
    if out is None:
        out = np.empty(n, dtype=np.float32)
    elif out.shape != (n,) or out.dtype != np.float32:
        raise ValueError(f"buffer for region '{region}' must be float32[{n}]")
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params]).float().cpu()
    out[:] = flat.numpy()
    return out


def unflatten(model: nn.Module, region: str, buf: np.ndarray) -> None:
    """Copy a flat buffer (as produced by `flatten`) back into the region's parameters."""
    params = region_params(model, region)
    n = sum(p.numel() for p in params)
    if buf.size != n:
        raise ValueError(f"region '{region}' has {n} parameters, buffer has {buf.size}")
    src = torch.from_numpy(np.ascontiguousarray(buf, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            p.copy_(src[offset:offset + k].view_as(p).to(p.device, p.dtype))
            offset += k


def set_trainable(model: nn.Module, regions) -> None:
    """Freeze every parameter outside `regions` (and unfreeze those inside)."""
    keep = set(regions)
    for name, p in model.named_parameters():
        p.requires_grad_(region_of(name) in keep)
