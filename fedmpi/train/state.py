"""What a rank keeps and saves: its round-start copy, its checkpoint file, and resuming.

A checkpoint folder holds one file per rank, each with what that rank alone owns: the
federator's `federator.pt` the global model (and the global model's EMA); a client's
`client_NNN.pt` its personal regions (UDEC / ULATDEC), optimizer and loss-scale state (and
its own EMA); the one process of the centralized baseline its `model.pt`, everything.
"""

from __future__ import annotations

import torch

from fedmpi.config import Config, ConfigError, from_dict
from fedmpi.errors import CheckpointError
from fedmpi.fl.methods import personal_regions
from fedmpi.model.regions import REGIONS
from fedmpi.store.checkpoint import client_state, load_checkpoint
from fedmpi.store.runfolder import FEDERATOR_FILE, MODEL_FILE, RunFolder, client_file

# What a resumed job may set differently from the run it continues: settings that cannot
# change the trained weights (rounds to add, evaluation, logging, progress, output, where
# the data and the job live). Everything else must be as the checkpoint's config says.
RESUME_MAY_CHANGE = (
    "eval.",
    "checkpoint.",
    "run.out_dir",
    "run.name",
    "run.device",
    "run.progress_every",
    "train.log_every",
    "fed.rounds",
    "fed.round_timeout",
    "train.epochs",
    "train.max_steps",
    "data.root",
    "data.download",
)


class RoundStart:
    """A trainer's weights (and its Adam state, when kept across rounds) at the start of a
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


def file_name(world) -> str:
    """This rank's file in a checkpoint folder."""
    if world.size == 1:
        return MODEL_FILE
    return FEDERATOR_FILE if world.is_federator else client_file(world.client + 1)


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


def shared_entries(model: torch.nn.Module, method: str) -> dict:
    """Copies of the state-dict entries a client shares (all but `own_entries`)."""
    own = own_entries(model, method)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in own}


def rank_state(cfg: Config, world, index: int, model, trainer, ema, steps: int) -> dict:
    """This rank's checkpoint contents after round (epoch) `index`."""
    if world.size == 1:
        obj = {
            "epoch": index,
            "step": steps,
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "config": cfg.to_dict(),
            "rng": torch.get_rng_state(),
            "scaler": trainer.scaler_state(),
        }
    elif world.is_federator:
        obj = {
            "round": index,
            "clients": world.num_clients,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
        }
    else:
        keep = trainer.optimizer is not None and not cfg.fed.reset_optimizer
        # Only what is this client's own: its personal regions (UDEC / ULATDEC). The
        # shared regions equal the federator's after the exchange and are stored once,
        # in federator.pt (FULL / USPLIT clients write no weights at all).
        obj = {
            "round": index,
            "client": world.rank,
            "model": own_entries(model, cfg.fed.method),
            "optimizer": trainer.optimizer.state_dict() if keep else None,
            "scaler": trainer.scaler_state(),
        }
    # the global model's EMA (FULL, USPLIT) is the same on every rank: stored once, by
    # the federator; a trainer's own EMA (personal models, the baseline) by that trainer
    if ema is not None and (world.is_federator or personal_regions(cfg.fed.method)):
        obj["ema"] = ema.state_dict()
    return obj


def add_job_state(obj: dict, job) -> dict:
    """What a rank keeps beyond its model: a client rank's clients' personal regions
    (several clients per rank), its shared regions before the round's averaging
    (`local_model`, eval.personal=local: the model fedmpi.evaluate re-scores), and
    error-feedback residuals (fed.compress); the federator's server-optimizer moments."""
    local = getattr(job, "local_model", None)
    if local is not None and local[0] == obj.get("round"):
        obj["local_model"] = local[1]
    pool = getattr(job, "pool", None)
    if pool is not None and pool.states is not None:
        obj["client_states"] = pool.states.state_dict()
    opt = server_optimizer(job)
    if opt is not None and job.world.is_federator:
        obj["server_opt"] = opt.state_dict()
    feedback = error_feedback(job)
    if feedback is not None and not job.world.is_federator:
        obj["error_feedback"] = feedback.state_dict()
    return obj


def error_feedback(job):
    """The job's compressed strategy when it keeps error-feedback residuals, else None."""
    from fedmpi.fl.compress import CompressedFedAvg

    agg = getattr(job, "aggregator", None)
    compressed = agg.strategy.find(CompressedFedAvg) if agg is not None else None
    return compressed if compressed is not None and compressed.feedback is not None else None


def server_optimizer(job):
    """The job's server optimizer (fed.server_opt), else None."""
    from fedmpi.fl.strategy import ServerOptimized

    agg = getattr(job, "aggregator", None)
    wrapper = agg.strategy.find(ServerOptimized) if agg is not None else None
    return wrapper.optimizer if wrapper is not None else None


def collect_client_states(job) -> None:
    """A client rank with several clients, after writing a checkpoint: delete the state
    files of its clients that no checkpoint on disk (nor the current index) refers to."""
    pool = getattr(job, "pool", None)
    if pool is None or pool.states is None:
        return
    name, seen = file_name(job.world), pool.states.checkpoint_indexes
    try:
        dirs = {d.name: d for d in (job.run_dir.path / "checkpoints").glob("round_*")}
        for gone in set(seen) - set(dirs):
            del seen[gone]
        for key, d in dirs.items():
            if key not in seen:  # a checkpoint's file never changes: read it once
                try:
                    seen[key] = load_checkpoint(d / name).get("client_states") or {}
                except CheckpointError:  # being pruned, or never finished: keeps nothing
                    continue
        pool.states.collect(list(seen.values()))
    except OSError as e:  # a clean-up that failed leaves files behind, nothing worse
        job.log(f"warning: rank {job.world.rank}: could not remove old client states: {e}")


