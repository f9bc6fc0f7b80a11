"""Aggregation strategies: what happens to a region's upload at the Reduce, and to the sum.

This module owns the one interface that every way of averaging a region goes through
(`AggregationStrategy`), the description of one region's share of a round
(`RegionRound`), a rank's buffers that the strategies reduce through (`RegionBuffers`)
and plain FedAvg (`PlainFedAvg`). The other strategies live with their option:
`fedmpi.fl.secure.SecureFedAvg` (fixed point, pairwise masks, uint64 Reduce) and
`fedmpi.fl.privacy.DifferentialPrivacy` (clipping and noise, a wrapper around either).
The round's driver, `fedmpi.fl.aggregate.Aggregator`, builds the subgroups, calls the
strategy and keeps the ledger; a strategy never records bytes.

One region of one round, on the ranks that take part:

    client rank  prepare_client(...) -> stats  after each of its clients' training: that
                                             client's model (DP's clipping)
    every rank   begin_round(...) -> stats   once per round, before the first Reduce: a
                                             rank's work on all its uploads at once
    client       upload(...) -> buf          what it contributes to the region's SUM
    federator    receive(...) -> (dst, own)  where the sum lands, and its own summand
                                             (None: dst's contents are its summand)
    every member reduce(world, group, ...)   the collective (float or uint64 SUM)
    federator    finish(..., dst) -> bool    the average into its weights; True when that
                                             average is float arithmetic that the driver
                                             must check for overflow

A strategy keeps no model state (every call is given the rank's `RegionBuffers`), so it
can be run without a transport: add the clients' buffers to the federator's summand in
the buffer's dtype (numpy's uint64 wraps as MPI's SUM does), then call `finish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.fl.methods import fedavg_weights, pack_upload


def host_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as numpy (CPU: a view), else a host copy (`write_back` it)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def write_back(t: torch.Tensor, host: np.ndarray) -> None:
    """Copy `host_view(t)`'s changes back into a device tensor (a view needs nothing)."""
    if t.device.type != "cpu":
        t.copy_(torch.from_numpy(host))


@dataclass(frozen=True)
class RegionRound:
    """One region shared in one round, identical on every rank: who uploads it (client ids
    in plan order) and their FedAvg sizes (`Aggregator.reporting`: 0 leaves one out)."""

    region: str
    round_index: int
    uploaders: list[int]
    sizes: list[float]

    @property
    def weights(self) -> list[float]:
        """w_k = n_k / sum n of each uploader (`methods.fedavg_weights`)."""
        return fedavg_weights(self.sizes)

    @property
    def reported(self) -> bool:
        """Some uploader has weight > 0 (else all were left out: nothing is averaged)."""
        return sum(self.weights) > 0

    def size_of(self, client: int) -> float:
        return self.sizes[self.uploaders.index(client)]


class RegionBuffers:
    """A rank's flat region tensors and the scratch buffers the strategies reduce through.

    `flat[region]`: the region's weights as one tensor; `send[region]`: the same memory
    followed by one spare value (a FedAvg upload packed in place). `summand_device(t)`:
    where the federator's zero summand for a Reduce of `t` costs least (default: t's
    device; `World.summand_device` in a job)."""

    def __init__(self, flat: dict, send: dict, summand_device=None):
        self.flat, self.send = dict(flat), dict(send)
        self.sizes = {r: t.numel() for r, t in self.flat.items()}
        self._upload: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._zeros: torch.Tensor | None = None  # the federator's summand, allocated once
        self._summand_device = summand_device or (lambda t: t.device)

    @classmethod
    def zeros_like_sizes(cls, sizes: dict[str, int], dtype=torch.float32) -> RegionBuffers:
        """Zero weights of these region sizes on the CPU (one rank simulated, e.g. tests)."""
        send = {r: torch.zeros(n + 1, dtype=dtype) for r, n in sizes.items()}
        return cls({r: t[:-1] for r, t in send.items()}, send)

    def upload_buffer(self, region: str) -> torch.Tensor:
        """[n + 1] scratch values on the region's device, allocated once per run (the
        federator's: central DP's noise summand, or a sum it must not keep)."""
        buf = self._upload.get(region)
        if buf is None:
            t = self.flat[region]
            buf = self._upload[region] = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        return buf

    def save_before(self, region: str) -> torch.Tensor:
        """The federator's copy of the region's global weights before this round's Reduce
        overwrites them (a server optimizer's and DP's fixed denominator's `before`), in a
        buffer allocated once per run."""
        t = self.flat[region]
        buf = self._before.get(region)
        if buf is None:
            buf = self._before[region] = torch.empty_like(t)
        with torch.no_grad():
            buf.copy_(t)
        return buf

    def before(self, region: str) -> torch.Tensor:
        """The copy `save_before` made this round."""
        return self._before[region]

    def zeros(self, region: str) -> torch.Tensor:
        """[n + 1] zeros: the federator's own summand in a plain Reduce (one buffer, the
        largest region's size, shared by all regions), where the transport reads it (host
        memory when it stages device tensors through the host: no copy to stage zeros)."""
        n = self.sizes[region] + 1
        if self._zeros is None:
            t = self.flat[region]
            self._zeros = torch.zeros(
                max(self.sizes.values()) + 1, dtype=t.dtype, device=self._summand_device(t)
            )
        return self._zeros[:n]


