"""The federated round loop: rank 0 the federator, ranks 1..K the clients.

Every rank runs `run_federated` and walks through the same sequence of collectives:

    setup (all ranks report errors together) -> initial broadcast of the full model
    for each round r = 1..R:
        plan = make_plan(method, r, K, seed)          # pure, identical on every rank
        clients: local training (E epochs or N steps) through `LocalTrainer`
        preemption check (one allreduce): abandon the round consistently if signalled
        aggregation: per region, Reduce n_k * theta_k to the federator over the
                     subgroup of its reporters, Bcast the average to its receivers
        evaluation / checkpoint / one metrics row per round on the federator

Personal regions (UDEC: encoder + bottleneck, ULATDEC: encoder) never leave their
client: the client keeps its model object across rounds and only overwrites the
regions it receives.
"""
from __future__ import annotations

import copy
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import (atomic_save, checkpoint_dir, latest_complete, mark_complete)
from .config import Config, ConfigError
from .data import load_client_data
from .diffusion import Diffusion
from .ledger import Ledger, append_rows
from .methods import make_plan, personal_regions
from .metrics import JsonlWriter
from .regions import (REGIONS, bind_flat, region_array, region_sizes, set_trainable,
                      unflatten)
from .summary import model_shape
from .trainer import LocalTrainer, derive_seed, pick_device, share_cpu_threads
from .unet import build_unet

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, resubmit to continue


class SetupError(RuntimeError):
    """Raised on every rank when any rank failed during set-up (message already shown)."""


class Preempted(RuntimeError):
    """Raised on every rank after a checkpoint was written in response to a signal."""


class PreemptFlag:
    """Asks the job to checkpoint and stop: SIGUSR1 on this rank, or the file
    RUN_DIR/PREEMPT. The file works whatever the launcher does with signals (Open MPI
    5's mpirun forwards SIGUSR1 to the ranks, 4.x's does not); slurm/run.sh writes it
    when Slurm sends the time-limit signal."""

    def __init__(self, stop_file: Optional[Path] = None):
        self.signalled = False
        self.stop_file = stop_file
        self._next_check = 0.0
        try:
            signal.signal(signal.SIGUSR1, self._handler)
        except (ValueError, AttributeError):  # not the main thread / no SIGUSR1
            pass

    def _handler(self, signum, frame):
        self.signalled = True

    @property
    def requested(self) -> bool:
        if not self.signalled and self.stop_file is not None:
            now = time.monotonic()
            if now >= self._next_check:  # a stat per second at most (shared filesystems)
                self._next_check = now + 1.0
                self.signalled = self.stop_file.exists()
        return self.signalled


STOP_FILE = "PREEMPT"


def _exchange(world, plan, model, n_k: float, ledger: Ledger, sizes: dict, round_index: int,
              timings: Optional[dict] = None) -> None:
    """Aggregate every region shared in this round (both roles call this).

    Per region: clients Reduce [n_k * theta_k, n_k] (one float32 buffer) to the
    federator over the subgroup of the region's reporters; the federator divides into
    its own weights and Bcasts them to the subgroup of the region's receivers. With
    `bind_flat` models on the CPU, the federator reduces into scratch and broadcasts
    from its weights, and clients receive straight into theirs: one pass to scale, one
    to divide, no other copies.
    """
    me = world.client
    for region in REGIONS:
        ups, downs = plan.uploaders(region), plan.receivers(region)
        n = sizes[region]
        up_group = world.group(ups) if ups else None
        down_group = None
        if downs:
            down_group = up_group if downs == ups else world.group(downs)
        t0 = time.perf_counter()
        if up_group is not None and up_group.is_member:
            send = world.scratch(f"send-{region}", n + 1)
            if world.is_federator:
                send.fill(0.0)
            else:
                theta, _ = region_array(model, region)
                np.multiply(theta, np.float32(n_k), out=send[:n])
                send[n] = n_k
                ledger.record(round_index, me, region, "up", n)
            total = world.reduce_sum(up_group, send)
            if world.is_federator:
                theta, is_view = region_array(model, region)
                np.divide(total[:n], total[n], out=theta)
                if not is_view:
                    unflatten(model, region, theta)
                for _ in ups:
                    ledger.record(round_index, -1, region, "up", n)
        if down_group is not None and down_group.is_member:
            theta, is_view = region_array(model, region)
            world.bcast(down_group, theta)
            if world.is_federator:
                for _ in downs:
                    ledger.record(round_index, -1, region, "down", n)
            else:
                if not is_view:
                    unflatten(model, region, theta)
                ledger.record(round_index, me, region, "down", n)
        if timings is not None:
            timings[region] = timings.get(region, 0.0) + time.perf_counter() - t0
        for g in {id(g): g for g in (up_group, down_group) if g is not None}.values():
            world.release(g)


