"""The clients a rank hosts: their data, their personal regions between rounds, their
training in a round.

A client rank hosts one or more of the federation's N clients (`fedmpi.fl.population`
places them). In a round it trains those of them that were sampled, one after another
on its one model and trainer:

    for each sampled client c of this rank:
        global weights of the round's start (+ c's personal regions, UDEC / ULATDEC)
        local training on c's data, seeded (run seed, round, c), a fresh Adam
        finite? else c is left out of the round (fed.on_nonfinite)
        the strategy's client step (privacy.dp: clip c's update)
        c's uploaded regions join the rank's n-weighted running mean
        c's personal regions back into the store
    the rank's weights := that mean (regions no local client uploads: the round's start)

so the rank uploads one buffer per region whatever N is, with the summed size of its
clients (`fl.aggregate.Aggregator.reporting`). With one client per rank (the cross-silo
layout, fed.clients at its default) the client trains in place and keeps its personal
regions (and Adam, with fed.reset_optimizer=false) in the model itself, as one process
per client always has: no copies, the same numbers as ever.

`ClientStates` holds the personal regions of the rank's clients between rounds: in
memory up to fed.client_state_mb, spilled to the run folder (one file per client) beyond
that, and all of them in the rank's checkpoint file. A client that never trained has the
initial model's personal regions.
"""

from __future__ import annotations

import resource
from collections import OrderedDict

import numpy as np
import torch

from fedmpi.data import client_sizes, load_client_data, load_clients_data
from fedmpi.errors import ConfigError
from fedmpi.fl.methods import personal_regions
from fedmpi.fl.population import Population
from fedmpi.model.regions import all_finite, region_tensor
from fedmpi.store.checkpoint import atomic_save, load_checkpoint
from fedmpi.train.trainer import schedule_for


def check_clients(cfg, K: int, personal: bool) -> int:
    """fed.clients (default K) against the ranks and the other settings; returns N."""
    N = cfg.fed.clients or K
    if cfg.split.num_clients is not None and cfg.split.num_clients != N:
        raise ConfigError(
            f"split.num_clients is {cfg.split.num_clients} but the job has {N} clients "
            f"(fed.clients, default: one per client rank, {K} here); set "
            f"--fed.clients={cfg.split.num_clients} or --split.num_clients={N}"
        )
    if N < K:
        raise ConfigError(
            f"fed.clients is {N} but the job has {K} client ranks: every rank must host "
            f"at least one client; launch with mpirun -n {N + 1} or set --fed.clients={K}"
        )
    if N > K and personal and cfg.train.ema_decay > 0:
        raise ConfigError(
            f"train.ema_decay with {cfg.fed.method} and {N} clients on {K} ranks: the "
            f"personal models' EMA is kept for one client per rank only; set "
            f"--train.ema_decay=0 or launch one rank per client"
        )
    if N > K and personal and cfg.eval.personal == "local":
        raise ConfigError(
            f"eval.personal=local scores one client's model per rank before the "
            f"aggregation; with {N} clients on {K} ranks use --eval.personal=aggregated"
        )
    return N


def sampling_key(cfg, world, population, run_dir) -> int:
    """The key of the rounds' client samples: the run seed, or with privacy.dp the run
    folder's secret key (the amplification by sampling assumes nobody outside can tell
    who was sampled; a collective)."""
    if not (cfg.privacy.dp and not population.everyone):
        return cfg.run.seed
    return world.bcast_obj(run_dir.sampling_key() if world.is_federator else None)


class ClientStates:
    """Personal regions of a rank's clients, least recently used spilled to `spill_dir`
    beyond `limit_bytes`."""

    def __init__(self, regions, limit_bytes: float, spill_dir):
        self.regions = tuple(regions)
        self.limit = float(limit_bytes)
        self.spill_dir = spill_dir
        self.memory: OrderedDict[int, dict] = OrderedDict()
        self.spilled: set[int] = set()
        self.initial: dict | None = None

    def set_initial(self, model) -> None:
        self.initial = {r: region_tensor(model, r).detach().cpu().clone() for r in self.regions}

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.memory.values() for t in s.values())

    def _path(self, client: int):
        return self.spill_dir / f"client_{client:06d}.pt"

    def get(self, client: int) -> dict:
        """The client's personal regions (the initial ones if it never trained; -1: the
        initial ones)."""
        if client in self.memory:
            self.memory.move_to_end(client)
            return self.memory[client]
        if client in self.spilled:
            return load_checkpoint(self._path(client), torch.device("cpu"))
        return self.initial

    def copy_of(self, model) -> dict:
        """The model's personal regions, copied to host memory."""
        with torch.no_grad():
            return {r: region_tensor(model, r).detach().to("cpu", copy=True) for r in self.regions}

    def put(self, client: int, state: dict) -> None:
        self.memory[client] = state
        self.memory.move_to_end(client)
        self.spilled.discard(client)
        while self.memory and self.memory_bytes > self.limit:
            old, state = self.memory.popitem(last=False)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(state, self._path(old))
            self.spilled.add(old)

    def load_into(self, client: int, model) -> None:
        with torch.no_grad():
            for r, t in self.get(client).items():
                region_tensor(model, r).copy_(t)

    def state_dict(self) -> dict:
        """Every client that trained: its personal regions (the checkpoint's content)."""
        return {c: self.get(c) for c in sorted(set(self.memory) | self.spilled)}

    def load_state_dict(self, states: dict) -> None:
        self.memory.clear()
        self.spilled.clear()
        for c, state in states.items():
            self.memory[int(c)] = {r: t.cpu() for r, t in state.items()}
        while self.memory and self.memory_bytes > self.limit:
            old, state = self.memory.popitem(last=False)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(state, self._path(old))
            self.spilled.add(old)


