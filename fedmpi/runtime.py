"""Runtime facts every package below the round loop needs: which device a rank uses, how
many CPU threads, which autocast precision, and how seeds are derived from the run seed.

Imports only torch and numpy, so model, data, eval and train may all use it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, client, ...), stable across runs."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


def pick_device(setting: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda:(local_rank % visible GPUs) when CUDA is available (and allowed), else CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but CUDA is not available on this node")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _node_cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def share_cpu_threads(ranks_on_node: int) -> None:
    """Split the node's cores between the ranks on it, unless OMP_NUM_THREADS decides:
    oversubscribed torch thread pools slow every rank down."""
    if "OMP_NUM_THREADS" not in os.environ and ranks_on_node > 1:
        torch.set_num_threads(max(1, _node_cores() // ranks_on_node))


@contextmanager
def all_cpu_threads():
    """Every core of the node for this rank while the others wait asleep (the federator
    training the offline classifier at a job's start), then the thread count as before;
    OMP_NUM_THREADS, when set, still decides."""
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_node_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast_for(precision: str, device: torch.device):
    """The autocast context of `train.precision` on `device` (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
