"""Entry point: `python -m fedmpi.train --config CONFIG [--resume RUN_DIR] [--section.key=value ...]`.

Without an MPI launcher (or with a world of one rank) this trains the centralized
"datacenter" baseline on the whole training set; under `mpirun -n K+1` it runs the
federated job (rank 0 federator, ranks 1..K clients). Both use the same
`LocalTrainer`. main() always tears down: user errors exit 2 on every rank, an
unexpected exception on any rank aborts the whole MPI job (no rank left hanging), and
a preemption signal exits 75 after a checkpoint so that a requeue resumes.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

import torch

from fedmpi.config import Config, ConfigError, from_dict, load_config
from fedmpi.config.describe import describe_config
from fedmpi.data import DataError, load_arrays
from fedmpi.errors import EXIT_USER_ERROR
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.regions import finite
from fedmpi.model.summary import model_shape
from fedmpi.model.unet import build_unet
from fedmpi.runtime import derive_seed, pick_device
from fedmpi.store.atomic import EXIT_DISK, DiskError
from fedmpi.store.checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_dir,
    load_checkpoint,
    mark_complete,
    new_run_dir,
    newest_verified,
    save_config,
)
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import JsonlWriter
from fedmpi.train.loop import STOP_FILE, NonFiniteError, Preempted, PreemptFlag
from fedmpi.train.progress import Progress
from fedmpi.train.trainer import EMA, LocalTrainer, ema_applied, schedule_for


def run_centralized(
    cfg: Config, run_dir: Path, resume: bool = False, log=print, evaluator_factory=None
) -> dict:
    """The datacenter baseline: one model, the whole training set, cfg.train.epochs epochs."""
    device = pick_device(cfg.run.device)
    images, _ = load_arrays(cfg.data, "train")
    channels, size = model_shape(cfg)
    torch.manual_seed(derive_seed(cfg.run.seed, 0xC0FFEE))
    model = build_unet(cfg.model, channels, size).to(device)
    diffusion = Diffusion.from_config(cfg.diffusion)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    trainer = LocalTrainer(
        model,
        diffusion,
        images,
        cfg.train.batch_size,
        cfg.train.lr,
        device,
        ema=ema,
        grad_clip=cfg.train.grad_clip,
    )
    trainer.speed_from(cfg.train)
    trainer.new_optimizer()
    metrics = JsonlWriter(run_dir / "metrics.jsonl")
    evaluator = evaluator_factory(cfg, None, run_dir, device) if evaluator_factory else None

    start, step = 1, 0
    if resume and (done := newest_verified(run_dir, warn=log)) is not None:
        ckpt = load_checkpoint(checkpoint_dir(run_dir, done) / "model.pt", device)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise ConfigError(
                f"cannot resume {run_dir}: its checkpoint does not fit this model "
                f"(model.* changed?): {detail}"
            ) from None
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.load_scaler_state(ckpt.get("scaler"))  # fp16: the loss scale goes on
        if ema is not None:
            if ckpt.get("ema") is None:
                raise ConfigError(
                    f"cannot resume {run_dir}: its checkpoint holds no EMA weights "
                    f"but train.ema_decay is {ema.decay}; resume with "
                    f"--train.ema_decay=0 (as the run was started)"
                )
            ema.load_state_dict(ckpt["ema"])
        start, step = done + 1, ckpt["step"]
        RunFolder(run_dir).truncate(done, "epoch")
        log(f"resume: continuing after epoch {done}")
    epochs = cfg.train.epochs
    steps_per_epoch = trainer.steps_per_epoch()
    if cfg.train.max_steps:
        epochs = min(epochs, -(-cfg.train.max_steps // steps_per_epoch))
    total_steps = min(epochs * steps_per_epoch, cfg.train.max_steps or epochs * steps_per_epoch)
    trainer.schedule = schedule_for(cfg.train, total_steps)
    log(
        f"fedmpi centralized: {len(images)} images | {epochs} epochs x {steps_per_epoch} steps "
        f"| device {device} | run {run_dir}"
    )

    def state(epoch: int) -> dict:
        obj = {
            "epoch": epoch,
            "step": step,
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "config": cfg.to_dict(),
            "rng": torch.get_rng_state(),
            "scaler": trainer.scaler_state(),
        }
        if ema is not None:
            obj["ema"] = ema.state_dict()
        return obj

    def save(obj: dict) -> None:
        if not finite(*[v for v in obj["model"].values() if v.is_floating_point()]):
            raise NonFiniteError(
                f"epoch {obj['epoch']}: the model is not finite (NaN / inf: "
                f"diverged? lower train.lr); checkpoint not written, "
                f"earlier checkpoints kept",
                collective=False,
            )
        digest = atomic_save(obj, checkpoint_dir(run_dir, obj["epoch"]) / "model.pt")
        mark_complete(run_dir, obj["epoch"], cfg.checkpoint.keep, {"model.pt": digest})

    # SIGUSR1, SIGTERM or RUN_DIR/PREEMPT (slurm/run.sh at the time limit) as in a federated
    # job: the epoch under way is abandoned, the last complete one checkpointed, exit 75.
    preempt = PreemptFlag(Path(run_dir) / STOP_FILE, announce=True)
    saved = start - 1  # the newest epoch whose checkpoint is on disk (0: none)
    try:
        for epoch in range(start, epochs + 1):
            t0 = time.perf_counter()
            # the state after epoch - 1, kept in memory while it is not on disk
            kept = copy.deepcopy(state(epoch - 1)) if saved < epoch - 1 else None
            preempt.note = (
                f"checkpoint of epoch {saved}: --resume {run_dir}"
                if saved
                else "no checkpoint has been written yet"
            )
            steps = steps_per_epoch
            if cfg.train.max_steps:
                steps = min(steps, cfg.train.max_steps - step)
            bar = Progress(steps, f"epoch {epoch}/{epochs}", log)
            window = []
            t_epoch = time.perf_counter()

            def on_step(i, loss):
                if preempt.requested:
                    raise _StopRequest
                window.append(loss)
                rate = (i + 1) * cfg.train.batch_size / max(time.perf_counter() - t_epoch, 1e-9)
                bar.update(i + 1, f"{rate:.0f} img/s")
                if (step + i + 1) % cfg.train.log_every == 0:
                    metrics.write(
                        kind="step",
                        epoch=epoch,
                        step=step + i + 1,
                        loss=float(torch.stack(window).mean()),
                    )
                    window.clear()

            if cfg.train.reset_optimizer_every_epoch:
                trainer.reset_optimizer()
            try:
                stats = trainer.run(
                    seed=derive_seed(cfg.run.seed, epoch),
                    steps=steps,
                    on_step=on_step,
                    start_step=step,
                )
            except _StopRequest:
                bar.close()
                if kept is not None:
                    save(kept)
                    saved = epoch - 1
                why = f" ({preempt.signal_name})" if preempt.signal_name else ""
                log(
                    f"preempted{why}: epoch {epoch} abandoned; "
                    + (
                        f"checkpoint of epoch {saved} kept; resume with --resume {run_dir} "
                        f"(continues after epoch {saved})"
                        if saved
                        else f"no epoch was complete: --resume {run_dir} starts from the beginning"
                    )
                )
                raise Preempted(saved) from None
            bar.close()
            step += stats["steps"]
            t_eval = time.perf_counter()
            scores = {}
            last = epoch == epochs
            if evaluator is not None and ((cfg.eval.every and epoch % cfg.eval.every == 0) or last):
                with ema_applied(ema, model):  # train.ema_decay: sample from the average
                    scores = evaluator.run(epoch, model, personal=False) or {}
            t_eval = time.perf_counter() - t_eval
            if (cfg.checkpoint.every and epoch % cfg.checkpoint.every == 0) or last:
                save(state(epoch))
                saved = epoch
            metrics.write(
                kind="epoch",
                epoch=epoch,
                step=step,
                loss=stats["loss"],
                images_per_s=stats["images_per_s"],
                train_s=stats["train_s"],
                eval_s=t_eval,
                epoch_s=time.perf_counter() - t0,
                **scores,
            )
            score_txt = "".join(
                f" | {k} {v:.2f}" for k, v in scores.items() if isinstance(v, float)
            )
            log(
                f"[epoch {epoch}/{epochs}] step {step} loss {stats['loss']:.4f} | "
                f"{stats['images_per_s']:.0f} img/s | {time.perf_counter() - t0:.1f}s{score_txt}"
            )
    finally:
        preempt.restore()
    grids = sorted((Path(run_dir) / "samples").glob(f"round_{epochs:04d}*.png"))
    log((f"samples: {grids[0]} | " if grids else "") + f"run folder: {run_dir}")
    return {"loss": stats["loss"] if epochs >= start else None, "run_dir": str(run_dir)}


class _StopRequest(Exception):
    """A checkpoint-and-stop request seen at a step of the centralized baseline."""


def _evaluator_factory(cfg: Config):
    if cfg.eval.extractor == "none" and not cfg.eval.grid:
        return None
    from fedmpi.eval.evaluate import Evaluator

    return Evaluator


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.train",
        description=__doc__.split("\n\n")[0],
        epilog="Any config key can be overridden as --section.key=value (e.g. --train.lr=2e-4 "
        "--fed.rounds=30). --print-config lists every key with its value and meaning.",
    )
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument(
        "--run-dir",
        metavar="RUN_DIR",
        help="use this run folder (created if missing; resumed if it has checkpoints)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (--config, or the run's, plus overrides; "
        "defaults without either) as YAML with a comment for every key, and exit",
    )
    return p.parse_known_args(argv)


def _check_eval(cfg: Config) -> None:
    """Missing Inception weights are a user error, reported before any work."""
    if cfg.eval.extractor == "inception":
        from fedmpi.eval.extractors import MissingWeightsError, check_inception_weights

        try:
            check_inception_weights(cfg.eval)
        except MissingWeightsError as e:
            raise ConfigError(str(e)) from None


def _prepare(args, overrides, is_root: bool) -> tuple[Config, Path, bool]:
    """Load the config and pick the run folder; raises ConfigError on bad input."""
    resume_dir = args.resume or args.run_dir
    if args.resume and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: no such run folder")
    if resume_dir and (Path(resume_dir) / "config.yaml").is_file():
        cfg = load_config(args.config or Path(resume_dir) / "config.yaml", overrides)
        _check_eval(cfg)
        return cfg, Path(resume_dir), True
    if args.config is None:
        raise ConfigError("give --config CONFIG (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
    cfg = load_config(args.config, overrides)
    _check_eval(cfg)
    if resume_dir:
        run_dir = Path(resume_dir)
        if is_root:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        return cfg, run_dir, False
    return cfg, None, False


def main(argv: list[str] | None = None) -> int:
    from fedmpi.dist.world import launched_by_mpi

    args, overrides = parse_args(argv)
    if args.print_config:
        try:
            source = args.config or (
                Path(args.resume or args.run_dir) / "config.yaml"
                if (args.resume or args.run_dir)
                else None
            )
            print(describe_config(load_config(source, overrides)), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    world = None
    if launched_by_mpi():
        from fedmpi.dist.world import World

        world = World()
    rank = world.rank if world else 0
    distributed = world is not None and world.size > 1

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    try:
        # Rank 0 alone decides (config, run folder, resume) and tells the others, so
        # that no rank can see a folder another rank is creating at the same moment.
        decision, error = None, None
        if rank == 0:
            try:
                cfg, run_dir, resume = _prepare(args, overrides, True)
                if distributed and run_dir is None:
                    run_dir = new_run_dir(cfg)
                if run_dir is not None:  # a stop request served by an earlier start
                    (Path(run_dir) / "PREEMPT").unlink(missing_ok=True)
                decision = (cfg.to_dict(), str(run_dir) if run_dir else None, resume)
            except (ConfigError, DataError) as e:
                error = str(e)
        if distributed:
            decision, error = world.bcast_obj((decision, error))
        if error:
            log(f"error: {error}")
            return EXIT_USER_ERROR
        cfg = from_dict(decision[0], "<resolved>")
        run_dir = Path(decision[1]) if decision[1] else None
        resume = decision[2]
        if distributed:
            from fedmpi.dist.world import World

            world.backend_name = cfg.fed.backend
            from fedmpi.train.loop import run_federated

            run_federated(
                cfg,
                world,
                run_dir,
                resume=resume,
                log=log,
                evaluator_factory=_evaluator_factory(cfg),
            )
        else:
            run_dir = run_dir or new_run_dir(cfg)
            run_centralized(
                cfg, run_dir, resume=resume, log=log, evaluator_factory=_evaluator_factory(cfg)
            )
        return 0
    except Exception as e:
        from fedmpi.errors import EXIT_STALLED, StallError
        from fedmpi.train.loop import JobStop

        if isinstance(e, JobStop) and e.collective:
            return e.exit_code  # every rank got here together; the federator said why
        if isinstance(e, JobStop):
            print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
            code = e.exit_code
        elif isinstance(e, (ConfigError, DataError, CheckpointError)):
            print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
            code = EXIT_USER_ERROR
        elif isinstance(e, DiskError):
            print(
                f"[rank {rank}] error: {e}; earlier checkpoints are intact",
                file=sys.stderr,
                flush=True,
            )
            code = EXIT_DISK
        elif isinstance(e, StallError):
            print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
            code = EXIT_STALLED
        else:
            print(f"[rank {rank}] unhandled error, stopping the job:", file=sys.stderr)
            traceback.print_exc()
            code = 1
        if distributed:
            world.abort(code)  # the other ranks may be inside a collective: take them down
        return code
    except KeyboardInterrupt:
        if distributed:
            world.abort(130)
        return 130
    finally:
        if world is not None:
            world.close()


if __name__ == "__main__":
    sys.exit(main())
