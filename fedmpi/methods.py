"""FULL / USPLIT / UDEC / ULATDEC as pure plans, and FedAvg as a pure function.

A `Plan` says, for one round, which regions each client uploads and which it receives
back. Plans depend only on (method, round, number of clients, run seed), so every rank
computes the same plan with no communication. Clients are numbered 0..K-1 here; client
k runs on MPI rank k + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .regions import REGIONS

METHODS = ("full", "usplit", "udec", "ulatdec")
SHARED = {"full": REGIONS, "udec": ("decoder",), "ulatdec": ("bottleneck", "decoder")}


@dataclass(frozen=True)
class Plan:
    round: int
    uploads: tuple[frozenset, ...]     # uploads[k]: regions client k reports
    downloads: tuple[frozenset, ...]   # downloads[k]: regions client k receives back

    @property
    def num_clients(self) -> int:
        return len(self.uploads)

    def uploaders(self, region: str) -> list[int]:
        return [k for k, regs in enumerate(self.uploads) if region in regs]

    def receivers(self, region: str) -> list[int]:
        return [k for k, regs in enumerate(self.downloads) if region in regs]


def usplit_assignment(num_clients: int, round_index: int, seed: int) -> list[frozenset]:
    """Random pairing redrawn every round: one of a pair reports the encoder, the other
    the decoder, and a coin flip gives one of them the bottleneck. With odd K the last
    client reports the bottleneck plus, by a coin flip, the encoder or the decoder."""
    if num_clients == 1:
        return [frozenset(REGIONS)]
    rng = np.random.default_rng([seed, round_index, 0x05B117])
    order = rng.permutation(num_clients)
    parts: list[set] = [set() for _ in range(num_clients)]
    for i in range(0, num_clients - 1, 2):
        a, b = order[i], order[i + 1]
        parts[a].add("encoder")
        parts[b].add("decoder")
        parts[(a, b)[rng.integers(2)]].add("bottleneck")
    if num_clients % 2:
        last = order[-1]
        parts[last].update({"bottleneck", ("encoder", "decoder")[rng.integers(2)]})
    return [frozenset(p) for p in parts]


def make_plan(method: str, round_index: int, num_clients: int, seed: int) -> Plan:
    if num_clients < 1:
        raise ValueError("need at least one client")
    if method == "usplit":
        ups = tuple(usplit_assignment(num_clients, round_index, seed))
        # Each part is averaged over its reporters; every client gets the whole model back.
        return Plan(round_index, ups, tuple(frozenset(REGIONS) for _ in range(num_clients)))
    if method not in SHARED:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    shared = frozenset(SHARED[method])
    return Plan(round_index, (shared,) * num_clients, (shared,) * num_clients)


def personal_regions(method: str) -> tuple[str, ...]:
    """Regions that never leave a client (evaluated per client)."""
    if method in ("full", "usplit"):
        return ()
    return tuple(r for r in REGIONS if r not in SHARED[method])


def pack_upload(theta: torch.Tensor, n_k: float, out: torch.Tensor) -> torch.Tensor:
    """A client's FedAvg upload of one region, [n_k * theta_k, n_k], written into `out`
    (theta.numel() + 1 values): summed over the reporters it holds numerator and weight.
    n_k = 0 (a client left out of the round) uploads zeros, whatever theta holds."""
    if n_k == 0:  # left out of the round: nothing of its weights (they may be NaN)
        return out.zero_()
    torch.mul(theta, n_k, out=out[:-1])
    out[-1:].fill_(n_k)  # a fill, not a host-to-device copy of a scalar, on a GPU
    return out


def average_into(total: torch.Tensor, out: torch.Tensor) -> bool:
    """The federator's step: sum_k n_k theta_k / sum_k n_k from the summed uploads, into
    `out`. Returns False (out untouched) when the reporters' weights sum to 0 (every
    reporter left out of the round)."""
    weight = float(total[-1])
    if weight <= 0:
        return False
    torch.div(total[:-1], weight, out=out)
    return True


def fedavg(buffers: list[np.ndarray], sizes: list[float]) -> np.ndarray:
    """Size-weighted average sum_k n_k theta_k / sum_k n_k, accumulated in float64, by
    the same `pack_upload` / `average_into` that the aggregation runs."""
    if not buffers:
        raise ValueError("nothing to average")
    if float(sum(sizes)) <= 0:
        raise ValueError("client sizes must sum to a positive number")
    n = buffers[0].size
    acc = torch.zeros(n + 1, dtype=torch.float64)
    one = torch.empty(n + 1, dtype=torch.float64)
    for buf, n_k in zip(buffers, sizes):
        acc += pack_upload(torch.from_numpy(np.asarray(buf, dtype=np.float64)).reshape(-1),
                           float(n_k), one)
    out = torch.empty(n, dtype=torch.float64)
    average_into(acc, out)
    return out.reshape(buffers[0].shape).float().numpy()