class ClientPool:
    """This rank's clients (`clients`: ids; `data[c]`: uint8 images) and their round."""

    def __init__(self, job, clients: list[int], data: dict, personal, state_dir, single: bool):
        """`single`: every rank of the job hosts one client (fed.clients = client ranks),
        which then trains in place (decided for the whole job, so that where a client
        lives never changes how it trains)."""
        self.job = job
        self.clients = list(clients)
        self.data = data
        self.single = single
        limit = job.cfg.fed.client_state_mb * 2**20
        self.states = (
            None if self.single or not personal else ClientStates(personal, limit, state_dir)
        )
        self.mean: dict[str, torch.Tensor] = {}
        # personal regions trained this round: kept once the round completes (`commit`),
        # dropped when it is abandoned (`discard`)
        self.pending: dict[int, dict] = {}

    def commit(self) -> None:
        for c, state in self.pending.items():
            self.states.put(c, state)
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()

    def size(self, client: int) -> int:
        return len(self.data[client])

    def sizes(self) -> dict[int, int]:
        return {c: len(d) for c, d in self.data.items()}

    def train_round(self, r: int, plan, sampled: list[int], train_one) -> dict:
        """Train this rank's sampled clients of round `r`. `train_one(c, steps)`: one
        client's local training (the round loop's, with progress); returns its stats.
        Returns the rank's stats: summed steps, trained clients, non-finite clients,
        per-client statistics."""
        mine = [c for c in sampled if c in self.data]
        job, model = self.job, self.job.model
        out = {"steps": 0, "trained": 0, "nonfinite": [], "per_client": [], "images": 0}
        weights: dict[str, float] = {}
        start = job.round_start.weights
        for c in mine:
            if not self.single:
                self._begin_client(c)
            stats = train_one(c)
            if not stats:  # a stop request cut the round short
                return {}
            out["steps"] += stats.get("steps", 0)
            out["images"] += stats.get("images", 0)
            out["trained"] += 1
            if not all_finite(model):
                out["nonfinite"].append(c)
                stats["client"] = c + 1
                out["per_client"].append(stats)
                continue
            extra = job.aggregator.strategy.prepare_client(
                job.aggregator, sorted(plan.uploads[c]), start
            )
            stats.update(extra, client=c + 1, n=self.size(c))
            out["per_client"].append(stats)
            if not self.single:
                self._accumulate(c, plan.uploads[c], weights)
                if self.states is not None:
                    self.pending[c] = self.states.copy_of(model)
        if not self.single:
            self._finish_round(weights)
        out["max_rss_mb"] = max_rss_mb()
        for stats in out["per_client"]:
            stats["rank_max_rss_mb"] = out["max_rss_mb"]
        return out

    def _begin_client(self, c: int) -> None:
        """The round's global weights, c's personal regions, c's data, a fresh Adam."""
        job = self.job
        with torch.no_grad():
            for region, t in job.round_start.weights.items():
                region_tensor(job.model, region).copy_(t)
        if self.states is not None:
            self.states.load_into(c, job.model)
        trainer = job.trainer
        trainer.use_images(self.data[c])
        if trainer.schedule is not None or job.cfg.train.lr_schedule != "constant":
            steps = trainer.steps_for(job.cfg.fed.local_epochs, job.cfg.fed.local_steps)
            trainer.schedule = schedule_for(job.cfg.train, job.schedule.rounds * steps)
        trainer.reset_optimizer()

    def _accumulate(self, c: int, regions, weights: dict) -> None:
        """c's uploaded regions into the rank's running mean, weighted by its FedAvg size."""
        n = self.job.aggregator.strategy.fedavg_sizes([float(self.size(c))])[0]
        with torch.no_grad():
            for region in regions:
                theta = region_tensor(self.job.model, region)
                total = weights.get(region, 0.0) + n
                if region not in weights:
                    if region not in self.mean:
                        self.mean[region] = torch.empty_like(theta)
                    self.mean[region].copy_(theta)
                elif n > 0:
                    self.mean[region].add_(theta - self.mean[region], alpha=n / total)
                weights[region] = total

    def _finish_round(self, weights: dict) -> None:
        """The rank's weights: its clients' mean of each region they upload, else the
        round's start (what the broadcast overwrites, or keeps when nobody reports)."""
        job = self.job
        with torch.no_grad():
            for region, t in job.round_start.weights.items():
                src = self.mean[region] if region in weights else t
                region_tensor(job.model, region).copy_(src)

    def personal_models(self, clients: list[int]):
        """(client, apply) for these of the rank's clients: apply() loads the client's
        personal regions into the model (for scoring)."""
        mine = [c for c in clients if c in self.data]
        if self.single or self.states is None:
            return [(c, lambda: None) for c in mine]
        return [(c, lambda c=c: self.states.load_into(c, self.job.model)) for c in mine]


def max_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eval_clients(num_clients: int, count: int | None, seed: int) -> list[int]:
    """The clients whose personal models are scored (eval.clients of them, a fixed
    sample drawn once from the run seed; None: all)."""
    if count is None or count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([int(seed), 0xE7A1])
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def make_pool(job, K: int) -> ClientPool:
    """This rank's clients (placed by the sizes the split declares) with their data."""
    cfg, world = job.cfg, job.world
    N = cfg.fed.clients or K
    if N == K:
        mine = [world.client]
        data = {world.client: load_client_data(cfg, world.client, K)[0]}
    else:  # placed by the sizes the split declares (the same on every rank)
        mine = Population.place(client_sizes(cfg, N), K).clients_of(world.client)
        data = load_clients_data(cfg, mine, N)
    personal = personal_regions(job.method)
    state_dir = job.run_dir.client_state_dir(world.rank)
    return ClientPool(job, mine, data, personal, state_dir, single=N == K)
