"""Aggregation: the initial broadcast and the per-region FedAvg exchange of each round.

Every rank holds its model's regions as one flat tensor each (`regions.bind_flat`), on
its training device, followed by one spare value (the region's send buffer). Every
rank knows every client's size n_k before the exchange (the round's flag collective
carries it), so the weights w_k = n_k / sum n over a region's reporters are known
everywhere (`methods.fedavg_weights`). For each region shared in a round (the plan,
identical on every rank, says who reports and who receives it):

    reporters:  pack_upload(theta_k, w_k) -> [w_k * theta_k, w_k], in place over the
                client's own weights (methods.py, pure; the plan returns every region
                a client uploads to it in the same round)
    Reduce(SUM) of those buffers over the subgroup of the reporters, straight into the
                federator's send buffer: its weights become sum_k w_k theta_k, the
                average (the federator adds zeros, or central DP's noise / m)
    Bcast of theta, in place into every receiver's weights, over the receivers' subgroup
    federator:  one finiteness check of the averages (float32 overflow), after the
                broadcasts (one host sync; a failure stops the job before any checkpoint)

Communication works on torch tensors in place (`World.reduce_sum` / `World.bcast`):
on the CPU no copies at all; on GPUs with NCCL (or a CUDA-aware MPI) none either; with
a host-only MPI one device-to-host copy before and one host-to-device copy after each
call. The ledger records the bytes of the buffers actually handed to the collectives.
`bench/comm.py` times this module against bare collectives on the same tensors.

Two options change the upload, never the plan or the broadcast (`Aggregator(..., cfg)`):

- `fed.secure` (fedmpi.fl.secure): the same [n_k * theta_k, n_k] is encoded in fixed point
  as uint64 and masked with the other reporters of this region in this round (all of a
  client's regions first, then one sleeping barrier); one integer SUM Reduce per region
  (`World.reduce_sum_u64`) over the same subgroup; the federator decodes only the sum,
  divides and broadcasts float32 as usual. The pair keys are agreed once, when the
  Aggregator is built (a collective on every rank). The work is on host memory: a GPU
  model pays one copy of each region each way.
- `privacy.dp` (fedmpi.fl.privacy): before the uploads, each client replaces the regions
  it uploads by start + clip(theta - start) (+ its distributed noise share), with
  uniform weight 1; in central mode the federator adds the noise to its own zero
  contribution to the sum. The client's weights may be overwritten this way because
  every region a client uploads comes back to it in the same round's broadcast.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedmpi.fl.ledger import Ledger
from fedmpi.fl.methods import fedavg_weights, make_plan, pack_upload
from fedmpi.model.regions import REGIONS, bind_flat, finite, region_send_buffer, region_tensor


class NonFiniteAverage(RuntimeError):
    """Finite uploads whose average is not finite (float32 overflow of the sum)."""


def check_secure_plans(cfg, num_clients: int) -> None:
    """At set-up (pure, identical on every rank): every region of every round's plan must
    have enough reporters to hide a single upload; raises ConfigError naming the first
    region and round that does not, and the fix."""
    from fedmpi.config import ConfigError
    from fedmpi.fl.secure import SecureAggError, check_reporters

    if not cfg.fed.secure:
        return
    for r in range(1, cfg.fed.rounds + 1):
        plan = make_plan(cfg.fed.method, r, num_clients, cfg.run.seed)
        for region in REGIONS:
            try:
                check_reporters(region, r, plan.uploaders(region), cfg.fed.secure_min_reporters)
            except SecureAggError as e:
                raise ConfigError(f"{e} (fed.method={cfg.fed.method}, K={num_clients})") from None


class _SecureUploads:
    """A rank's side of fed.secure: its key pair and pair secrets (clients) and the uint64
    upload buffers, allocated once per run."""

    def __init__(self, world, fed_cfg):
        import os

        from fedmpi.fl.secure import SecureAggregator

        self.frac_bits = fed_cfg.secure_frac_bits
        self.neighbors = fed_cfg.secure_neighbors
        self.client = None if world.is_federator else SecureAggregator(world.client, self.frac_bits)
        # Key agreement, once per run: the federator relays every client's public key
        # and adds a fresh nonce that binds the pair secrets to this job.
        mine = os.urandom(16).hex() if world.is_federator else self.client.public_bytes()
        relayed = world.relay(mine)
        if self.client is not None:
            self.client.establish(
                {rank - 1: pub for rank, pub in enumerate(relayed) if rank > 0}, run_id=relayed[0]
            )
        self.words: dict[str, np.ndarray] = {}

    def buffer(self, region: str, n: int) -> np.ndarray:
        buf = self.words.get(region)
        if buf is None:
            buf = self.words[region] = np.empty(n + 1, np.uint64)
        return buf


def _host(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as numpy (CPU: a view), else a host copy (write it back)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _write_back(t: torch.Tensor, host: np.ndarray) -> None:
    if t.device.type != "cpu":
        t.copy_(torch.from_numpy(host))


class Aggregator:
    """Owns a rank's region tensors, its reusable upload buffers and the exchange.

    `cfg` (optional): a Config whose fed.secure / privacy.dp choose the secure and DP
    uploads; with fed.secure the constructor runs the key agreement, so every rank must
    build its Aggregator at the same point."""

    def __init__(self, world, model: torch.nn.Module, ledger: Ledger, cfg=None):
        self.world, self.ledger = world, ledger
        if not all(region_tensor(model, r, required=False) is not None for r in REGIONS):
            bind_flat(model)
        self.flat = {r: region_tensor(model, r) for r in REGIONS}
        self.send = {r: region_send_buffer(model, r) for r in REGIONS}  # flat + 1 spare value
        self.sizes = {r: t.numel() for r, t in self.flat.items()}
        self._upload: dict[str, torch.Tensor] = {}
        self._zeros: torch.Tensor | None = None  # the federator's summand, allocated once
        self.secure = _SecureUploads(world, cfg.fed) if cfg is not None and cfg.fed.secure else None
        self.min_reporters = cfg.fed.secure_min_reporters if self.secure is not None else 0
        self.dp = cfg.privacy if cfg is not None and cfg.privacy.dp else None
        self._rng = None
        if self.dp is not None:
            from fedmpi.fl.privacy import noise_generator

            self._rng = noise_generator()

    @property
    def upload_value_bytes(self) -> int:
        """Bytes per uploaded value: 8 (uint64 fixed point) when secure, else 4."""
        return 8 if self.secure is not None else 4

    def upload_buffer(self, region: str) -> torch.Tensor:
        """[n + 1] scratch values on the region's device, allocated once per run (the
        federator's: central DP's noise summand, or a sum it must not keep)."""
        buf = self._upload.get(region)
        if buf is None:
            t = self.flat[region]
            buf = self._upload[region] = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        return buf

    def zeros(self, region: str) -> torch.Tensor:
        """[n + 1] zeros: the federator's own summand in a plain Reduce (one buffer, the
        largest region's size, shared by all regions), where the transport reads it (host
        memory when it stages device tensors through the host: no copy to stage zeros)."""
        n = self.sizes[region] + 1
        if self._zeros is None:
            t = self.flat[region]
            self._zeros = torch.zeros(
                max(self.sizes.values()) + 1, dtype=t.dtype, device=self.world.summand_device(t)
            )
        return self._zeros[:n]

    def initial_broadcast(self) -> None:
        """The federator's full model to every client (round 0 of the ledger)."""
        world = self.world
        group = world.group(range(world.num_clients))
        for region in REGIONS:
            t = self.flat[region]
            with torch.no_grad():
                world.bcast(group, t)
            self._record_down(0, region, t, range(world.num_clients))
        world.release(group)

    def exchange(
        self,
        plan,
        sizes,
        round_index: int,
        timings: dict | None = None,
        start: dict | None = None,
    ) -> dict:
        """Aggregate every region shared in this round (every rank calls this).

        `sizes`: every client's FedAvg size n_k (K values, client 0 first), the same on
        every rank; 0 leaves a client out of this round's averages. `start`: with
        privacy.dp, a client's weights at the start of the round, per region
        (federated.RoundStart.weights). Returns this rank's DP statistics (a client's
        update norm before and after clipping), else {}."""
        world = self.world
        stats = {}
        reporting = self.reporting(plan, sizes)
        if self.dp is not None and not world.is_federator:
            stats = self._privatize(plan, start, reporting)
        if self.secure is not None:
            self._mask_uploads(plan, reporting, round_index)
        averaged, sums = [], []  # regions the federator averaged into its weights; their sums
        for region in REGIONS:
            ups, downs = plan.uploaders(region), plan.receivers(region)
            up_group = world.group(ups) if ups else None
            down_group = None
            if downs:
                down_group = up_group if downs == ups else world.group(downs)
            t0 = time.perf_counter()
            theta = self.flat[region]
            plain_average = False  # the federator reduced this region's average into theta
            with torch.no_grad():
                if up_group is not None and up_group.is_member:
                    if self.secure is not None:
                        self._reduce_secure(up_group, ups, region, theta, round_index)
                    else:
                        plain_average = self._reduce_plain(
                            up_group, ups, region, reporting[region], round_index
                        )
                if down_group is not None and down_group.is_member:
                    world.bcast(down_group, theta)
                    self._record_down(round_index, region, theta, downs)
                if plain_average:  # summed while the clients pack the next region
                    averaged.append(region)
                    sums.append(theta.sum(dtype=torch.float32))
            if timings is not None:
                timings[region] = timings.get(region, 0.0) + time.perf_counter() - t0
            for g in {id(g): g for g in (up_group, down_group) if g is not None}.values():
                world.release(g)
        # Decided once, after the broadcasts (one host sync on a GPU): a non-finite average
        # stops the job (the federator raises; no checkpoint ever marks this round).
        if averaged and not finite(*[self.flat[r] for r in averaged], sums=sums):
            bad = [r for r in averaged if not finite(self.flat[r])]
            raise NonFiniteAverage(
                f"round {round_index}: the average of region(s) {', '.join(bad)} is not "
                f"finite although every upload was (float32 overflow)"
            )
        return stats

    def reporting(self, plan, sizes) -> dict[str, list[float]]:
        """Per region shared this round, the FedAvg sizes of its uploaders in plan order
        (pure: the same on every rank). `sizes`: every client's n_k, 0 for a client left
        out of the round (fed.on_nonfinite: skip). With privacy.dp every size is 1 (0 stays
        0). With fed.secure, a region left with fewer clients of size > 0 than
        fed.secure_min_reporters gets all sizes 0: its sum would show the rest's upload in
        the clear, so the federator keeps the region's previous average (`withheld`)."""
        sizes = [float(n) for n in sizes]
        if len(sizes) != self.world.num_clients:
            raise ValueError(
                f"exchange needs {self.world.num_clients} client sizes, got {len(sizes)}"
            )
        if self.dp is not None:
            sizes = [1.0 if n > 0 else 0.0 for n in sizes]  # uniform; 0 keeps a skipped client out
        out = {}
        for region in REGIONS:
            ups = plan.uploaders(region)
            if ups:
                mine = [sizes[k] for k in ups]
                if 0 < sum(n > 0 for n in mine) < self.min_reporters:
                    mine = [0.0] * len(ups)
                out[region] = mine
        return out

    def withheld(self, plan, sizes) -> list[str]:
        """The regions `reporting` leaves unaveraged because clients were left out."""
        return [
            r
            for r, n in self.reporting(plan, sizes).items()
            if not any(n) and any(sizes[k] > 0 for k in plan.uploaders(r))
        ]

    def _reduce_plain(self, group, ups, region: str, sizes: list, round_index: int) -> bool:
        """A client's upload, or the federator's Reduce of the average into its weights;
        True on the federator when it averaged (some reporter had weight > 0). `sizes`: the
        region's uploaders' (`reporting`)."""
        world, theta, send = self.world, self.flat[region], self.send[region]
        weights = fedavg_weights(sizes)
        nbytes = send.numel() * send.element_size()
        if not world.is_federator:
            pack_upload(theta, weights[ups.index(world.client)], send)  # in place
            self.ledger.record(round_index, world.client, region, "up", theta.numel(), nbytes)
            world.reduce_sum(group, send)
            return False
        averaged = sum(weights) > 0  # else every reporter was left out: theta is kept
        summand = self.zeros(region)
        if averaged and self.dp is not None and self.dp.mode == "central":
            summand = self.upload_buffer(region).zero_()
            self._central_noise(summand[:-1], reporters=sum(sizes))
        world.reduce_sum(group, send if averaged else self.upload_buffer(region), root_send=summand)
        for _ in ups:
            self.ledger.record(round_index, -1, region, "up", theta.numel(), nbytes)
        return averaged

    def _mask_uploads(self, plan, reporting: dict, round_index: int) -> None:
        """Secure: every client encodes and masks all the regions it uploads this round,
        with its size n_k there (`reporting`), then all ranks meet in a barrier that sleeps
        while it waits. Masking takes CPU time that differs between clients; ranks that
        finished would otherwise busy-poll inside the Reduce, taking the cores of those
        still masking when ranks share them."""
        world, sec = self.world, self.secure
        if not world.is_federator:
            for region in REGIONS:
                ups = plan.uploaders(region)
                if world.client in ups:
                    theta = self.flat[region]
                    n_k = reporting[region][ups.index(world.client)]
                    sec.client.upload_fedavg(
                        _host(theta),
                        n_k,
                        round_index,
                        region,
                        ups,
                        out=sec.buffer(region, theta.numel()),
                        neighbors=sec.neighbors,
                    )
        world.wait_all(f"round {round_index}: secure aggregation (masking)")

    def _reduce_secure(
        self, group, ups, region: str, theta: torch.Tensor, round_index: int
    ) -> None:
        """The secure twin of `_reduce_plain`: the masked uint64 upload (`_mask_uploads`),
        integer SUM, the federator decodes the sum only (finite uploads: a finite sum)."""
        from fedmpi.fl.secure import decode_average

        world, sec = self.world, self.secure
        buf = sec.buffer(region, theta.numel())
        if world.is_federator:
            buf.fill(0)
        else:
            self.ledger.record(round_index, world.client, region, "up", theta.numel(), buf.nbytes)
        world.reduce_sum_u64(group, buf)
        if world.is_federator:
            for _ in ups:
                self.ledger.record(round_index, -1, region, "up", theta.numel(), buf.nbytes)
            host = _host(theta)
            if decode_average(buf, sec.frac_bits, out=host) > 0:  # else all were left out
                _write_back(theta, host)

    def _privatize(self, plan, start: dict | None, reporting: dict) -> dict:
        """Client side of DP-FedAvg: clip this client's update of the regions it uploads
        (one L2 norm over all of them) and add its noise share (distributed mode: 1/sqrt(m)
        of the noise for the m reporters of the region that are not left out, so that
        their sum carries all of it)."""
        from fedmpi.fl.privacy import noise_std, privatize_update

        dp = self.dp
        mine = [r for r in REGIONS if r in plan.uploads[self.world.client]]
        if not mine:
            return {}
        if start is None:
            raise RuntimeError(
                "privacy.dp needs the client's weights at the round's start "
                "(Aggregator.exchange(..., start=RoundStart.weights))"
            )
        stds = [
            noise_std(
                dp.noise_multiplier, dp.clip, dp.mode, max(1, sum(n > 0 for n in reporting[r]))
            )
            if dp.mode == "distributed"
            else 0.0
            for r in mine
        ]
        thetas = [_host(self.flat[r]) for r in mine]
        norm, clipped = privatize_update(
            thetas, [_host(start[r]) for r in mine], dp.clip, stds, self._rng
        )
        for r, host in zip(mine, thetas):
            _write_back(self.flat[r], host)
        return {"dp_update_norm": norm, "dp_clipped_norm": clipped}

    def _central_noise(self, t: torch.Tensor, reporters: float) -> None:
        """Central DP: N(0, (z C)^2) per coordinate on the sum of the clipped uploads,
        i.e. N(0, (z C / m)^2) on the average of m reporters: the federator's summand."""
        from fedmpi.fl.privacy import add_noise, noise_std

        std = noise_std(self.dp.noise_multiplier, self.dp.clip, "central", 1) / reporters
        host = _host(t)
        add_noise(host, std, self._rng)
        _write_back(t, host)

    def epsilon(self, rounds: int) -> float | None:
        """The (epsilon, privacy.delta) guarantee after `rounds` rounds (None without DP)."""
        if self.dp is None:
            return None
        from fedmpi.fl.privacy import epsilon

        return epsilon(self.dp.noise_multiplier, rounds, self.dp.delta)

    def _record_down(self, round_index: int, region: str, t: torch.Tensor, receivers) -> None:
        nbytes = t.numel() * t.element_size()
        if self.world.is_federator:
            for _ in receivers:
                self.ledger.record(round_index, -1, region, "down", t.numel(), nbytes)
        else:
            self.ledger.record(round_index, self.world.client, region, "down", t.numel(), nbytes)