def restore_job_state(job, index: int) -> None:
    """Load `add_job_state`'s part of checkpoint `index` (after the aggregator exists)."""
    world = job.world
    pool = getattr(job, "pool", None)
    opt = server_optimizer(job)
    wants_clients = pool is not None and pool.states is not None
    feedback = error_feedback(job) if not world.is_federator else None
    if not (wants_clients or feedback is not None or (opt is not None and world.is_federator)):
        return
    path = job.run_dir.checkpoint_dir(index) / file_name(world)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    if wants_clients:
        pool.states.load_state_dict(ckpt.get("client_states") or {})
    if feedback is not None:
        if "error_feedback" not in ckpt:
            raise CheckpointError(f"{path} holds no error-feedback residuals (fed.compress)")
        feedback.load_state_dict(ckpt["error_feedback"])
    if opt is not None and world.is_federator:
        if ckpt.get("server_opt") is None:
            raise CheckpointError(f"{path} holds no server-optimizer state (fed.server_opt)")
        opt.load_state_dict(ckpt["server_opt"])


def restore(world, run: RunFolder, index: int, model, trainer, device, ema=None) -> None:
    """Load this rank's state of checkpoint `index` into the model, trainer and EMA."""
    d = run.checkpoint_dir(index)
    name = file_name(world)
    if world.trains and not world.is_federator:
        state, ckpt = client_state(d, name, device)
    else:
        ckpt = load_checkpoint(d / name, device)
        state = ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"cannot resume {run}: its checkpoint does not fit this model (model.* changed?): "
            f"{detail}"
        ) from None
    if ema is not None:
        if trainer is not None and trainer.ema is None:  # a global model's EMA: federator.pt
            name, ckpt = FEDERATOR_FILE, load_checkpoint(d / FEDERATOR_FILE, device)
        if ckpt.get("ema") is None:
            raise CheckpointError(
                f"{d / name} holds no EMA weights but train.ema_decay is {ema.decay}: resume "
                f"with --train.ema_decay=0 (as the run was started)"
            )
        ema.load_state_dict(ckpt["ema"])
    if trainer is not None and ckpt.get("optimizer") is not None:
        trainer.new_optimizer().load_state_dict(ckpt["optimizer"])
    if trainer is not None:
        trainer.load_scaler_state(ckpt.get("scaler"))  # fp16: the loss scale goes on


def changed_settings(old: Config, new: Config, baseline: bool = False) -> list[str]:
    """The settings of `new` that differ from the checkpoint's `old` and could change the
    trained weights (the baseline has no federation and no split: fed.* and split.* are
    not its settings)."""
    may_change = RESUME_MAY_CHANGE + (("fed.", "split.") if baseline else ())
    a, b = old.dotted(), new.dotted()
    return [
        f"{key} is {a.get(key)!r} in the checkpoint but {b[key]!r} now"
        for key in b
        if a.get(key) != b[key] and not key.startswith(may_change)
    ]


def resume_mismatch(cfg: Config, saved: dict, saved_clients: int | None, world_size: int, run):
    """Why `cfg` on `world_size` ranks cannot continue a checkpoint, or None."""
    problems = []
    if saved_clients is not None and saved_clients != world_size - 1:
        problems.append(
            f"it was run with K={saved_clients} clients (world size "
            f"{saved_clients + 1}) and this job has {world_size} ranks: launch it "
            f"with mpirun -n {saved_clients + 1} ... --resume {run}"
        )
    try:
        old = from_dict(saved, "<checkpoint config>")
    except ConfigError:
        old = None
    if old is not None:
        problems += changed_settings(old, cfg, baseline=world_size == 1)
    if not problems:
        return None
    return (
        f"cannot resume {run}: "
        + "; ".join(problems)
        + ". Only rounds to add (fed.rounds, train.epochs), evaluation (eval.*), checkpointing, "
        "logging, progress and output settings may differ: resume with the run's settings "
        "(drop the overrides), or start a new run."
    )


def resume_decision(cfg: Config, world, run: RunFolder, log) -> tuple[int | None, str | None]:
    """On the federator: the newest complete checkpoint whose files verify and fit this
    job (falling back past corrupt ones), or an error message."""
    index = run.newest_verified(warn=log)
    if index is None and run.complete_checkpoints():
        return None, (
            f"cannot resume {run}: none of its {len(run.complete_checkpoints())} checkpoints "
            f"verifies (see the warnings above); nothing in the folder was changed. Restore "
            f"the checkpoint files, or start a new run in another folder"
        )
    if index is None:
        return None, None
    try:
        ckpt = load_checkpoint(run.checkpoint_dir(index) / file_name(world))
    except CheckpointError as e:
        return None, str(e)
    clients = None
    if world.size > 1:
        names = [n for n in run.marker_files(index) if n.startswith("client_")] or [
            p.name for p in run.checkpoint_dir(index).glob("client_*.pt")
        ]
        clients = int(ckpt.get("clients", len(names)))
    return index, resume_mismatch(cfg, ckpt.get("config") or {}, clients, world.size, run)
