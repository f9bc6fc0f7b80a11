"""The one round loop: a federated job (rank 0 the federator, ranks 1..K the client ranks)
and the centralized baseline (one client in one process, `SoloWorld`) run through `Job.run`.

Every rank walks through the same sequence of collectives:

    set-up (all ranks report errors together) -> initial broadcast of the full model
    for each round r = 1..R:
        sample = population.sample(r, key); plan = make_plan(method, r, N, seed, sample)
                     # pure, identical on every rank
        client ranks: their sampled clients' local training (E epochs or N steps),
                     one after another, through `ClientPool` and `LocalTrainer`
        flag collective (one allgather): stop request, non-finite clients, steps of
                     every rank; abandon the round consistently if signalled
        aggregation: per region, Reduce (n_k / sum n) * theta_k to the federator over
                     the subgroup of the ranks reporting it, Bcast the average back
        evaluation / checkpoint / one metrics row per round on the federator

Personal regions (UDEC: encoder + bottleneck, ULATDEC: encoder) never leave their
client's rank: with one client per rank the client keeps its model object across
rounds and only overwrites the regions it receives; with several, the rank keeps them
per client (train/clients.py). The baseline (the reference's "K = 1, E = 1 per round")
trains one epoch of the whole training set per round, has nothing to average, and
names its rounds epochs in its logs, metrics and checkpoints (`Schedule`).

This module is the loop and nothing else: set-up, one round, and the ways a round ends
early (a stop request, a non-finite average; non-finite models in nonfinite.py); a
rank's clients live in clients.py, and what a round records, saves and shows in
records.py, checkpointing.py, state.py and progress.py.
"""

from __future__ import annotations

import time

import torch

