"""FULL / USPLIT / UDEC / ULATDEC as pure plans, and FedAvg as pure functions.

A `Plan` says, for one round, which regions each client uploads and which it receives
back. Plans depend only on (method, round, number of clients, run seed, the round's
participants), so every rank computes the same plan with no communication. Clients are
numbered 0..N-1 (`fedmpi.fl.population` says which rank hosts each); a client that does
not take part in the round uploads and receives nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.model.regions import REGIONS

METHODS = ("full", "usplit", "udec", "ulatdec")
SHARED = {"full": REGIONS, "udec": ("decoder",), "ulatdec": ("bottleneck", "decoder")}


@dataclass(frozen=True)
class Plan:
    round: int
    uploads: tuple[frozenset, ...]  # uploads[k]: regions client k reports
    downloads: tuple[frozenset, ...]  # downloads[k]: regions client k receives back

    def __post_init__(self):
        # A client packs its upload in place, over its own weights (Aggregator.exchange):
        # every region it uploads must come back to it in the same round's broadcast.
        for k, (up, down) in enumerate(zip(self.uploads, self.downloads)):
            if not up <= down:
                raise ValueError(
                    f"plan of round {self.round}: client {k} uploads "
                    f"{sorted(up - down)} but does not receive it back"
                )

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


def make_plan(
    method: str, round_index: int, num_clients: int, seed: int, participants=None
) -> Plan:
    """The plan of one round. `participants`: the clients taking part (None: all); USPLIT
    pairs them among themselves (with all clients: the pairing of every round so far)."""
    if num_clients < 1:
        raise ValueError("need at least one client")
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    taking = list(range(num_clients)) if participants is None else sorted(participants)
    nothing = frozenset()
    ups, downs = [nothing] * num_clients, [nothing] * num_clients
    if method == "usplit":
        # Each part is averaged over its reporters; every client gets the whole model back.
        parts = usplit_assignment(len(taking), round_index, seed) if taking else []
        for c, part in zip(taking, parts):
            ups[c], downs[c] = part, frozenset(REGIONS)
    else:
        for c in taking:
            ups[c] = downs[c] = frozenset(SHARED[method])
    return Plan(round_index, tuple(ups), tuple(downs))


def shared_regions(method: str) -> tuple[str, ...]:
    """Regions that some client may upload (USPLIT: all of them, by turns)."""
    return REGIONS if method in ("full", "usplit") else tuple(SHARED[method])


def personal_regions(method: str) -> tuple[str, ...]:
    """Regions that never leave a client (evaluated per client)."""
    if method in ("full", "usplit"):
        return ()
    return tuple(r for r in REGIONS if r not in SHARED[method])


def fedavg_weights(sizes) -> list[float]:
    """Each reporter's FedAvg weight w_k = n_k / sum n (computed in float64); all 0 when
    the sizes sum to 0 (every reporter left out of the round)."""
    total = float(sum(sizes))
    return [float(n) / total if total > 0 else 0.0 for n in sizes]


def pack_upload(theta: torch.Tensor, w: float, out: torch.Tensor) -> torch.Tensor:
    """A client's FedAvg upload of one region, [w_k * theta_k, w_k] with w_k from
    `fedavg_weights`, written into `out` (theta.numel() + 1 values; `out[:-1]` may be
    `theta` itself: packed in place). Summed over the region's reporters it is
    [sum_k w_k theta_k, 1]: the average itself, which the federator's Reduce writes
    straight into its weights. w = 0 (a client left out of the round) uploads zeros,
    whatever theta holds (it may be NaN)."""
    if w == 0:
        return out.zero_()
    torch.mul(theta, w, out=out[:-1])
    out[-1:].fill_(w)  # a fill, not a host-to-device copy of a scalar, on a GPU
    return out


def fedavg(buffers: list[np.ndarray], sizes: list[float]) -> np.ndarray:
    """Size-weighted average sum_k n_k theta_k / sum_k n_k, accumulated in float64, by
    the same `fedavg_weights` / `pack_upload` that the aggregation runs."""
    if not buffers:
        raise ValueError("nothing to average")
    if float(sum(sizes)) <= 0:
        raise ValueError("client sizes must sum to a positive number")
    n = buffers[0].size
    acc = torch.zeros(n + 1, dtype=torch.float64)
    one = torch.empty(n + 1, dtype=torch.float64)
    for buf, w in zip(buffers, fedavg_weights(sizes)):
        acc += pack_upload(torch.from_numpy(np.asarray(buf, dtype=np.float64)).reshape(-1), w, one)
    return acc[:-1].reshape(buffers[0].shape).float().numpy()