class AggregationStrategy(ABC):
    """What a region's upload becomes before the Reduce, which Reduce sums it, and what
    the federator makes of the sum (see the module docstring for the call order).

    `value_bytes`: bytes per uploaded value (the ledger's width). `min_reporters`: a
    region with fewer reporters of size > 0 is withheld (`Aggregator.reporting`).
    `federator_summand`: the federator may add a float summand of its own to the sum
    (central DP's noise). `inner`: the wrapped strategy of a wrapper, else None."""

    value_bytes = 4
    min_reporters = 0
    federator_summand = True
    inner: AggregationStrategy | None = None

    @property
    def needs_before(self) -> bool:
        """The federator keeps each region's weights from before the Reduce
        (`RegionBuffers.before`): a server optimizer's start, DP's fixed denominator."""
        return self.inner.needs_before if self.inner is not None else False

    @property
    def prox_mu(self) -> float:
        """FedProx's proximal weight mu for the clients' local objective (0: none)."""
        return self.inner.prox_mu if self.inner is not None else 0.0

    def fedavg_sizes(self, sizes: list[float]) -> list[float]:
        """The FedAvg sizes this strategy averages with, from every client's n_k."""
        return sizes

    def released_every_round(self, shared) -> tuple:
        """The regions of `shared` released in every round, reported or not (DP with
        client sampling: each release carries the noise); default: none."""
        return self.inner.released_every_round(shared) if self.inner is not None else ()

    def prepare_client(self, bufs: RegionBuffers, regions: list, start) -> dict:
        """A client rank, once per client it trained this round, before that client's
        model joins the rank's mean: `bufs.flat` holds the client's weights, `regions`
        are those it uploads, `start` the round's global weights per region (DP clips the
        update here). Returns the client's statistics."""
        return self.inner.prepare_client(bufs, regions, start) if self.inner is not None else {}

    def begin_round(
        self, bufs: RegionBuffers, round_index: int, client, uploads: list, start
    ) -> dict:
        """Every rank, once per round before the first Reduce. `client`: this client's id
        (None on the federator); `uploads`: the `RegionRound`s it uploads, in region order;
        `start`: its weights at the round's start, per region. Returns its statistics."""
        return {}

    @abstractmethod
    def upload(self, bufs: RegionBuffers, job: RegionRound, client: int):
        """A client's buffer for the region's SUM Reduce."""

    @abstractmethod
    def receive(self, bufs: RegionBuffers, job: RegionRound):
        """The federator's (dst, own): the buffer the sum lands in, its own summand."""

    @abstractmethod
    def reduce(self, world, group, buf, own=None) -> int | None:
        """The collective: the root's `buf` becomes the group's sum. Returns the bytes one
        uploader handed to MPI when they differ from `buf`'s size (compressed uploads),
        else None."""

    @abstractmethod
    def finish(self, bufs: RegionBuffers, job: RegionRound, total) -> bool:
        """The federator, after the Reduce: the average into its weights; True when that
        average is float arithmetic that may have overflowed (the driver checks it)."""

    def epsilon(self, rounds: int) -> float | None:
        """The DP guarantee after `rounds` rounds (None: no DP)."""
        return None

    def find(self, kind: type) -> AggregationStrategy | None:
        """This strategy, or the one it wraps (and so on), that is a `kind`; else None."""
        s = self
        while s is not None and not isinstance(s, kind):
            s = s.inner
        return s


