"""Aggregation's round driver: the initial broadcast and each round's per-region exchange.

This module owns `Aggregator` (subgroups, collectives, the finiteness check, the
ledger's rows of every transfer), the choice of strategy from the config
(`make_strategy`), the set-up check of secure plans and `NonFiniteAverage`.

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

What happens to an upload at the Reduce, and to the sum, is the strategy's
(`fedmpi.fl.strategy.AggregationStrategy`, chosen from the config by `make_strategy`);
the options change the upload, never the plan or the broadcast:

- none: `strategy.PlainFedAvg`, as above.
- `fed.secure`: `secure.SecureFedAvg`. The same [n_k * theta_k, n_k] is encoded in fixed
  point as uint64 and masked with the other reporters of this region in this round (all
  of a client's regions first, then one sleeping barrier); one integer SUM Reduce per
  region (`World.reduce_sum_u64`) over the same subgroup; the federator decodes only the
  sum, divides and broadcasts float32 as usual. The pair keys are agreed once, when the
  Aggregator is built (a collective on every rank). The work is on host memory: a GPU
  model pays one copy of each region each way.
- `privacy.dp`: `privacy.DifferentialPrivacy` around either. Before the uploads, each
  client replaces the regions it uploads by start + clip(theta - start) (+ its
  distributed noise share), with uniform weight 1; in central mode the federator adds
  the noise to its own zero contribution to the sum.
- `fed.compress`: `compress.CompressedFedAvg` instead of either: each client sends its
  update (weights minus the round's start, plus its error-feedback residual) in bf16 or
  top-k (a linear Gather, summed in float32 by the federator in rank order) or int8 (a
  MAX agreement of its scales (one per 1,024 values), then one uint8 SUM Reduce, with fed.secure's masks modulo
  2^8 when secure); the federator adds the decoded average update to the region's
  previous weights and broadcasts float32 as usual.
- `fed.prox_mu`, `fed.server_opt`: `strategy.FedProx`, `strategy.ServerOptimized` around
  the rest (the clients' objective; the federator's step on the average).
"""

from __future__ import annotations

import time

import torch

from fedmpi.fl.compress import CompressedFedAvg, scale_bytes
from fedmpi.fl.ledger import Ledger, UploadFormat
from fedmpi.fl.methods import make_plan, shared_regions
from fedmpi.fl.population import Population
from fedmpi.fl.strategy import (
    AggregationStrategy,
    FedProx,
    PlainFedAvg,
    RegionBuffers,
    RegionRound,
    ServerOptimized,
)
from fedmpi.model.regions import REGIONS, bind_flat, finite, region_send_buffer, region_tensor


class NonFiniteAverage(RuntimeError):
    """Finite uploads whose average is not finite (float32 overflow of the sum)."""


def check_secure_plans(cfg, population: Population) -> None:
    """At set-up (pure, identical on every rank): with every client in every round, every
    region of every round's plan must have enough reporting ranks (a rank is the trust
    domain of the clients it hosts) to hide a single upload; raises ConfigError naming
    the first region and round that does not, and the fix. With client sampling the
    rounds are drawn at run time: a region short of reporters in a round is withheld
    then (`Aggregator.reporting`) and the round line says so."""
    from fedmpi.config import ConfigError
    from fedmpi.fl.compress import INT8_MAX
    from fedmpi.fl.secure import SecureAggError, check_reporters

    if cfg.fed.compress == "int8" and population.slots > INT8_MAX:
        raise ConfigError(
            f"fed.compress=int8 sums one signed byte per value over the reporting ranks, "
            f"and {population.slots} client ranks could overflow it (at most {INT8_MAX}); "
            f"use fewer ranks with more clients each (fed.clients) or --fed.compress=bf16"
        )
    if not cfg.fed.secure:
        return
    n = population.num_clients
    if population.slots < cfg.fed.secure_min_reporters:
        raise ConfigError(
            f"secure aggregation masks between client ranks (each the trust domain of its "
            f"clients), and this job has {population.slots}: every region would have one "
            f"reporter and never be averaged; launch with at least "
            f"{cfg.fed.secure_min_reporters} client ranks (mpirun -n "
            f"{cfg.fed.secure_min_reporters + 1}) or set --fed.secure=false"
        )
    if not population.everyone:
        return
    for r in range(1, cfg.fed.rounds + 1):
        plan = make_plan(cfg.fed.method, r, n, cfg.run.seed)
        for region in REGIONS:
            slots = sorted({population.hosts[c] for c in plan.uploaders(region)})
            try:
                check_reporters(region, r, slots, cfg.fed.secure_min_reporters)
            except SecureAggError as e:
                raise ConfigError(
                    f"{e} (fed.method={cfg.fed.method}, {n} clients on {population.slots} ranks)"
                ) from None