def _initial_broadcast(world, model, ledger: Ledger, sizes: dict) -> None:
    group = world.group(range(world.num_clients))
    for region in REGIONS:
        theta, is_view = region_array(model, region)  # as in _exchange: in place when bound
        world.bcast(group, theta)
        if world.is_federator:
            for _ in range(world.num_clients):
                ledger.record(0, -1, region, "down", sizes[region])
        else:
            if not is_view:
                unflatten(model, region, theta)
            ledger.record(0, world.client, region, "down", sizes[region])
    world.release(group)


def _setup(cfg: Config, world, device) -> dict:
    """Everything a rank needs before round 1; raises user errors with a clear message."""
    K = world.num_clients
    if cfg.split.num_clients is not None and cfg.split.num_clients != K:
        raise ConfigError(
            f"split.num_clients is {cfg.split.num_clients} but the job has {world.size} ranks "
            f"(= 1 federator + {K} clients); launch with mpirun -n {cfg.split.num_clients + 1} "
            f"or set --split.num_clients={K}")
    channels, size = model_shape(cfg)
    torch.manual_seed(derive_seed(cfg.run.seed, 0xC0FFEE))
    model = build_unet(cfg.model, channels, size).to(device)
    bind_flat(model)  # each region one contiguous buffer: collectives work in place
    state = {"model": model, "trainer": None, "n_k": 0.0}
    if not world.is_federator:
        images, _ = load_client_data(cfg, world.client, K)
        state["trainer"] = LocalTrainer(model, Diffusion.from_config(cfg.diffusion), images,
                                        cfg.train.batch_size, cfg.train.lr, device)
        state["trainer"].new_optimizer()  # first Adam imports torch._dynamo: not in round 1
        state["n_k"] = float(len(images))
    return state


def _checkpoint(cfg, world, run_dir: Path, round_index: int, model, trainer) -> None:
    d = checkpoint_dir(run_dir, round_index)
    if world.is_federator:
        atomic_save({"round": round_index, "model": model.state_dict(),
                     "config": cfg.to_dict()}, d / "federator.pt")
    else:
        opt = trainer.optimizer.state_dict() if (trainer.optimizer is not None
                                                 and not cfg.fed.reset_optimizer) else None
        atomic_save({"round": round_index, "client": world.client, "model": model.state_dict(),
                     "optimizer": opt}, d / f"client_{world.client + 1:03d}.pt")
    world.barrier()  # every rank's file is in place before the marker
    if world.is_federator:
        mark_complete(run_dir, round_index, cfg.checkpoint.keep)
    world.barrier()


