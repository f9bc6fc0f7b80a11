"""The federated round loop: rank 0 the federator, ranks 1..K the clients.

Every rank runs `run_federated` and walks through the same sequence of collectives:

    setup (all ranks report errors together) -> initial broadcast of the full model
    for each round r = 1..R:
        plan = make_plan(method, r, K, seed)          # pure, identical on every rank
        clients: local training (E epochs or N steps) through `LocalTrainer`
        flag collective (one allgather): stop request, finite model, steps and n_k of
                     every rank; abandon the round consistently if signalled
        aggregation: per region, Reduce (n_k / sum n) * theta_k to the federator over
                     the subgroup of its reporters, Bcast the average to its receivers
        evaluation / checkpoint / one metrics row per round on the federator

Personal regions (UDEC: encoder + bottleneck, ULATDEC: encoder) never leave their
client: the client keeps its model object across rounds and only overwrites the
regions it receives.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from fedmpi.config import Config, ConfigError
from fedmpi.data import load_client_data
from fedmpi.dist.relay import ProgressRelay
from fedmpi.errors import EXIT_NONFINITE, EXIT_PREEMPTED
from fedmpi.fl.aggregate import Aggregator, NonFiniteAverage, check_secure_plans
from fedmpi.fl.ledger import Ledger, append_rows
from fedmpi.fl.methods import make_plan, personal_regions
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.regions import REGIONS, all_finite, bind_flat, finite, region_sizes, set_trainable
from fedmpi.model.summary import model_shape
from fedmpi.model.unet import build_unet
from fedmpi.runtime import derive_seed, pick_device, share_cpu_threads
from fedmpi.store.atomic import EXIT_DISK, DiskError
from fedmpi.store.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    atomic_save,
    checkpoint_dir,
    client_state,
    latest_complete,
    load_checkpoint,
    mark_complete,
    marker_files,
    newest_verified,
)
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import JsonlWriter
from fedmpi.train.progress import RoundProgress
from fedmpi.train.trainer import EMA, LocalTrainer, ema_applied, schedule_for


class JobStop(RuntimeError):
    """Raised on EVERY rank together (the decision came from a collective), so the job
    can end with `exit_code` without MPI_Abort; the federator has logged the reason.
    `collective=False`: raised by one rank alone, which must abort the job."""

    exit_code = 1

    def __init__(self, message: str = "", collective: bool = True):
        super().__init__(message)
        self.collective = collective


class SetupError(JobStop):
    """Any rank failed during set-up or resume validation (message already shown)."""

    exit_code = 2


class Preempted(JobStop):
    """A checkpoint of the last complete round was written in response to a signal."""

    exit_code = EXIT_PREEMPTED


class NonFiniteError(JobStop):
    """A client's update was not finite and fed.on_nonfinite is 'abort'."""

    exit_code = EXIT_NONFINITE


class CheckpointWriteError(JobStop):
    """A rank could not write its checkpoint file (disk full, quota, permissions)."""

    exit_code = EXIT_DISK


