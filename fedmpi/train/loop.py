"""The one round loop: a federated job (rank 0 the federator, ranks 1..K the clients) and
the centralized baseline (K = 1 in one process, `SoloWorld`) run through `Job.run`.

Every rank walks through the same sequence of collectives:

    set-up (all ranks report errors together) -> initial broadcast of the full model
    for each round r = 1..R:
        plan = make_plan(method, r, K, seed)          # pure, identical on every rank
        trainers: local training (E epochs or N steps) through `LocalTrainer`
        flag collective (one allgather): stop request, finite model, steps and n_k of
                     every rank; abandon the round consistently if signalled
        aggregation: per region, Reduce (n_k / sum n) * theta_k to the federator over
                     the subgroup of its reporters, Bcast the average to its receivers
        evaluation / checkpoint / one metrics row per round on the federator

Personal regions (UDEC: encoder + bottleneck, ULATDEC: encoder) never leave their
client: the client keeps its model object across rounds and only overwrites the
regions it receives. The baseline (the reference's "K = 1, E = 1 per round") trains one
epoch of the whole training set per round, has nothing to average, and names its rounds
epochs in its logs, metrics and checkpoints (`Schedule`).

At a little over 400 lines this module is the loop and nothing else: set-up, one round,
and the three ways a round ends early (a stop request, a non-finite model, a non-finite
average) read best side by side; what a round records, saves and shows lives in
records.py, checkpointing.py, state.py and progress.py.
"""

from __future__ import annotations

import time

import torch

from fedmpi.config import Config
from fedmpi.data import client_sizes, load_arrays, load_client_data, load_clients_data
from fedmpi.dist.relay import ProgressRelay
from fedmpi.dist.solo import SoloWorld
from fedmpi.errors import CheckpointError, ConfigError
from fedmpi.fl.aggregate import Aggregator, NonFiniteAverage, check_secure_plans
from fedmpi.fl.ledger import Ledger
from fedmpi.fl.methods import make_plan, personal_regions
from fedmpi.fl.population import Population
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.regions import (
    REGIONS,
    all_finite,
    bind_flat,
    region_tensor,
    set_trainable,
)
from fedmpi.model.summary import model_shape
from fedmpi.model.unet import build_unet
from fedmpi.runtime import derive_seed, pick_device, share_cpu_threads
from fedmpi.store.checkpoint import BackgroundWriter
from fedmpi.store.runfolder import RunFolder
from fedmpi.train import checkpointing, progress, records, state
from fedmpi.train.clients import ClientPool, eval_clients
from fedmpi.train.progress import LocalProgress
from fedmpi.train.schedule import Schedule
from fedmpi.train.state import RoundStart
from fedmpi.train.stop import (
    NonFiniteError,
    Preempted,
    PreemptFlag,
    SetupError,
    StopTraining,
)
from fedmpi.train.trainer import EMA, LocalTrainer, ema_applied, schedule_for


def run_job(
    cfg: Config, world, run_dir, resume: bool = False, log=print, evaluator_factory=None
) -> dict:
    """Run (or resume) a job on `world` (None: the centralized baseline in this process);
    returns the federator's summary (other ranks: {})."""
    job = Job(cfg, world or SoloWorld(), RunFolder(run_dir), log)
    return job.run(resume, evaluator_factory)


