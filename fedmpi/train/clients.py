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

`ClientStates` holds the personal regions of the rank's clients between rounds: one
immutable file per client and round in the run folder, an index of the current ones in
the rank's checkpoint file, and a bounded cache in memory (fed.client_state_mb).
"""

from __future__ import annotations

import re
import resource
from collections import OrderedDict

import numpy as np
import torch

from fedmpi.data import load_client_data, load_clients_data
from fedmpi.errors import CheckpointError, ConfigError, DataError, DiskError
from fedmpi.fl.methods import personal_regions
from fedmpi.fl.population import Population
from fedmpi.model.regions import all_finite, region_tensor
from fedmpi.store.atomic import sha256_file
from fedmpi.store.checkpoint import atomic_save, load_checkpoint
from fedmpi.train.trainer import schedule_for


def check_clients(cfg, K: int, personal: bool) -> None:
    """fed.clients (default K) against the ranks and the other settings."""
    N = cfg.fed.clients or K
    if cfg.split.num_clients is not None and cfg.split.num_clients != N:
        n = cfg.split.num_clients
        raise ConfigError(
            f"split.num_clients is {n} but the job has {N} clients (fed.clients, default: "
            f"one per client rank, {K} here); launch with mpirun -n {n + 1} (one client per "
            f"rank), set --fed.clients={n} ({n} clients on these {K} ranks) or "
            f"--split.num_clients={N}"
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


def sampling_key(cfg, world, population, run_dir, resumed: bool) -> tuple[int | None, str]:
    """(key, error) of the rounds' client samples: the run seed, or with privacy.dp the
    run folder's secret key (the amplification by sampling assumes nobody outside can
    tell who was sampled; a collective). A resumed run reads the key it started with."""
    if not (cfg.privacy.dp and not population.everyone):
        return cfg.run.seed, ""
    key, error = None, ""
    if world.is_federator:
        try:
            key = run_dir.sampling_key(create=not resumed)
        except DiskError as e:
            error = str(e)
    return world.bcast_obj((key, error))


class ClientStates:
    """Personal regions of a rank's clients between rounds (several clients per rank).

    Every state a client's training produces is written once, as an immutable file per
    (client, round): `state/rank_NNN/client_CCCCCC_rRRRRRR.pt` (atomically, its sha256
    noted). `index` maps each client to its committed version (round, sha256): a
    checkpoint stores only that index, so a round writes the states of the clients it
    trained and a checkpoint costs nothing per client held. A least-recently-used cache
    keeps up to `limit_bytes` of states in memory (fed.client_state_mb). A round's new
    states count from `commit` (after its exchange) and are dropped by `discard` (an
    abandoned round). `collect` deletes the files that neither the index nor any
    checkpoint still on disk refers to. A client that never trained has the initial
    model's personal regions."""

    PATTERN = re.compile(r"client_(\d+)_r(\d+)\.pt$")

    def __init__(self, regions, limit_bytes: float, folder):
        self.regions = tuple(regions)
        self.limit = float(limit_bytes)
        self.folder = folder
        self.index: dict[int, tuple[int, str]] = {}
        self.pending: dict[int, tuple[int, str]] = {}
        self.cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self.cache_bytes = 0
        self.initial: dict | None = None
        self.checkpoint_indexes: dict[str, dict] = {}  # checkpoint folder -> its index

    def set_initial(self, model) -> None:
        self.initial = self.copy_of(model)

    def copy_of(self, model) -> dict:
        """The model's personal regions, copied to host memory."""
        with torch.no_grad():
            return {r: region_tensor(model, r).detach().to("cpu", copy=True) for r in self.regions}

    def path(self, client: int, version: int):
        return self.folder / f"client_{client:06d}_r{version:06d}.pt"

    def get(self, client: int) -> dict:
        """The client's committed personal regions (-1, or a client that never trained:
        the initial ones)."""
        if client not in self.index:
            return self.initial
        version, sha = self.index[client]
        key = (client, version)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        path = self.path(client, version)
        if sha256_file_or_none(path) != sha:
            raise CheckpointError(
                f"{path} (client {client}'s personal regions after round {version}) is "
                f"missing or does not match its checksum: restore the run folder's state/ "
                f"files, or start a new run"
            )
        state = load_checkpoint(path, torch.device("cpu"))
        self._cache(key, state)
        return state

    def stage(self, client: int, round_index: int, model) -> None:
        """Write the client's personal regions after its training in `round_index`."""
        state = self.copy_of(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        sha = atomic_save(state, self.path(client, round_index))
        self.pending[client] = (round_index, sha)
        self._cache((client, round_index), state)

    def commit(self) -> None:
        self.index.update(self.pending)
        self.pending.clear()

    def discard(self) -> None:
        for client, (version, _) in self.pending.items():
            state = self.cache.pop((client, version), None)
            if state is not None:
                self.cache_bytes -= _nbytes(state)
        self.pending.clear()

    def _cache(self, key, state: dict) -> None:
        if key in self.cache:
            self.cache_bytes -= _nbytes(self.cache.pop(key))
        self.cache[key] = state
        self.cache_bytes += _nbytes(state)
        while self.cache and self.cache_bytes > self.limit:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= _nbytes(old)

    def load_into(self, client: int, model) -> None:
        with torch.no_grad():
            for r, t in self.get(client).items():
                region_tensor(model, r).copy_(t)

    def state_dict(self) -> dict:
        """The index (client -> [round, sha256]): a checkpoint's record of the states."""
        return {c: [v, sha] for c, (v, sha) in sorted(self.index.items())}

    def load_state_dict(self, index: dict) -> None:
        self.index = {int(c): (int(v), str(sha)) for c, (v, sha) in index.items()}
        self.pending.clear()
        self.cache.clear()
        self.cache_bytes = 0

    def collect(self, kept_indexes) -> int:
        """Delete the state files that neither this index, the pending round, nor any of
        `kept_indexes` (those of the checkpoints on disk) refers to; returns how many."""
        keep = {(c, v) for c, (v, _) in self.index.items()}
        keep.update((c, v) for c, (v, _) in self.pending.items())
        for index in kept_indexes:
            keep.update((int(c), int(v)) for c, (v, _) in index.items())
        removed = 0
        for path in self.folder.glob("client_*_r*.pt") if self.folder.is_dir() else ():
            m = self.PATTERN.search(path.name)
            if m and (int(m.group(1)), int(m.group(2))) not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def sha256_file_or_none(path) -> str | None:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


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

    def commit(self) -> None:
        """The round completed: its clients' new personal regions count from now on."""
        if self.states is not None:
            self.states.commit()

    def discard(self) -> None:
        """The round was abandoned: its clients keep the regions they started it with."""
        if self.states is not None:
            self.states.discard()

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
        model = self.job.model
        out = {"steps": 0, "trained": 0, "nonfinite": [], "per_client": [], "images": 0}
        weights: dict[str, float] = {}
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
            stats.update(client=c + 1, n=self.size(c))
            out["per_client"].append(stats)
            if not self.single:
                stats.update(self._prepare(plan, c))
                self._accumulate(c, plan.uploads[c], weights)
                if self.states is not None:
                    self.states.stage(c, r, model)
        if not self.single:
            self._finish_round(weights)
        out["max_rss_mb"] = max_rss_mb()
        for stats in out["per_client"]:
            stats["rank_max_rss_mb"] = out["max_rss_mb"]
        return out

    def _prepare(self, plan, c: int) -> dict:
        """The strategy's client step on c's trained model (DP: clip its update)."""
        agg = self.job.aggregator
        start = self.job.round_start.weights
        return agg.strategy.prepare_client(agg, sorted(plan.uploads[c]), start)

    def prepare_single(self, plan, stats: dict) -> None:
        """One client per rank: its client step, after the round's local scoring (which
        scores the model as trained), before the exchange."""
        if self.single and stats.get("per_client") and not stats.get("nonfinite"):
            stats["per_client"][0].update(self._prepare(plan, self.clients[0]))

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
        trainer.load_scaler_state(job.round_start.scaler_state)  # fp16: the round's scale
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
        data = load_clients_data(
            cfg, N, lambda sizes: Population.place(sizes, K).clients_of(world.client)
        )
        mine = sorted(data)
    empty = [c + 1 for c, images in data.items() if len(images) == 0]
    if empty:
        raise DataError(
            f"client(s) {', '.join(map(str, empty[:10]))} have no training images; raise "
            f"split.min_size or use fewer clients (fed.clients)"
        )
    personal = personal_regions(job.method)
    state_dir = job.run_dir.client_state_dir(world.rank)
    return ClientPool(job, mine, data, personal, state_dir, single=N == K)