class PreemptFlag:
    """Asks the job to checkpoint and stop: SIGUSR1 or SIGTERM on this rank, or the file
    RUN_DIR/PREEMPT. The file works whatever the launcher does with signals (Open MPI
    5's mpirun forwards SIGUSR1 to the ranks, 4.x's does not); slurm/run.sh writes it
    when Slurm sends the time-limit signal.

    SIGTERM is what `scancel`, `kill` and a time limit without --signal send. Where the
    ranks get it with time to act (srun tasks: Slurm waits KillWait, 30 s by default,
    before SIGKILL) it is a preemption like SIGUSR1: checkpoint, exit 75. Open MPI's
    mpirun instead kills its ranks about 0.25 s after forwarding SIGTERM, so the
    handler first prints, at once, where the run can be resumed from (`note`)."""

    def __init__(self, stop_file: Path | None = None, announce: bool = False):
        self.signalled = False
        self.signal_name = None
        self.stop_file = stop_file
        self.announce = announce  # this rank prints the note on SIGTERM (the federator)
        self.note = "no checkpoint has been written yet"
        self._next_check = 0.0
        self._before = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._before[sig] = signal.signal(sig, self._handler)
            except (ValueError, AttributeError):  # not the main thread / no such signal
                pass

    def restore(self) -> None:
        """The signal handlers as they were before (a job run inside a longer process)."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._before = {}

    TERM_GRACE = 10.0  # seconds a rank may take to stop cleanly after SIGTERM

    def _handler(self, signum, frame):
        self.signalled = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGTERM and not getattr(self, "_watchdog", None):
            # SIGTERM also comes from the launcher taking the job down after another rank
            # failed (MPI_Abort, kill -9): then the collective this rank waits in never
            # completes. Whatever happens, this process is gone TERM_GRACE seconds later.
            import threading

            self._watchdog = threading.Timer(self.TERM_GRACE, os._exit, args=(128 + signum,))
            self._watchdog.daemon = True
            self._watchdog.start()
        if signum == signal.SIGTERM and self.announce:
            msg = (
                f"fedmpi: SIGTERM received (scancel, kill or a time limit): stopping; "
                f"{self.note}. For a clean checkpoint-and-exit send SIGUSR1 or create "
                f"RUN_DIR/{STOP_FILE} instead (slurm/run.sh does so at the time limit).\n"
            )
            try:
                os.write(2, msg.encode())
            except OSError:
                pass

    @property
    def requested(self) -> bool:
        if not self.signalled and self.stop_file is not None:
            now = time.monotonic()
            if now >= self._next_check:  # a stat per second at most (shared filesystems)
                self._next_check = now + 1.0
                self.signalled = self.stop_file.exists()
        return self.signalled


STOP_FILE = "PREEMPT"


class RoundStart:
    """A client's weights (and its Adam state, when kept across rounds) at the start of a
    round, copied into buffers allocated once per run: an abandoned (preempted) round is
    rolled back from it, and a non-finite client restarts from it. One memcpy per region
    per round instead of deep copies of the state dicts.

    `flat`: the regions to keep. The round loop keeps only those the client never gets
    back (its personal regions) unless DP, secure aggregation or on_nonfinite=skip need
    them all: every other region is overwritten by the round's broadcast, and after an
    abandoned round the client's file holds no shared weights (they come from
    federator.pt), so FULL and USPLIT clients copy nothing."""

    def __init__(self, flat: dict, keep_optimizer: bool):
        self.flat = flat
        self.weights = {r: torch.empty_like(t) for r, t in flat.items()}
        self.keep_optimizer = keep_optimizer
        self.opt_state: dict = {}
        self.scaler_state: dict | None = None  # fp16: the loss scale and its tracker

    def save(self, trainer) -> None:
        if trainer.ema is not None:  # UDEC / ULATDEC clients' EMA of their local training
            trainer.ema.mark()
        self.scaler_state = trainer.scaler_state()
        with torch.no_grad():
            for r, t in self.flat.items():
                self.weights[r].copy_(t)
            if self.keep_optimizer and trainer.optimizer is not None:
                state = trainer.optimizer.state
                for p in list(self.opt_state):
                    if p not in state:
                        del self.opt_state[p]
                for p, st in state.items():
                    saved = self.opt_state.setdefault(p, {})
                    for k, v in st.items():
                        if k not in saved:
                            saved[k] = v.clone() if torch.is_tensor(v) else v
                        elif torch.is_tensor(v):
                            saved[k].copy_(v)
                        else:
                            saved[k] = v

    def restore(self, trainer) -> None:
        if trainer.ema is not None:
            trainer.ema.rollback()
        trainer.load_scaler_state(self.scaler_state)
        with torch.no_grad():
            for r, t in self.flat.items():
                t.copy_(self.weights[r])
            if self.keep_optimizer and trainer.optimizer is not None:
                state = trainer.optimizer.state
                for p in list(state):
                    if p not in self.opt_state:
                        del state[p]  # no step had been taken for it at the round's start
                for p, saved in self.opt_state.items():
                    for k, v in saved.items():
                        if torch.is_tensor(v) and k in state[p]:
                            state[p][k].copy_(v)
                        else:
                            state[p][k] = v.clone() if torch.is_tensor(v) else v


def _setup(cfg: Config, world, device) -> dict:
    """Everything a rank needs before round 1; raises user errors with a clear message."""
    K = world.num_clients
    if cfg.split.num_clients is not None and cfg.split.num_clients != K:
        raise ConfigError(
            f"split.num_clients is {cfg.split.num_clients} but the job has {world.size} ranks "
            f"(= 1 federator + {K} clients); launch with mpirun -n {cfg.split.num_clients + 1} "
            f"or set --split.num_clients={K}"
        )
    check_secure_plans(cfg, K)  # fed.secure: every region of every round needs 2 reporters
    channels, size = model_shape(cfg)
    torch.manual_seed(derive_seed(cfg.run.seed, 0xC0FFEE))
    model = build_unet(cfg.model, channels, size).to(device)
    bind_flat(model)  # each region one contiguous buffer: collectives work in place
    model.channels_last = cfg.train.channels_last  # the federator samples in it too
    state = {"model": model, "trainer": None, "n_k": 0.0, "ema": None, "per_round": 0}
    # train.ema_decay: the EMA of the model this rank evaluates. Global models (FULL,
    # USPLIT): every rank holds the global model after each aggregation and folds it into
    # an identical average (no bytes moved); personal models (UDEC, ULATDEC): each client
    # averages its own local training, step by step. Only raw weights are communicated.
    personal = bool(personal_regions(cfg.fed.method))
    if cfg.train.ema_decay > 0 and not (personal and world.is_federator):
        state["ema"] = EMA(model, cfg.train.ema_decay)
    if not world.is_federator:
        images, _ = load_client_data(cfg, world.client, K)
        trainer = state["trainer"] = LocalTrainer(
            model,
            Diffusion.from_config(cfg.diffusion),
            images,
            cfg.train.batch_size,
            cfg.train.lr,
            device,
            ema=state["ema"] if personal else None,
            grad_clip=cfg.train.grad_clip,
        )
        state["per_round"] = trainer.steps_for(cfg.fed.local_epochs, cfg.fed.local_steps)
        trainer.schedule = schedule_for(cfg.train, cfg.fed.rounds * state["per_round"])
        trainer.speed_from(cfg.train)
        trainer.new_optimizer()  # first Adam imports torch._dynamo: not in round 1
        state["n_k"] = float(len(images))
    return state


def _checkpoint(
    cfg,
    world,
    run_dir: Path,
    round_index: int,
    model,
    trainer,
    log,
    ema: EMA | None = None,
    writer: BackgroundWriter | None = None,
    final: bool = True,
    on_complete=None,
) -> None:
    """Every rank writes its file; the federator marks the round COMPLETE (with each
    file's sha256) only when every rank wrote a finite model, then prunes older rounds.
    A write error on any rank stops every rank together with the OS message.

    With a background `writer` and `final=False`, the federator's own file and then the
    marker are written by the writer's thread after this returns; the caller must not
    change the federator's model before `writer.join()` (the round loop joins at the
    start of the next round). A failure is reported by the next call, or at the end.
    `on_complete`: called on the federator once the marker is written (the SIGTERM note)."""
    d = checkpoint_dir(run_dir, round_index)
    name = "federator.pt" if world.is_federator else f"client_{world.client + 1:03d}.pt"

    def contents() -> dict:
        if world.is_federator:
            obj = {
                "round": round_index,
                "clients": world.num_clients,
                "model": model.state_dict(),
                "config": cfg.to_dict(),
            }
        else:
            opt = (
                trainer.optimizer.state_dict()
                if (trainer.optimizer is not None and not cfg.fed.reset_optimizer)
                else None
            )
            # Only what is this client's own: its personal regions (UDEC / ULATDEC). The
            # shared regions equal the federator's after the exchange and are stored once,
            # in federator.pt (FULL / USPLIT clients write no weights at all).
            obj = {
                "round": round_index,
                "client": world.rank,
                "model": own_entries(model, cfg.fed.method),
                "optimizer": opt,
                "scaler": trainer.scaler_state(),
            }
        # the global model's EMA (FULL, USPLIT) is the same on every rank: stored once, by
        # the federator; a personal-model client's EMA of its local training is its own
        if ema is not None and (world.is_federator or personal_regions(cfg.fed.method)):
            obj["ema"] = ema.state_dict()
        return obj

    background = world.is_federator and writer is not None and writer.enabled and not final
    obj = None if background else contents()  # background: built by the thread
    # the federator's whole model; a client's own entries (after an abandoned round its
    # shared regions hold that round's training, which is not written)
    finite_now = (
        all_finite(model)
        if world.is_federator
        else finite(*[t for t in obj["model"].values() if t.is_floating_point()])
    )
    mine = {"name": name, "sha256": None, "error": None, "finite": finite_now}
    if writer is not None:
        mine["error"] = writer.wait()  # the previous round's background write
    if mine["finite"] and not mine["error"] and not background:
        try:
            mine["sha256"] = atomic_save(obj, d / name)
        except DiskError as e:
            mine["error"] = str(e)
    world.wait_all("checkpoint")
    results = world.allgather(mine)
    errors = [f"rank {rank}: {r['error']}" for rank, r in enumerate(results) if r["error"]]
    if errors:
        log(
            f"error: could not write a checkpoint: {'; '.join(errors)}. Earlier checkpoints "
            f"are intact; free space (or fix the folder) and resume with --resume {run_dir}"
        )
        raise CheckpointWriteError(errors[0])
    bad = [rank for rank, r in enumerate(results) if not r["finite"]]
    if bad:  # never mark (and so never prune for) a checkpoint holding NaN / inf
        log(
            f"error: round {round_index}: the model of rank(s) {bad} is not finite; "
            f"checkpoint not written, earlier checkpoints kept"
        )
        raise NonFiniteError(f"non-finite model at checkpoint of round {round_index}")
    if world.is_federator:
        files = {r["name"]: r["sha256"] for r in results}

        def finish():
            if background:
                files[name] = atomic_save(contents(), d / name)
            mark_complete(run_dir, round_index, cfg.checkpoint.keep, files)
            if on_complete is not None:
                on_complete()

        if background:
            writer.submit(finish)
        else:
            finish()


# What must not change between a checkpoint and the job that resumes it.
RESUME_KEYS = (
    "fed.method",
    "data.dataset",
    "data.train_subset",
    "data.shards",
    "split.kind",
    "split.beta",
    "split.min_size",
    "split.classes_per_client",
    "split.rng",
)


def own_entries(model: torch.nn.Module, method: str) -> dict:
    """The state-dict entries a client does not share with the federator: those of its
    personal regions' submodules (and of any child outside the regions), built from those
    submodules alone (FULL / USPLIT: nothing, without walking the model; the UNet has
    no parameters of its own outside its children)."""
    personal = set(personal_regions(method))
    out: dict = {}
    for name, child in model.named_children():
        if name in personal or name not in REGIONS:
            child.state_dict(destination=out, prefix=f"{name}.")
    return out


def _resume_mismatch(
    cfg: Config, saved: dict, saved_clients: int, world_size: int, run_dir: Path
) -> str | None:
    """Why `cfg` on `world_size` ranks cannot continue a checkpoint, or None."""
    from fedmpi.config import from_dict, get

    problems = []
    if saved_clients != world_size - 1:
        problems.append(
            f"it was run with K={saved_clients} clients (world size "
            f"{saved_clients + 1}) and this job has {world_size} ranks: launch it "
            f"with mpirun -n {saved_clients + 1} ... --resume {run_dir}"
        )
    try:
        old = from_dict(saved, "<checkpoint config>")
    except ConfigError:
        old = None
    if old is not None:
        keys = list(RESUME_KEYS) + [f"model.{f}" for f in old.model.__dataclass_fields__]
        for key in keys:
            try:
                a, b = get(old, key), get(cfg, key)
            except AttributeError:
                continue
            if a != b:
                problems.append(f"{key} is {a!r} in the checkpoint but {b!r} now")
        seeds = (
            old.split.seed if old.split.seed is not None else old.run.seed,
            cfg.split.seed if cfg.split.seed is not None else cfg.run.seed,
        )
        if seeds[0] != seeds[1]:
            problems.append(
                f"the split seed (split.seed, else run.seed) is {seeds[0]} in the "
                f"checkpoint but {seeds[1]} now"
            )
    if not problems:
        return None
    return (
        f"cannot resume {run_dir}: "
        + "; ".join(problems)
        + ". Resume with the settings of the run (drop the overrides), or start a new run."
    )


def _resume_decision(cfg: Config, world, run_dir: Path, log) -> tuple[int | None, str | None]:
    """On the federator: the newest complete checkpoint whose files verify and fit this
    job (falling back past corrupt ones), or an error message."""
    index = newest_verified(run_dir, warn=log)
    if index is None:
        return None, None
    path = checkpoint_dir(run_dir, index) / "federator.pt"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        return None, str(e)
    names = [n for n in marker_files(run_dir, index) if n.startswith("client_")] or [
        p.name for p in checkpoint_dir(run_dir, index).glob("client_*.pt")
    ]
    clients = int(ckpt.get("clients", len(names)))
    return index, _resume_mismatch(cfg, ckpt.get("config") or {}, clients, world.size, run_dir)


def _restore(
    world, run_dir: Path, round_index: int, model, trainer, device, ema: EMA | None = None
) -> None:
    d = checkpoint_dir(run_dir, round_index)
    name = "federator.pt" if world.is_federator else f"client_{world.client + 1:03d}.pt"
    if world.is_federator:
        ckpt = load_checkpoint(d / name, device)
        model.load_state_dict(ckpt["model"])
    else:
        state, ckpt = client_state(d, name, device)
        model.load_state_dict(state)
    if ema is not None:
        if trainer is not None and trainer.ema is None:  # a global model's EMA: federator.pt
            name, ckpt = "federator.pt", load_checkpoint(d / "federator.pt", device)
        if ckpt.get("ema") is None:
            raise CheckpointError(
                f"{d / name} holds no EMA weights but train.ema_decay is "
                f"{ema.decay}: resume with --train.ema_decay=0 (as the run "
                f"was started)"
            )
        ema.load_state_dict(ckpt["ema"])
    if trainer is not None and ckpt.get("optimizer") is not None:
        trainer.new_optimizer().load_state_dict(ckpt["optimizer"])
    if trainer is not None:
        trainer.load_scaler_state(ckpt.get("scaler"))  # fp16: the loss scale goes on


def _report_errors(world, error: str | None, log) -> None:
    """Allgather one optional error per rank; if any, the federator shows them (grouped
    by message) and every rank raises SetupError together."""
    errors = world.allgather(error)
    if any(errors):
        if world.is_federator:
            by_message: dict = {}
            for rank, msg in enumerate(errors):
                if msg:
                    by_message.setdefault(msg, []).append(str(rank))
            for msg, ranks in by_message.items():
                log(f"error (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}): {msg}")
        raise SetupError("set-up failed")


def run_federated(
    cfg: Config, world, run_dir: Path, resume: bool = False, log=print, evaluator_factory=None
) -> dict:
    """Run (or resume) a federated job; returns the federator's summary (others: {})."""
    preempt = PreemptFlag(Path(run_dir) / STOP_FILE, announce=world.is_federator)
    world.timeout = cfg.fed.round_timeout
    device = pick_device(cfg.run.device, world.local_rank)
    if device.type == "cpu":
        # the federator mostly waits: give the cores to the clients on this node
        share_cpu_threads(max(1, world.local_clients))

    # Resume point: decided (and checked against this job) before any work or output.
    done, error = None, None
    if resume and world.is_federator:
        done, error = _resume_decision(cfg, world, run_dir, log)
    done, error = world.bcast_obj((done, error))
    if error:
        _report_errors(world, error if world.is_federator else None, log)

    error = None
    try:
        state = _setup(cfg, world, device)
        if done is not None:
            _restore(world, run_dir, done, state["model"], state["trainer"], device, state["ema"])
    except Exception as e:  # reported together below so no rank waits on a dead one
        error = (
            f"{e}"
            if isinstance(e, (ConfigError, ValueError, CheckpointError))
            else f"{type(e).__name__}: {e}"
        )
    _report_errors(world, error, log)
    world.start_backend(device)

    model, trainer, n_k = state["model"], state["trainer"], state["n_k"]
    ema, per_round = state["ema"], state["per_round"]
    relay = ProgressRelay(world, cfg.run.progress_every)  # clients -> federator, live progress
    K, R, method = world.num_clients, cfg.fed.rounds, cfg.fed.method
    sizes = region_sizes(model)
    ledger = Ledger(world.rank)
    aggregator = Aggregator(world, model, ledger, cfg)  # fed.secure: key agreement here
    # A client's weights at the round's start: the regions it never gets back from the
    # federator (its personal ones); all of them with DP (the update is clipped against
    # them), secure aggregation (a left-out client's upload is encoded from them) or
    # fed.on_nonfinite=skip (a left-out client is evaluated and trains on from them).
    kept = (
        REGIONS
        if (cfg.privacy.dp or cfg.fed.secure or cfg.fed.on_nonfinite == "skip")
        else personal_regions(method)
    )
    round_start = (
        RoundStart(
            {r: aggregator.flat[r] for r in kept},
            keep_optimizer=not (cfg.fed.reset_optimizer or cfg.fed.freeze_unshared),
        )
        if trainer is not None
        else None
    )
    metrics = JsonlWriter(run_dir / "metrics.jsonl") if world.is_federator else None
    evaluator = evaluator_factory(cfg, world, run_dir, device) if evaluator_factory else None

    # The federator's checkpoint files are written by a thread (checkpoint.background);
    # leaving this block, however, waits for it: no write is ever left in flight.
    with BackgroundWriter(cfg.checkpoint.background) as writer:
        start = 1
        if resume and done is None and world.is_federator:
            log(f"resume: no usable checkpoint in {run_dir}; starting from round 1")
        if done is not None:
            start = done + 1
            preempt.note = (
                f"the last complete checkpoint is round {done}; resume with --resume {run_dir}"
            )
            if world.is_federator:
                _truncate_logs(run_dir, done)
                log(
                    f"resume: continuing after round {done} (checkpoint {checkpoint_dir(run_dir, done)})"
                )
        if start == 1:
            if world.is_federator:
                _truncate_logs(run_dir, 0)
            aggregator.initial_broadcast()
            _gather_round(world, ledger, run_dir, 0)
            if world.is_federator:
                log(
                    f"fedmpi: {method.upper()} | K={K} clients | R={R} rounds | {world.describe()} "
                    f"| device {device} | run {run_dir}" + _privacy_text(cfg)
                )

        for r in range(start, R + 1):
            t_round = time.perf_counter()
            writer.join()  # federator: the last checkpoint's file is written (see _checkpoint)
            plan = make_plan(method, r, K, cfg.run.seed)
            stats = {}
            if trainer is not None:
                round_start.save(trainer)
                if cfg.fed.freeze_unshared:
                    set_trainable(model, plan.uploads[world.client])
                    trainer.new_optimizer()
                elif cfg.fed.reset_optimizer or trainer.optimizer is None:
                    trainer.reset_optimizer()

                def stop_early(step, loss):
                    relay.report(r, step + 1, per_round, (step + 1) * cfg.train.batch_size)
                    if preempt.requested:
                        raise _StopTraining

                try:
                    stats = trainer.run(
                        seed=derive_seed(cfg.run.seed, r, world.client),
                        epochs=cfg.fed.local_epochs,
                        steps=cfg.fed.local_steps,
                        on_step=stop_early,
                        start_step=(r - 1) * per_round,
                        log_every=cfg.train.log_every,
                    )
                except _StopTraining:
                    stats = {}
                relay.finish(r, stats.get("steps", 0), per_round, stats.get("images", 0))
            # One small collective per round carries the stop request, whether each
            # client's model is finite, its steps and its FedAvg size n_k (every rank then
            # knows every weight of the averages), before anything is reduced.
            model_ok = trainer is None or all_finite(model)
            display = _watch_round(
                world, relay, r, R, log
            )  # federator: live progress while waiting
            flags = world.flags(
                [int(preempt.requested), int(not model_ok), stats.get("steps", 0), int(n_k)],
                phase=f"round {r}: local training",
            )
            _end_watch(world, relay, display)  # every progress message of the round delivered
            t_wait = time.perf_counter() - t_round  # local training incl. waiting for the slowest
            if flags[:, 0].any():
                # Abandon round r on every rank: roll back to the state after round r - 1.
                if trainer is not None:
                    round_start.restore(trainer)
                if r - 1 >= 1 and latest_complete_bcast(world, run_dir, writer, log) != r - 1:
                    _checkpoint(cfg, world, run_dir, r - 1, model, trainer, log, ema, writer)
                if world.is_federator:
                    why = f" ({preempt.signal_name})" if preempt.signal_name else ""
                    log(
                        f"preempted{why}: round {r} abandoned; checkpoint of round {r - 1} kept; "
                        f"resume with --resume {run_dir} (continues after round {r - 1})"
                    )
                raise Preempted(r - 1)

            nonfinite = [rank for rank in range(1, world.size) if flags[rank, 1]]
            n_clients = [
                0 if rank in nonfinite else int(flags[rank, 3]) for rank in range(1, world.size)
            ]
            if nonfinite:
                who = ", ".join(f"client {rank}" for rank in nonfinite)
                if cfg.fed.on_nonfinite == "abort":
                    if world.is_federator:
                        kept = settled_latest(run_dir, writer, log)
                        log(
                            f"error: round {r}: the model of {who} is not finite (NaN / inf: "
                            f"diverged? lower train.lr). Stopped before aggregation; "
                            + (
                                f"the last good checkpoint is round {kept} (--resume {run_dir})"
                                if kept
                                else "no checkpoint was written yet"
                            )
                            + ". fed.on_nonfinite=skip leaves such clients out of a round instead."
                        )
                    raise NonFiniteError(f"round {r}: non-finite update from {who}")
                if world.is_federator:
                    log(
                        f"warning: round {r}: {who} not finite: left out of this round's averages "
                        f"(fed.on_nonfinite=skip); their models restart from the round's start"
                    )
                    withheld = aggregator.withheld(plan, n_clients)
                    if withheld:
                        log(
                            f"warning: round {r}: region(s) {', '.join(withheld)} not averaged "
                            f"this round: without {who}, fewer than fed.secure_min_reporters="
                            f"{cfg.fed.secure_min_reporters} clients report them, and their "
                            f"secure sum would show the federator an upload in the clear"
                        )
                if world.rank in nonfinite:  # uploads with weight 0, restarts from round start
                    round_start.restore(trainer)

            personal = bool(personal_regions(method))
            evaluate = evaluator is not None and (
                (cfg.eval.every and r % cfg.eval.every == 0) or r == R
            )
            scores, t_eval = None, 0.0
            if evaluate and personal and cfg.eval.personal == "local":
                t0 = time.perf_counter()  # each client's own model, before the aggregation
                with ema_applied(ema, model):
                    scores = evaluator.run(r, model, personal=True)
                t_eval = time.perf_counter() - t0

            t0 = time.perf_counter()
            try:
                stats.update(
                    aggregator.exchange(
                        plan, n_clients, r, start=round_start.weights if round_start else None
                    )
                )
            except NonFiniteAverage as e:  # the federator alone: it must take the job down
                raise NonFiniteError(
                    f"{e}; no checkpoint written for this round", collective=False
                ) from None
            t_agg = time.perf_counter() - t0
            if ema is not None and not personal:  # the global model's EMA, identical on every rank
                ema.update(model, steps=max(1, round(float(flags[1:, 2].mean()))))

            if evaluate and not (personal and cfg.eval.personal == "local"):
                t0 = time.perf_counter()
                with ema_applied(ema, model):
                    scores = evaluator.run(r, model, personal=personal)
                t_eval = time.perf_counter() - t0

            t0 = time.perf_counter()
            if (cfg.checkpoint.every and r % cfg.checkpoint.every == 0) or r == R:
                note = f"the last complete checkpoint is round {r}; resume with --resume {run_dir}"
                _checkpoint(
                    cfg,
                    world,
                    run_dir,
                    r,
                    model,
                    trainer,
                    log,
                    ema,
                    writer,
                    final=r == R,
                    on_complete=lambda note=note: setattr(preempt, "note", note),
                )
            t_ckpt = time.perf_counter() - t0

            gathered = _gather_round(
                world, ledger, run_dir, r, dict(stats, client=world.rank, n=n_k)
            )
            if world.is_federator:
                client_stats, round_bytes = gathered
                rows = [s for s in client_stats if s["client"] > 0]  # clients 1..K = their ranks
                losses = [s.get("loss", float("nan")) for s in rows]
                good = [x for x in losses if np.isfinite(x)]
                t_train = max((s.get("train_s", 0.0) for s in rows), default=0.0)
                row = dict(
                    kind="round",
                    round=r,
                    method=method,
                    loss=float(np.mean(good)) if good else float("nan"),
                    client_loss=losses,
                    nonfinite_clients=nonfinite,
                    train_s=t_train,
                    wait_s=t_wait,
                    agg_s=t_agg,
                    eval_s=t_eval,
                    ckpt_s=t_ckpt,
                    round_s=time.perf_counter() - t_round,
                    bytes=round_bytes,
                    images_per_s=[s.get("images_per_s") for s in rows],
                )
                if scores:
                    row.update(scores)
                epsilon = aggregator.epsilon(r)  # privacy.dp: the guarantee after round r
                if epsilon is not None:
                    row.update(epsilon=epsilon, dp_delta=cfg.privacy.delta)
                metrics.write(**row)
                for s in rows:
                    for step, loss in s.pop("step_losses", ()):  # train.log_every
                        metrics.write(
                            kind="step", round=r, client=s["client"], step=step, loss=loss
                        )
                    metrics.write(kind="client", round=r, **s)
                score_txt = _score_text(scores) + (
                    f" | eps {epsilon:.3g}" if epsilon is not None else ""
                )
                span = f"clients {min(good):.4f}..{max(good):.4f}" if good else "no finite client"
                nan_txt = (
                    f" | NaN: client{'s' if len(nonfinite) > 1 else ''} "
                    f"{', '.join(map(str, nonfinite))} skipped"
                    if nonfinite
                    else ""
                )
                log(
                    f"[round {r}/{R}] loss {row['loss']:.4f} ({span}){nan_txt} | train {t_train:.1f}s "
                    f"agg {t_agg:.2f}s eval {t_eval:.1f}s ckpt {t_ckpt:.1f}s | "
                    f"{round_bytes / 1e6:.2f} MB{score_txt}"
                )
            writer.start()  # the federator's checkpoint file, while the next round trains

        summary = {}
        if world.is_federator:
            from fedmpi.fl.ledger import write_summary

            extra = {"secure": cfg.fed.secure}
            if cfg.privacy.dp:
                extra["privacy"] = dict(
                    cfg.to_dict()["privacy"], rounds=R, epsilon=aggregator.epsilon(R)
                )
            summary = write_summary(
                run_dir, method, K, R, sizes, cfg.run.seed, aggregator.upload_value_bytes, extra
            )
            moved = summary["measured"]["moved"]
            log(
                f"done: moved {moved['params']:,} parameters ({moved['bytes'] / 1e6:.1f} MB), "
                f"{100 * summary['moved']['reduction_vs_full']:.1f}% less than FULL would; "
                f"ledger matches the analytical table: {summary['matches_analytical']}"
            )
            grids = sorted((Path(run_dir) / "samples").glob(f"round_{R:04d}*.png"))
            log(
                (
                    f"samples: {grids[0]}"
                    + (f" (+{len(grids) - 1} more)" if len(grids) > 1 else "")
                    + " | "
                    if grids
                    else ""
                )
                + f"run folder: {run_dir}"
            )
        if evaluator is not None:
            evaluator.close()
        relay.close()
        return summary