class Job:
    """One rank's part of a job: its model, trainer, aggregator and run folder."""

    def __init__(self, cfg: Config, world, run: RunFolder, log):
        self.cfg, self.world, self.run_dir, self.log = cfg, world, run, log
        self.solo = world.size == 1
        self.method = "full" if self.solo else cfg.fed.method
        self.personal = bool(personal_regions(self.method))
        self.preempt = PreemptFlag(run.stop_file, announce=world.is_federator)
        world.timeout = cfg.fed.round_timeout
        self.device = pick_device(cfg.run.device, world.local_rank)
        if self.device.type == "cpu":
            # the federator mostly waits: give the cores to the clients on this node
            share_cpu_threads(max(1, world.local_clients))

    # -- set-up -------------------------------------------------------------------------
    def run(self, resume: bool, evaluator_factory) -> dict:
        cfg, world = self.cfg, self.world
        try:
            done = self._setup(resume)
            world.start_backend(self.device)
            self.relay = (
                LocalProgress(self.log, self.schedule.rounds, cfg.train.batch_size)
                if self.solo
                else ProgressRelay(world, cfg.run.progress_every)
            )
            self.ledger = Ledger(world.rank)
            # fed.secure: key agreement here
            self.aggregator = None
            if not self.solo:
                self.aggregator = Aggregator(
                    world, self.model, self.ledger, cfg, population=self.population
                )
                if self.trainer is not None:  # fed.prox_mu: the FedProx strategy's term
                    self.trainer.prox_mu = self.aggregator.strategy.prox_mu
                self.sampling_key = self._sampling_key()
            self.round_start = self._round_start()
            self.metrics = self.run_dir.metrics_writer() if world.is_federator else None
            self.evaluator = None
            if evaluator_factory:
                eval_world = None if self.solo else world
                self.evaluator = evaluator_factory(cfg, eval_world, self.run_dir.path, self.device)
            # The federator's checkpoint files are written by a thread (checkpoint.background);
            # leaving this block, however, waits for it: no write is ever left in flight.
            with BackgroundWriter(cfg.checkpoint.background) as self.writer:
                start = self._start(done, resume)
                for r in range(start, self.schedule.rounds + 1):
                    self._round(r)
                return records.finish(self)
        finally:
            self.preempt.restore()

    def _setup(self, resume: bool) -> int | None:
        """Build this rank's state and find the resume point; every rank reports its
        errors together, before any work (no rank is left waiting on a failed one)."""
        world = self.world
        done, error = None, None
        if resume and world.is_federator:
            done, error = state.resume_decision(self.cfg, world, self.run_dir, self.log)
        done, error = world.bcast_obj((done, error))
        if error:
            self._report_errors(error if world.is_federator else None)
        error = None
        try:
            self._build()
            if done is not None:
                state.restore(world, self.run_dir, done, self.model, self.trainer, self.device,
                              self.ema)  # fmt: skip
        except Exception as e:  # reported together below so no rank waits on a dead one
            known = (ConfigError, ValueError, CheckpointError)
            error = f"{e}" if isinstance(e, known) else f"{type(e).__name__}: {e}"
        self._report_errors(error)
        if not self.solo:  # every client's size, from the rank that loaded it
            held: dict = {}
            for part in world.allgather(self.pool.sizes() if self.pool else {}):
                held.update(part)
            f = self.cfg.fed
            self.population = Population.place(
                [held[c] for c in range(len(held))], world.num_clients, f.participation, f.sampling
            )
        return done

    def _build(self) -> None:
        """Model, EMA, data and trainer of this rank; raises user errors with the fix."""
        cfg, world = self.cfg, self.world
        K = world.num_clients
        self.pool = None
        if not self.solo:
            N = self._check_clients(K)
            if N == K:  # with sampling or N > K the rounds' reporters are checked as they come
                check_secure_plans(cfg, Population.place([1] * N, K))
        channels, size = model_shape(cfg)
        torch.manual_seed(derive_seed(cfg.run.seed, 0xC0FFEE))
        self.model = build_unet(cfg.model, channels, size).to(self.device)
        bind_flat(self.model)  # each region one contiguous buffer: collectives work in place
        self.model.channels_last = cfg.train.channels_last  # the federator samples in it too
        # train.ema_decay: the EMA of the model this rank evaluates. Global models (FULL,
        # USPLIT): every rank holds the global model after each aggregation and folds it
        # into an identical average (no bytes moved); a trainer of its own model (UDEC,
        # ULATDEC clients, the baseline) averages its own training, step by step.
        own_ema = self.personal or self.solo
        self.ema = None
        if cfg.train.ema_decay > 0 and not (own_ema and not world.trains):
            self.ema = EMA(self.model, cfg.train.ema_decay)
        self.trainer, self.n_k = None, 0.0
        if world.trains:
            if self.solo:
                images, _ = load_arrays(cfg.data, "train")
            else:
                images = self._load_clients(K)
            self.trainer = LocalTrainer(
                self.model,
                Diffusion.from_config(cfg.diffusion),
                images,
                cfg.train.batch_size,
                cfg.train.lr,
                self.device,
                ema=self.ema if own_ema else None,
                grad_clip=cfg.train.grad_clip,
                prox_mu=cfg.fed.prox_mu,
            )
            self.trainer.speed_from(cfg.train)
            self.trainer.new_optimizer()  # first Adam imports torch._dynamo: not in round 1
            self.n_k = float(len(images))
        self.schedule = Schedule.of(cfg, world, self.trainer)
        if self.trainer is not None:
            self.trainer.schedule = schedule_for(cfg.train, self.schedule.total_steps())

    def _check_clients(self, K: int) -> int:
        """fed.clients (default K) against the ranks and the other settings; returns N."""
        cfg = self.cfg
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
        if N > K and self.personal and cfg.train.ema_decay > 0:
            raise ConfigError(
                f"train.ema_decay with {cfg.fed.method} and {N} clients on {K} ranks: the "
                f"personal models' EMA is kept for one client per rank only; set "
                f"--train.ema_decay=0 or launch one rank per client"
            )
        if N > K and self.personal and cfg.eval.personal == "local":
            raise ConfigError(
                f"eval.personal=local scores one client's model per rank before the "
                f"aggregation; with {N} clients on {K} ranks use --eval.personal=aggregated"
            )
        return N

    def _load_clients(self, K: int):
        """This rank's clients' data (placed by size), its ClientPool; the first client's
        images (the trainer's to start with)."""
        cfg, world = self.cfg, self.world
        N = cfg.fed.clients or K
        if N == K:
            mine = [world.client]
            data = {world.client: load_client_data(cfg, world.client, K)[0]}
        else:  # placed by the sizes the split declares (the same on every rank)
            mine = Population.place(client_sizes(cfg, N), K).clients_of(world.client)
            data = load_clients_data(cfg, mine, N)
        personal = personal_regions(self.method)
        state_dir = self.run_dir.client_state_dir(world.rank)
        self.pool = ClientPool(self, mine, data, personal, state_dir, single=N == K)
        return data[mine[0]]

    def _sampling_key(self) -> int:
        """The key of the rounds' client samples: the run seed, or with privacy.dp the run
        folder's secret key (the amplification by sampling assumes nobody outside can tell
        who was sampled; a collective)."""
        cfg, world = self.cfg, self.world
        if not (cfg.privacy.dp and not self.population.everyone):
            return cfg.run.seed
        return world.bcast_obj(self.run_dir.sampling_key() if world.is_federator else None)

    def _round_start(self) -> RoundStart | None:
        """A trainer's weights at the round's start: the regions it never gets back from
        the federator (its personal ones; the baseline all of them); all of them with DP
        (the update is clipped against them), secure aggregation (a left-out client's
        upload is encoded from them) or fed.on_nonfinite=skip (a left-out client is
        evaluated and trains on from them)."""
        if self.trainer is None:
            return None
        cfg = self.cfg
        multi = self.pool is not None and not self.pool.single  # each client from the start
        every = self.solo or multi or cfg.privacy.dp or cfg.fed.secure
        every = every or cfg.fed.on_nonfinite == "skip"
        kept = REGIONS if every else personal_regions(self.method)
        frozen = cfg.fed.freeze_unshared and not self.solo  # a new Adam every round then
        keep_optimizer = not (self.schedule.reset_optimizer(cfg) or frozen or multi)
        return RoundStart({r: region_tensor(self.model, r) for r in kept}, keep_optimizer)

    def _report_errors(self, error: str | None) -> None:
        """Allgather one optional error per rank; if any, the federator shows them (grouped
        by message) and every rank raises SetupError together."""
        errors = self.world.allgather(error)
        if not any(errors):
            return
        if self.world.is_federator:
            by_message: dict = {}
            for rank, msg in enumerate(errors):
                if msg:
                    by_message.setdefault(msg, []).append(str(rank))
            for msg, ranks in by_message.items():
                who = (
                    ""
                    if self.solo
                    else f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)})"
                )
                self.log(f"error{who}: {msg}")
        raise SetupError("set-up failed")

    def _start(self, done: int | None, resume: bool) -> int:
        """The first round to run: after the resume point, or 1 after the initial broadcast."""
        world, run, unit = self.world, self.run_dir, self.schedule.unit
        if world.is_federator and not self.solo:
            run.write_placement(self.population.rows())
        if resume and done is None and world.is_federator:
            self.log(f"resume: no usable checkpoint in {run}; starting from {unit} 1")
        if self.pool is not None and self.pool.states is not None:
            # a never-trained client's personal regions: the initial model's (what the
            # client model holds after the set-up's restore, or after the broadcast below)
            self.pool.states.set_initial(self.model)
        if done is not None:
            state.restore_job_state(self, done)
            self.preempt.note = (
                f"the last complete checkpoint is {unit} {done}; resume with --resume {run}"
            )
            if world.is_federator:
                run.truncate(done, unit)
                self.log(
                    f"resume: continuing after {unit} {done} (checkpoint {run.checkpoint_dir(done)})"
                )
            return done + 1
        if world.is_federator:
            run.truncate(0, unit)
        if self.aggregator is not None:
            self.aggregator.initial_broadcast()
            records.gather(self, 0)
            if self.pool is not None and self.pool.states is not None:
                self.pool.states.set_initial(self.model)
        if world.is_federator:
            self.log(self._headline())
        return 1

    def _headline(self) -> str:
        cfg, s = self.cfg, self.schedule
        if self.solo:
            return (
                f"fedmpi centralized: {int(self.n_k)} images | {s.rounds} epochs x {s.per_round} "
                f"steps | device {self.device} | run {self.run_dir}"
            )
        pop = self.population
        if pop.one_per_slot and pop.everyone:
            who = f"K={pop.num_clients} clients"
        else:
            each = (
                f"{pop.fixed_count()} per round"
                if pop.sampling == "fixed" or pop.everyone
                else f"Poisson q={pop.participation:g}"
            )
            adam = "" if cfg.fed.reset_optimizer or pop.one_per_slot else ", a fresh Adam each"
            who = f"N={pop.num_clients} clients on {pop.slots} ranks ({each}{adam})"
        return (
            f"fedmpi: {self.method.upper()} | {who} | R={s.rounds} rounds | "
            f"{self.world.describe()} | device {self.device} | run {self.run_dir}"
            + records.privacy_text(cfg)
        )

    # -- one round ----------------------------------------------------------------------
    def _round(self, r: int) -> None:
        cfg, world = self.cfg, self.world
        t_round = time.perf_counter()
        self.writer.join()  # federator: the last checkpoint's file is written
        sampled = [0] if self.solo else self.population.sample(r, self.sampling_key)
        n_all = 1 if self.solo else self.population.num_clients
        plan = make_plan(self.method, r, n_all, cfg.run.seed, sampled)
        stats = self._train(r, plan, sampled)
        # One small collective per round carries the stop request, how many of each rank's
        # clients are not finite, their steps and how many trained, before anything is
        # reduced (every client's FedAvg size n_k is known everywhere from the set-up).
        display = progress.watch_round(self, r)  # federator: live progress while waiting
        flags = world.flags(
            [
                int(self.preempt.requested),
                len(stats.get("nonfinite", ())),
                stats.get("steps", 0),
                stats.get("trained", 0),
            ],
            phase=f"round {r}: local training",
        )
        progress.end_watch(self, display)  # every progress message of the round delivered
        t_wait = time.perf_counter() - t_round  # local training incl. waiting for the slowest
        if flags[:, 0].any():
            self._abandon(r)
        nonfinite = self._nonfinite(r, plan, flags, stats)
        sizes = self._sizes(sampled, nonfinite)

        evaluate = self.evaluator is not None and (
            (cfg.eval.every and r % cfg.eval.every == 0) or r == self.schedule.rounds
        )
        local_scoring = evaluate and self.personal and cfg.eval.personal == "local"
        scores, t_eval = None, 0.0
        if local_scoring:  # each client's own model, before the aggregation
            scores, t_eval = self._evaluate(r)
        t0 = time.perf_counter()
        exchanged = self._exchange(r, plan, sizes)
        stats.update(exchanged)
        if self.pool is not None and self.pool.single and stats.get("per_client"):
            stats["per_client"][0].update(exchanged)  # the one client's row shows them
        t_agg = time.perf_counter() - t0
        if self.pool is not None and self.pool.states is not None:
            self.pool.commit()  # the round's personal regions, now that it completed
        trained = int(flags[:, 3].sum())
        if self.ema is not None and not (self.personal or self.solo) and trained:
            # the global model's EMA, identical on every rank
            self.ema.update(self.model, steps=max(1, round(float(flags[:, 2].sum()) / trained)))
        if evaluate and not local_scoring:
            scores, t_eval = self._evaluate(r)

        t0 = time.perf_counter()
        if (cfg.checkpoint.every and r % cfg.checkpoint.every == 0) or r == self.schedule.rounds:
            self._checkpoint(r, final=r == self.schedule.rounds)
        t_ckpt = time.perf_counter() - t0
        times = dict(wait_s=t_wait, agg_s=t_agg, eval_s=t_eval, ckpt_s=t_ckpt, t_round=t_round)
        records.record(self, r, stats, scores, nonfinite, times, plan)
        self.writer.start()  # the federator's checkpoint file, while the next round trains

    def _sizes(self, sampled: list[int], nonfinite: list[int]) -> list[int]:
        """Every client's FedAvg size this round: its images if it trained and stayed
        finite, else 0 (numbered 1..N in `nonfinite`)."""
        if self.solo:
            return [int(self.n_k)]
        sizes = [0] * self.population.num_clients
        for c in sampled:
            if c + 1 not in nonfinite:
                sizes[c] = self.population.sizes[c]
        return sizes

    def _train(self, r: int, plan, sampled: list[int]) -> dict:
        """This rank's local training of round `r`: the rank's statistics ({} on the
        federator, or when a stop request cut it short)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        self.round_start.save(trainer)
        mine = [0] if self.solo else [c for c in sampled if c in self.pool.data]
        steps = {c: self._steps(r, c) for c in mine}
        self.progress = [0, sum(steps.values()), 0]  # steps and images done, steps due
        if self.solo:
            stats = self._train_one(r, 0, plan, steps[0])
            if stats and not all_finite(self.model):
                stats = dict(stats, nonfinite=[0], trained=1)
            elif stats:
                stats = dict(stats, trained=1, per_client=[stats])
        else:
            stats = self.pool.train_round(
                r, plan, mine, lambda c: self._train_one(r, c, plan, steps[c])
            )
        done, total, images = self.progress
        self.relay.finish(r, done, total, images)
        return stats

    def _steps(self, r: int, client: int) -> int:
        """Optimizer steps of `client` in round `r` (its data decides with local epochs)."""
        if self.solo:
            return self.schedule.steps(r)
        n = self.pool.size(client)
        f = self.cfg.fed
        return (
            f.local_steps
            if f.local_steps is not None
            else f.local_epochs * -(-n // self.cfg.train.batch_size)
        )

    def _train_one(self, r: int, client: int, plan, steps: int) -> dict:
        """One client's local training in round `r` (stats; {} when a stop request cut it)."""
        cfg, trainer = self.cfg, self.trainer
        if cfg.fed.freeze_unshared and not self.solo:
            set_trainable(self.model, plan.uploads[client])
            trainer.new_optimizer()
        elif self.schedule.reset_optimizer(cfg) or trainer.optimizer is None:
            trainer.reset_optimizer()
        base, total, images = self.progress

        def on_step(step, loss):
            done = step + 1
            self.relay.report(r, base + done, total, images + done * cfg.train.batch_size)
            if self.preempt.requested:
                raise StopTraining

        per_round = self.schedule.per_round if self.solo else steps
        try:
            stats = trainer.run(
                seed=self.schedule.seed(cfg, r, client),
                steps=steps,
                on_step=on_step,
                start_step=(r - 1) * per_round,
                log_every=cfg.train.log_every,
            )
        except StopTraining:
            stats = {}
        self.progress = [base + stats.get("steps", 0), total, images + stats.get("images", 0)]
        return stats

    def _abandon(self, r: int) -> None:
        """A stop was requested: abandon round `r` on every rank, roll back to the state
        after round r - 1, make sure that state is checkpointed, and stop (exit 75)."""
        unit, run = self.schedule.unit, self.run_dir
        if self.trainer is not None:
            self.round_start.restore(self.trainer)
        if self.pool is not None:
            self.pool.discard()  # the personal regions the round trained
        if r - 1 >= 1 and checkpointing.latest_complete_bcast(self) != r - 1:
            self._checkpoint(r - 1, final=True)
        if self.world.is_federator:
            why = f" ({self.preempt.signal_name})" if self.preempt.signal_name else ""
            where = (
                f"checkpoint of {unit} {r - 1} kept; resume with --resume {run} "
                f"(continues after {unit} {r - 1})"
                if r > 1
                else f"no {unit} was complete: --resume {run} starts from the beginning"
            )
            self.log(f"preempted{why}: {unit} {r} abandoned; {where}")
        raise Preempted(r - 1)

    def _nonfinite(self, r: int, plan, flags, stats: dict) -> list[int]:
        """The clients (numbered 1..N) whose model is not finite: stop the job
        (fed.on_nonfinite=abort, always for the baseline) or leave them out of this round
        (skip)."""
        world, cfg, unit = self.world, self.cfg, self.schedule.unit
        if not flags[:, 1].any():
            return []
        mine = [c + 1 for c in stats.get("nonfinite", ())]
        nonfinite = sorted(c for part in world.allgather(mine) for c in part)
        who = ", ".join(f"client {k}" for k in nonfinite)
        everyone = len(nonfinite) == int(flags[:, 3].sum())  # skipping leaves nothing to train
        if cfg.fed.on_nonfinite == "abort" or everyone:
            if world.is_federator:
                kept = checkpointing.settled_latest(self)
                whose = "the model" if self.solo else f"the model of {who}"
                if self.solo:
                    skip = ""
                elif everyone and cfg.fed.on_nonfinite == "skip":
                    skip = (
                        " Every client diverged, so fed.on_nonfinite=skip has none left to average."
                    )
                else:
                    skip = " fed.on_nonfinite=skip leaves such clients out of a round instead."
                self.log(
                    f"error: {unit} {r}: {whose} is not finite (NaN / inf: diverged? lower "
                    f"train.lr). Stopped before aggregation; "
                    + (
                        f"the last good checkpoint is {unit} {kept} (--resume {self.run_dir})"
                        if kept
                        else "no checkpoint was written yet"
                    )
                    + "."
                    + skip
                )
            raise NonFiniteError(f"{unit} {r}: non-finite model ({who})")
        if world.is_federator:
            self.log(
                f"warning: round {r}: {who} not finite: left out of this round's averages "
                f"(fed.on_nonfinite=skip); their models restart from the round's start"
            )
            sampled = [c for c in range(len(plan.uploads)) if plan.uploads[c]]
            withheld = self.aggregator.withheld(plan, self._sizes(sampled, nonfinite))
            if withheld:
                self.log(
                    f"warning: round {r}: region(s) {', '.join(withheld)} not averaged "
                    f"this round: without {who}, fewer than fed.secure_min_reporters="
                    f"{cfg.fed.secure_min_reporters} clients report them, and their "
                    f"secure sum would show the federator an upload in the clear"
                )
        single = self.pool is not None and self.pool.single
        if single and world.client + 1 in nonfinite:  # uploads with weight 0, restarts from
            self.round_start.restore(self.trainer)  # the round's start
        return nonfinite

    def _exchange(self, r: int, plan, sizes: list[int]) -> dict:
        if self.aggregator is None:  # a federation of one: nothing to average
            return {}
        start = self.round_start.weights if self.round_start else None
        try:
            return self.aggregator.exchange(plan, sizes, r, start=start)
        except NonFiniteAverage as e:  # the federator alone: it must take the job down
            raise NonFiniteError(
                f"{e}; no checkpoint written for this round", collective=False
            ) from None

    def _evaluate(self, r: int) -> tuple[dict | None, float]:
        t0 = time.perf_counter()
        clients = None
        if self.personal and self.pool is not None:  # eval.clients of them, or all
            cfg = self.cfg
            chosen = eval_clients(self.population.num_clients, cfg.eval.clients, cfg.run.seed)
            clients = self.pool.personal_models(chosen)
        with ema_applied(self.ema, self.model):  # train.ema_decay: sample from the average
            scores = self.evaluator.run(r, self.model, personal=self.personal, clients=clients)
        if self.pool is not None and self.pool.states is not None:
            self.pool.states.load_into(-1, self.model)  # back to the initial personal regions
        return scores, time.perf_counter() - t0

    def _checkpoint(self, r: int, final: bool) -> None:
        note = f"the last complete checkpoint is {self.schedule.unit} {r}; resume with --resume {self.run_dir}"
        checkpointing.write(
            self, r, final, on_complete=lambda note=note: setattr(self.preempt, "note", note)
        )