def make_strategy(world, cfg=None, population: Population | None = None) -> AggregationStrategy:
    """The strategy that `cfg` (a Config, or None: plain) asks for: plain or secure
    FedAvg, wrapped in DP-FedAvg with privacy.dp (with the population's sample rate),
    FedProx with fed.prox_mu > 0 and a server optimizer with fed.server_opt, in that
    order (the server optimizer post-processes the DP average). fed.secure runs the key
    agreement, a collective on every rank."""
    strategy = PlainFedAvg()
    if cfg is None:
        return strategy
    if cfg.fed.secure:
        from fedmpi.fl.secure import SecureFedAvg

        strategy = SecureFedAvg.agree(world, cfg.fed)
    if cfg.fed.compress != "none":
        f = cfg.fed
        secure = strategy if f.secure else None
        strategy = CompressedFedAvg(
            f.compress, f.error_feedback, f.topk_fraction, cfg.run.seed, secure
        )
    if cfg.privacy.dp:
        from fedmpi.fl.privacy import DifferentialPrivacy

        strategy = DifferentialPrivacy.from_config(strategy, cfg.privacy, population)
    if cfg.fed.prox_mu > 0:
        strategy = FedProx(strategy, cfg.fed.prox_mu)
    if cfg.fed.server_opt != "none":
        from fedmpi.fl.server_opt import ServerOptimizer

        strategy = ServerOptimized(strategy, ServerOptimizer.from_config(cfg.fed))
    return strategy


def _nbytes(buf) -> int:
    """Bytes of a buffer handed to a collective (a torch tensor or a numpy array)."""
    return buf.numel() * buf.element_size() if isinstance(buf, torch.Tensor) else buf.nbytes