def _privacy_text(cfg: Config) -> str:
    """The secure aggregation / DP settings for the start line ('' when both are off)."""
    parts = []
    if cfg.fed.secure:
        parts.append(f"secure aggregation (uint64, 2^-{cfg.fed.secure_frac_bits})")
    if cfg.privacy.dp:
        p = cfg.privacy
        parts.append(f"DP {p.mode} C={p.clip:g} z={p.noise_multiplier:g} delta={p.delta:g}")
    return "".join(f" | {x}" for x in parts)


def _score_text(scores: dict | None) -> str:
    """The headline scores for the one-line progress report."""
    if not scores:
        return ""
    parts = []
    for name in ("fid", "fd_classifier", "classes_present"):
        if name in scores:
            parts.append(f"{name} {scores[name]:.2f}")
        elif f"{name}_mean" in scores:
            parts.append(f"{name} {scores[name + '_mean']:.2f}+-{scores[name + '_std']:.2f}")
    return "".join(f" | {p}" for p in parts)


class _StopTraining(Exception):
    pass


def _watch_round(world, relay: ProgressRelay, r: int, rounds: int, log) -> RoundProgress | None:
    """Federator: show the clients' relayed progress while it waits for the round's
    first collective (`World.waiting_hook`, called about every 0.1 s)."""
    if not (world.is_federator and relay.enabled):
        return None
    display = RoundProgress(r, rounds, world.num_clients, log)

    def hook():
        for rank, msg in relay.poll():
            display.add(rank, int(msg[1]), int(msg[2]), int(msg[3]))
        display.show()

    world.waiting_hook = hook
    return display