from fedmpi.config import Config
from fedmpi.data import load_arrays
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
from fedmpi.train.clients import check_clients, eval_clients, make_pool, sampling_key
from fedmpi.train.nonfinite import nonfinite_clients
from fedmpi.train.progress import LocalProgress
from fedmpi.train.schedule import Schedule
from fedmpi.train.state import RoundStart, shared_entries
from fedmpi.train.stop import (
    NonFiniteError,
    Preempted,
    PreemptFlag,
    StopTraining,
    report_errors,
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
                resumed = done is not None
                key, error = sampling_key(cfg, world, self.population, self.run_dir, resumed)
                report_errors(self, error if world.is_federator else None)
                self.sampling_key = key
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
            report_errors(self, error if world.is_federator else None)
        error = None
        try:
            self._build()
            if done is not None:
                state.restore(world, self.run_dir, done, self.model, self.trainer, self.device,
                              self.ema)  # fmt: skip
        except Exception as e:  # reported together below so no rank waits on a dead one
            known = (ConfigError, ValueError, CheckpointError)
            error = f"{e}" if isinstance(e, known) else f"{type(e).__name__}: {e}"
        report_errors(self, error)
        if not self.solo:  # every client's size, from the rank that loaded it
            held: dict = {}
            for part in world.allgather(self.pool.sizes() if self.pool else {}):
                held.update(part)
            f = self.cfg.fed
            self.population = Population.place(
                [held[c] for c in range(len(held))], world.num_clients, f.participation, f.sampling
            )
            error = None
            try:  # fed.secure: every region of every round needs enough reporting ranks
                check_secure_plans(self.cfg, self.population)
            except ConfigError as e:
                error = str(e)
            report_errors(self, error if world.is_federator else None)
        return done

    def _build(self) -> None:
        """Model, EMA, data and trainer of this rank; raises user errors with the fix."""
        cfg, world = self.cfg, self.world
        K = world.num_clients
        self.pool = None
        if not self.solo:
            check_clients(cfg, K, self.personal)
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
        local = world.trains and not self.solo and self.personal  # pre-averaging shared regions
        self.keeps_local_model, self.local_model = local and cfg.eval.personal == "local", None
        if world.trains:
            if self.solo:
                images, _ = load_arrays(cfg.data, "train")
            else:
                self.pool = make_pool(self, K)
                images = self.pool.data[self.pool.clients[0]]
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
            self.trainer.optimizer_from(cfg.train)
            self.trainer.new_optimizer()  # first Adam imports torch._dynamo: not in round 1
            self.n_k = float(len(images))
        self.schedule = Schedule.of(cfg, world, self.trainer)
        if self.trainer is not None:
            self.trainer.schedule = schedule_for(cfg.train, self.schedule.total_steps())

    def _round_start(self) -> RoundStart | None:
        """A trainer's weights at the round's start: the regions it never gets back from
        the federator (its personal ones; the baseline all of them); all of them with DP
        (the update is clipped against them), compression (the update is sent), secure
        aggregation (a left-out client's
        upload is encoded from them) or fed.on_nonfinite=skip (a left-out client is
        evaluated and trains on from them)."""
        if self.trainer is None:
            return None
        cfg = self.cfg
        multi = self.pool is not None and not self.pool.single  # each client from the start
        every = self.solo or multi or cfg.privacy.dp or cfg.fed.secure
        every = every or cfg.fed.compress != "none"  # the update is theta - start
        every = every or cfg.fed.on_nonfinite == "skip"
        kept = REGIONS if every else personal_regions(self.method)
        frozen = cfg.fed.freeze_unshared and not self.solo  # a new Adam every round then
        keep_optimizer = not (self.schedule.reset_optimizer(cfg) or frozen or multi)
        return RoundStart({r: region_tensor(self.model, r) for r in kept}, keep_optimizer)

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
            error = None
            try:  # a client rank's state index, the federator's server-optimizer moments
                state.restore_job_state(self, done)
            except (CheckpointError, ValueError) as e:
                error = str(e)
            report_errors(self, error)
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
            self.log(records.headline(self))
        return 1

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
        nonfinite = nonfinite_clients(self, r, plan, flags, stats)
        sizes = [int(self.n_k)] if self.solo else self.population.round_sizes(sampled, nonfinite)
        if world.is_federator and cfg.fed.secure and not nonfinite:
            records.warn_withheld(self, r, plan, sizes)

        last = r == self.schedule.rounds
        evaluate = self.evaluator is not None and (
            (cfg.eval.every and r % cfg.eval.every == 0) or last
        )
        checkpoint_due = (cfg.checkpoint.every and r % cfg.checkpoint.every == 0) or last
        local_scoring = evaluate and self.personal and cfg.eval.personal == "local"
        scores, t_eval = None, 0.0
        if local_scoring:  # each client's own model, before the aggregation
            scores, t_eval = self._evaluate(r)
        if self.keeps_local_model and checkpoint_due:  # what fedmpi.evaluate re-scores
            self.local_model = (r, shared_entries(self.model, self.method))
        t0 = time.perf_counter()
        if self.pool is not None:
            self.pool.prepare_single(plan, stats)  # DP: the one client's clipping
        exchanged = self._exchange(r, plan, sizes)
        stats.update(exchanged)
        if self.pool is not None:
            records.upload_stats_to_rows(stats.get("per_client"), exchanged, self.pool.single)
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
        if checkpoint_due:
            self._checkpoint(r, final=last)
        t_ckpt = time.perf_counter() - t0
        times = dict(wait_s=t_wait, agg_s=t_agg, eval_s=t_eval, ckpt_s=t_ckpt, t_round=t_round)
        records.record(self, r, stats, scores, nonfinite, times, plan)
        self.writer.start()  # the federator's checkpoint file, while the next round trains

    def _train(self, r: int, plan, sampled: list[int]) -> dict:
        """This rank's local training of round `r`: the rank's statistics ({} on the
        federator, or when a stop request cut it short)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        self.round_start.save(trainer)
        mine = [0] if self.solo else [c for c in sampled if c in self.pool.data]
        size = self.pool.size if self.pool is not None else lambda c: 0
        steps = {c: self.schedule.client_steps(self.cfg, r, size(c)) for c in mine}
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