class Aggregator(RegionBuffers):
    """Runs a rank's side of the initial broadcast and of each round's exchange: the
    subgroups, the collectives through its strategy, the ledger. Owns the rank's region
    tensors (`flat`, `send`) and reusable buffers (`RegionBuffers`).

    `cfg` (optional): a Config whose fed.secure / privacy.dp choose the strategy
    (`make_strategy`); with fed.secure the constructor runs the key agreement, so every
    rank must build its Aggregator at the same point. `strategy`: the strategy itself
    (instead of cfg)."""

    def __init__(
        self,
        world,
        model: torch.nn.Module,
        ledger: Ledger,
        cfg=None,
        strategy: AggregationStrategy | None = None,
        population: Population | None = None,
    ):
        self.world, self.ledger = world, ledger
        # which rank hosts each client (default: client k on rank k + 1)
        self.population = population or Population.place([1] * world.num_clients, world.num_clients)
        if not all(region_tensor(model, r, required=False) is not None for r in REGIONS):
            bind_flat(model)
        super().__init__(
            {r: region_tensor(model, r) for r in REGIONS},
            {r: region_send_buffer(model, r) for r in REGIONS},  # flat + 1 spare value
            world.summand_device,
        )
        self.strategy = (
            strategy if strategy is not None else make_strategy(world, cfg, self.population)
        )
        # the regions the method shares (a round releases those its clients report)
        self.shared = shared_regions(cfg.fed.method) if cfg is not None else REGIONS
        compressed = self.strategy.find(CompressedFedAvg)
        self._format = UploadFormat(
            compressed.scheme if compressed is not None else "none",
            self.secure is not None,
            compressed.topk_fraction if compressed is not None else 0.01,
        )

    @property
    def secure(self):
        """The secure strategy in use (`secure.SecureFedAvg`: its keys and uint64 buffers),
        else None."""
        from fedmpi.fl.secure import SecureFedAvg

        return self.strategy.find(SecureFedAvg)

    @property
    def upload_format(self) -> UploadFormat:
        """How this job's uploads are encoded (`fedmpi.fl.ledger.UploadFormat`)."""
        return self._format

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

        `plan`: the round's plan over the population's N clients. `sizes`: every client's
        FedAvg size n_k (N values, client 0 first), the same on every rank; 0 leaves a
        client out of this round's averages. A rank uploads, per region, the n-weighted
        mean of its clients' models that report it (`fedmpi.train.clients` leaves it in
        the rank's weights) with their summed size, so the wire carries one buffer per
        rank and region whatever N is. `start`: with privacy.dp or fed.compress, this
        rank's weights at the start of the round, per region. Returns this rank's
        strategy statistics."""
        jobs = {
            region: RegionRound(region, round_index, slots, slot_sizes)
            for region, (slots, slot_sizes) in self.reporting(plan, sizes).items()
        }
        for region in self.strategy.released_every_round(self.shared):
            jobs.setdefault(region, RegionRound(region, round_index, [], []))
        slot = None if self.world.is_federator else self.world.client
        mine = [job for job in jobs.values() if slot in job.uploaders]
        stats = self.strategy.begin_round(self, round_index, slot, mine, start)
        averaged, sums = [], []  # regions the federator averaged in float; their sums
        for region in REGIONS:
            total = self._exchange_region(region, jobs.get(region), round_index, timings)
            if total is not None:
                averaged.append(region)
                sums.append(total)
        # Decided once, after the broadcasts (one host sync on a GPU): a non-finite average
        # stops the job (the federator raises; no checkpoint ever marks this round).
        if averaged and not finite(*[self.flat[r] for r in averaged], sums=sums):
            bad = [r for r in averaged if not finite(self.flat[r])]
            raise NonFiniteAverage(
                f"round {round_index}: the average of region(s) {', '.join(bad)} is not "
                f"finite although every upload was (float32 overflow)"
            )
        return stats

    def _exchange_region(self, region: str, job, round_index: int, timings):
        """One region: the Reduce of its uploads over the reporting ranks' subgroup
        (through the strategy), then the Bcast of the federator's weights to every client
        rank (each holds the global model for its clients' next rounds). Returns, on the
        federator when the strategy averaged in float, the sum of the average (taken
        while the clients pack the next region; the finiteness check), else None."""
        if job is None:  # no client reports it this round: the global region is unchanged
            return None
        world, theta = self.world, self.flat[region]
        ups, downs = job.uploaders, list(range(world.num_clients))
        up_group = world.group(ups) if ups else None  # none: the federator alone (DP noise)
        down_group = up_group if downs == ups else world.group(downs)
        t0 = time.perf_counter()
        float_average = False
        with torch.no_grad():
            if up_group is None:
                if world.is_federator:
                    float_average = self._release_unreported(job)
            elif up_group.is_member:
                float_average = self._reduce(up_group, job)
            if down_group.is_member:
                world.bcast(down_group, theta)
                self._record_down(round_index, region, theta, downs, ups)
            total = theta.sum(dtype=torch.float32) if float_average else None
        if timings is not None:
            timings[region] = timings.get(region, 0.0) + time.perf_counter() - t0
        for g in {id(g): g for g in (up_group, down_group) if g is not None}.values():
            world.release(g)
        return total

    def _reduce(self, group, job: RegionRound) -> bool:
        """A client's upload, or the federator's Reduce and `finish`; True on the federator
        when the strategy averaged into its weights in float (the overflow check)."""
        world, strategy, n = self.world, self.strategy, self.sizes[job.region]
        if not world.is_federator:
            buf = strategy.upload(self, job, world.client)
            sent = strategy.reduce(world, group, buf)
            nbytes = sent if sent is not None else _nbytes(buf)
            self.ledger.record(job.round_index, world.client, job.region, "up", n, nbytes)
            return False
        if strategy.needs_before:
            self.save_before(job.region)
        dst, own = strategy.receive(self, job)
        sent = strategy.reduce(world, group, dst, own)  # bytes per uploader, or None
        for _ in job.uploaders:
            nbytes = sent if sent is not None else _nbytes(dst)
            self.ledger.record(job.round_index, -1, job.region, "up", n, nbytes)
        return strategy.finish(self, job, dst)

    def _release_unreported(self, job: RegionRound) -> bool:
        """The federator, for a region released although nobody reported it this round
        (DP with sampling: every round's release carries the noise): the strategy's
        receive and finish with no Reduce."""
        if self.strategy.needs_before:
            self.save_before(job.region)
        dst, _ = self.strategy.receive(self, job)
        return self.strategy.finish(self, job, dst)

    def reporting(self, plan, sizes) -> dict[str, tuple[list[int], list[float]]]:
        """Per region reported this round: (the client ranks' slots that upload it, in
        order; each slot's FedAvg size, the sum over its clients that report the region).
        Pure: the same on every rank. `sizes`: every client's n_k, 0 for a client left out
        of the round (fed.on_nonfinite: skip). The strategy may change them first
        (privacy.dp: every size 1, 0 stays 0). A region left with fewer ranks of size > 0
        than the strategy's `min_reporters` (fed.secure: fed.secure_min_reporters; a rank
        is the trust domain of its clients) gets all sizes 0: its sum would show the
        rest's upload in the clear, so the federator keeps the region's previous average
        (`withheld`)."""
        pop = self.population
        if len(sizes) != pop.num_clients:
            raise ValueError(f"exchange needs {pop.num_clients} client sizes, got {len(sizes)}")
        sizes = self.strategy.fedavg_sizes([float(n) for n in sizes])
        out = {}
        for region in REGIONS:
            per_slot: dict[int, float] = {}
            for c in plan.uploaders(region):
                slot = pop.hosts[c]
                per_slot[slot] = per_slot.get(slot, 0.0) + sizes[c]
            if per_slot:
                slots = sorted(per_slot)
                mine = [per_slot[s] for s in slots]
                if 0 < sum(n > 0 for n in mine) < self.strategy.min_reporters:
                    mine = [0.0] * len(slots)
                out[region] = (slots, mine)
        return out

    def withheld(self, plan, sizes) -> list[str]:
        """The regions `reporting` leaves unaveraged because clients were left out."""
        return [
            r
            for r, (_, n) in self.reporting(plan, sizes).items()
            if not any(n) and any(sizes[c] > 0 for c in plan.uploaders(r))
        ]

    def epsilon(self, rounds: int) -> float | None:
        """The (epsilon, privacy.delta) guarantee after `rounds` rounds (None without DP)."""
        return self.strategy.epsilon(rounds)

    def _record_down(
        self, round_index: int, region: str, t: torch.Tensor, receivers, reporters=()
    ) -> None:
        """The broadcast's rows; a reporter's also counts what its upload received back
        (int8's agreed scales: `UploadFormat.down`)."""
        n = t.numel()
        extra = scale_bytes(self._format.compress, n)
        nbytes = n * t.element_size()
        if self.world.is_federator:
            for k in receivers:
                self.ledger.record(
                    round_index, -1, region, "down", n, nbytes + extra * (k in reporters)
                )
        else:
            k = self.world.client
            self.ledger.record(round_index, k, region, "down", n, nbytes + extra * (k in reporters))