def _end_watch(world, relay: ProgressRelay, display: RoundProgress | None) -> None:
    """After the round's first collective: the federator receives the rest of the round's
    progress messages, the clients complete their sends; none is left for later."""
    world.waiting_hook = None
    if world.is_federator:
        for rank, msg in relay.drain():
            if display is not None:
                display.add(rank, int(msg[1]), int(msg[2]), int(msg[3]))
        if display is not None:
            display.close()
    else:
        relay.end_round()


def settled_latest(run_dir: Path, writer: BackgroundWriter | None = None, log=print):
    """The federator's newest complete checkpoint once any write in flight has finished
    (a failed one is logged and leaves its round incomplete)."""
    error = writer.wait() if writer is not None else None
    if error:
        log(f"warning: a background checkpoint write failed ({error})")
    return latest_complete(run_dir)


def latest_complete_bcast(world, run_dir: Path, writer: BackgroundWriter | None = None, log=print):
    """`settled_latest` on every rank (the caller writes that round again if it failed)."""
    return world.bcast_obj(settled_latest(run_dir, writer, log) if world.is_federator else None)


def _gather_round(world, ledger: Ledger, run_dir: Path, round_index: int, stats=None):
    """One gather per round: every rank's stats and ledger rows of this round; the
    federator appends the rows to comm.csv and returns (stats, bytes it moved)."""
    mine = ledger.pop_round(round_index)  # sent once: the ledger does not grow with R
    gathered = world.gather((stats, mine))
    if not world.is_federator:
        return None
    append_rows([row for _, rows in gathered for row in rows], run_dir / "comm.csv")
    return [s for s, _ in gathered], sum(row["bytes"] for row in mine)


def _truncate_logs(run_dir: Path, last_round: int) -> None:
    """Drop rows of rounds after `last_round` (they are replayed after a resume)."""
    RunFolder(run_dir).truncate(last_round, "round")