class PlainFedAvg(AggregationStrategy):
    """FedAvg in float32 (McMahan et al., 2017), with no copy of the model.

    A reporter packs [w_k theta_k, w_k] in place over its own weights (`pack_upload`);
    one float SUM Reduce over the region's reporters writes sum_k w_k theta_k, the
    average itself, straight into the federator's weights, its own summand being zeros.
    When every reporter was left out (all w_k = 0) the sum goes to a scratch buffer and
    the federator keeps its weights."""

    def upload(self, bufs, job, client):
        w = job.weights[job.uploaders.index(client)]
        return pack_upload(bufs.flat[job.region], w, bufs.send[job.region])  # in place

    def receive(self, bufs, job):
        dst = bufs.send[job.region] if job.reported else bufs.upload_buffer(job.region)
        return dst, bufs.zeros(job.region)

    def reduce(self, world, group, buf, own=None):
        world.reduce_sum(group, buf, root_send=own)

    def finish(self, bufs, job, total):
        return job.reported  # the Reduce wrote the average into the weights


class Wrapper(AggregationStrategy):
    """A strategy around another (`inner`) that changes some steps and passes the rest on:
    DP (`fedmpi.fl.privacy.DifferentialPrivacy`), FedProx and server optimizers."""

    def __init__(self, inner: AggregationStrategy):
        self.inner = inner

    @property
    def value_bytes(self) -> int:
        return self.inner.value_bytes

    @property
    def min_reporters(self) -> int:
        return self.inner.min_reporters

    @property
    def federator_summand(self) -> bool:
        return self.inner.federator_summand

    def fedavg_sizes(self, sizes):
        return self.inner.fedavg_sizes(sizes)

    def begin_round(self, bufs, round_index, client, uploads, start):
        return self.inner.begin_round(bufs, round_index, client, uploads, start)

    def upload(self, bufs, job, client):
        return self.inner.upload(bufs, job, client)

    def receive(self, bufs, job):
        return self.inner.receive(bufs, job)

    def reduce(self, world, group, buf, own=None):
        return self.inner.reduce(world, group, buf, own)

    def finish(self, bufs, job, total):
        return self.inner.finish(bufs, job, total)

    def epsilon(self, rounds: int) -> float | None:
        return self.inner.epsilon(rounds)


class FedProx(Wrapper):
    """FedProx (Li et al., MLSys 2020): the clients add (mu / 2) ||w - w_global||^2 to
    their local objective (`fedmpi.train.trainer.LocalTrainer`'s prox_mu); the
    aggregation itself is the inner strategy's."""

    def __init__(self, inner: AggregationStrategy, mu: float):
        super().__init__(inner)
        self.mu = float(mu)

    @property
    def prox_mu(self) -> float:
        return self.mu


class ServerOptimized(Wrapper):
    """A server optimizer (`fedmpi.fl.server_opt.ServerOptimizer`: FedAvgM, FedAdam,
    FedYogi) on the inner strategy's average: the federator turns each region's average
    into before + step(average - before) before the broadcast, so the clients receive
    the server-updated weights. Its moments are the federator's checkpoint state."""

    def __init__(self, inner: AggregationStrategy, optimizer):
        super().__init__(inner)
        self.optimizer = optimizer

    @property
    def needs_before(self) -> bool:
        return True

    def finish(self, bufs, job, total):
        out = self.inner.finish(bufs, job, total)
        if job.reported:
            with torch.no_grad():
                self.optimizer.step(job.region, bufs.before(job.region), bufs.flat[job.region])
        return out or job.reported  # the step is float arithmetic: check it for overflow
