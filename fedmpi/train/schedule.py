"""How a job counts its rounds: how many, how many optimizer steps each, which seeds."""

from __future__ import annotations

from dataclasses import dataclass

from fedmpi.config import Config
from fedmpi.runtime import derive_seed
from fedmpi.train.trainer import LocalTrainer


@dataclass(frozen=True)
class Schedule:
    """How a job counts its rounds. Federated: fed.rounds rounds of fed.local_epochs epochs
    (or fed.local_steps steps) per client, seeds (run seed, round, client). The baseline:
    train.epochs rounds of one epoch (train.max_steps steps at most), seeds (run seed,
    epoch), Adam re-created every epoch when train.reset_optimizer_every_epoch (the
    reference's form), and the unit called "epoch"."""

    solo: bool
    rounds: int
    per_round: int  # optimizer steps of a full round (0 on the federator)
    max_steps: int | None = None

    @property
    def unit(self) -> str:
        return "epoch" if self.solo else "round"

    @classmethod
    def of(cls, cfg: Config, world, trainer: LocalTrainer | None) -> Schedule:
        if world.size > 1:
            per = trainer.steps_for(cfg.fed.local_epochs, cfg.fed.local_steps) if trainer else 0
            return cls(False, cfg.fed.rounds, per)
        per, cap = trainer.steps_per_epoch(), cfg.train.max_steps
        rounds = min(cfg.train.epochs, -(-cap // per)) if cap else cfg.train.epochs
        return cls(True, rounds, per, cap)

    def steps(self, r: int) -> int:
        """Optimizer steps of round `r`."""
        if self.max_steps:
            return min(self.per_round, self.max_steps - (r - 1) * self.per_round)
        return self.per_round

    def total_steps(self) -> int:
        return sum(self.steps(r) for r in range(1, self.rounds + 1))

    def seed(self, cfg: Config, r: int, client: int) -> int:
        return derive_seed(cfg.run.seed, r) if self.solo else derive_seed(cfg.run.seed, r, client)

    def reset_optimizer(self, cfg: Config) -> bool:
        return cfg.train.reset_optimizer_every_epoch if self.solo else cfg.fed.reset_optimizer

    def client_steps(self, cfg: Config, r: int, images: int) -> int:
        """Optimizer steps of a client of `images` images in round `r` (its data decides
        with local epochs; the baseline: the epoch's)."""
        if self.solo:
            return self.steps(r)
        f = cfg.fed
        if f.local_steps is not None:
            return f.local_steps
        return f.local_epochs * -(-images // cfg.train.batch_size)