def _restore(world, run_dir: Path, round_index: int, model, trainer, device) -> None:
    d = checkpoint_dir(run_dir, round_index)
    name = "federator.pt" if world.is_federator else f"client_{world.client + 1:03d}.pt"
    ckpt = torch.load(d / name, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    if trainer is not None and ckpt.get("optimizer") is not None:
        trainer.new_optimizer().load_state_dict(ckpt["optimizer"])


def run_federated(cfg: Config, world, run_dir: Path, resume: bool = False, log=print,
                  evaluator_factory=None) -> dict:
    """Run (or resume) a federated job; returns the federator's summary (others: {})."""
    preempt = PreemptFlag(Path(run_dir) / STOP_FILE)
    device = pick_device(cfg.run.device, world.local_rank)
    if device.type == "cpu":
        # the federator mostly waits: give the cores to the clients on this node
        share_cpu_threads(max(1, world.local_clients))
    error = None
    try:
        state = _setup(cfg, world, device)
    except Exception as e:  # reported together below so no rank waits on a dead one
        error = f"{e}" if isinstance(e, (ConfigError, ValueError)) else f"{type(e).__name__}: {e}"
    errors = world.comm.allgather(error)
    if any(errors):
        if world.is_federator:
            by_message: dict = {}
            for rank, msg in enumerate(errors):
                if msg:
                    by_message.setdefault(msg, []).append(str(rank))
            for msg, ranks in by_message.items():
                log(f"error (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}): {msg}")
        raise SetupError("set-up failed")
    world.start_backend(device)

    model, trainer, n_k = state["model"], state["trainer"], state["n_k"]
    K, R, method = world.num_clients, cfg.fed.rounds, cfg.fed.method
    sizes = region_sizes(model)
    ledger = Ledger(world.rank)
    metrics = JsonlWriter(run_dir / "metrics.jsonl") if world.is_federator else None
    evaluator = evaluator_factory(cfg, world, run_dir, device) if evaluator_factory else None

    start = 1
    if resume:
        done = world.bcast_obj(latest_complete(run_dir) if world.is_federator else None)
        if done is None:
            if world.is_federator:
                log(f"resume: no complete checkpoint in {run_dir}; starting from round 1")
        else:
            _restore(world, run_dir, done, model, trainer, device)
            start = done + 1
            if world.is_federator:
                _truncate_logs(run_dir, done)
                log(f"resume: continuing after round {done} (checkpoint {checkpoint_dir(run_dir, done)})")
    if start == 1:
        if world.is_federator:
            _truncate_logs(run_dir, 0)
        _initial_broadcast(world, model, ledger, sizes)
        _flush_ledger(world, ledger, run_dir, 0)
        if world.is_federator:
            log(f"fedmpi: {method.upper()} | K={K} clients | R={R} rounds | {world.describe()} "
                f"| device {device} | run {run_dir}")

    for r in range(start, R + 1):
        t_round = time.perf_counter()
        plan = make_plan(method, r, K, cfg.run.seed)
        snapshot = None
        stats = {}
        if trainer is not None:
            snapshot = (copy.deepcopy(model.state_dict()),
                        copy.deepcopy(trainer.optimizer.state_dict()) if trainer.optimizer else None)
            if cfg.fed.freeze_unshared:
                set_trainable(model, plan.uploads[world.client])
                trainer.new_optimizer()
            elif cfg.fed.reset_optimizer or trainer.optimizer is None:
                trainer.new_optimizer()

            def stop_early(step, loss):
                if preempt.requested:
                    raise _StopTraining

            try:
                stats = trainer.run(seed=derive_seed(cfg.run.seed, r, world.client),
                                    epochs=cfg.fed.local_epochs, steps=cfg.fed.local_steps,
                                    on_step=stop_early)
            except _StopTraining:
                stats = {}
        stop = world.any(preempt.requested)
        t_wait = time.perf_counter() - t_round  # local training incl. waiting for the slowest
        if stop:
            # Abandon round r on every rank: roll back to the state after round r - 1.
            if trainer is not None:
                model.load_state_dict(snapshot[0])
                if snapshot[1] is not None:
                    trainer.optimizer.load_state_dict(snapshot[1])
            if r - 1 >= 1 and latest_complete_bcast(world, run_dir) != r - 1:
                _checkpoint(cfg, world, run_dir, r - 1, model, trainer)
            if world.is_federator:
                log(f"preempted: round {r} abandoned; resume continues after round {r - 1}")
            raise Preempted(r - 1)

        t0 = time.perf_counter()
        _exchange(world, plan, model, n_k, ledger, sizes, r)
        t_agg = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = None
        if evaluator is not None and ((cfg.eval.every and r % cfg.eval.every == 0) or r == R):
            scores = evaluator.run(r, model, personal=bool(personal_regions(method)))
        t_eval = time.perf_counter() - t0

        t0 = time.perf_counter()
        if (cfg.checkpoint.every and r % cfg.checkpoint.every == 0) or r == R:
            _checkpoint(cfg, world, run_dir, r, model, trainer)
        t_ckpt = time.perf_counter() - t0

        client_stats = world.gather(dict(stats, client=world.client, n=n_k))
        _flush_ledger(world, ledger, run_dir, r)
        if world.is_federator:
            rows = [s for s in client_stats if s["client"] >= 0]
            losses = [s.get("loss", float("nan")) for s in rows]
            round_bytes = ledger.round_bytes(r)
            t_train = max((s.get("train_s", 0.0) for s in rows), default=0.0)
            row = dict(kind="round", round=r, method=method, loss=float(np.nanmean(losses)),
                       client_loss=losses, train_s=t_train, wait_s=t_wait, agg_s=t_agg, eval_s=t_eval,
                       ckpt_s=t_ckpt, round_s=time.perf_counter() - t_round,
                       bytes=round_bytes, images_per_s=[s.get("images_per_s") for s in rows])
            if scores:
                row.update(scores)
            metrics.write(**row)
            for s in rows:
                metrics.write(kind="client", round=r, **s)
            score_txt = _score_text(scores)
            log(f"[round {r}/{R}] loss {row['loss']:.4f} (clients {min(losses):.4f}.."
                f"{max(losses):.4f}) | train {t_train:.1f}s agg {t_agg:.2f}s eval {t_eval:.1f}s "
                f"ckpt {t_ckpt:.1f}s | {round_bytes / 1e6:.2f} MB{score_txt}")
        world.barrier()

    summary = {}
    if world.is_federator:
        from .ledger import write_summary
        summary = write_summary(run_dir, method, K, R, sizes, cfg.run.seed)
        moved = summary["measured"]["moved"]
        log(f"done: moved {moved['params']:,} parameters ({moved['bytes'] / 1e6:.1f} MB), "
            f"{100 * summary['moved']['reduction_vs_full']:.1f}% less than FULL would; "
            f"ledger matches the analytical table: {summary['matches_analytical']}")
    if evaluator is not None:
        evaluator.close()
    return summary


def _score_text(scores: Optional[dict]) -> str:
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


def latest_complete_bcast(world, run_dir: Path):
    return world.bcast_obj(latest_complete(run_dir) if world.is_federator else None)


def _flush_ledger(world, ledger: Ledger, run_dir: Path, round_index: int) -> None:
    """Gather this round's ledger rows from every rank and append them to comm.csv."""
    mine = [r for r in ledger.dicts() if r["round"] == round_index]
    gathered = world.gather(mine)
    if world.is_federator:
        append_rows([row for rows in gathered for row in rows], run_dir / "comm.csv")


def _truncate_logs(run_dir: Path, last_round: int) -> None:
    """Drop rows of rounds after `last_round` (they are replayed after a resume)."""
    import json
    from .ledger import read_csv, write_csv
    comm = run_dir / "comm.csv"
    if comm.exists():
        write_csv([r for r in read_csv(comm) if r["round"] <= last_round], comm)
        if last_round == 0:
            comm.unlink()
    p = run_dir / "metrics.jsonl"
    if p.exists():
        keep = [line for line in p.read_text().splitlines()
                if line.strip() and json.loads(line).get("round", 0) <= last_round]
        p.write_text("".join(line + "\n" for line in keep))
    p = run_dir / "eval.csv"
    if p.exists():
        import csv
        with p.open() as f:
            rows = list(csv.DictReader(f))
        p.unlink()
        if rows:
            from .metrics import append_csv
            append_csv(p, [r for r in rows if int(r["round"]) <= last_round])
