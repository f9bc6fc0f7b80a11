"""The recipe pieces that make short runs sample well (all off by default, and off in the
paper configs); `LocalTrainer` (trainer.py) applies them.

- `LRSchedule` (`train.warmup_steps`, `train.lr_schedule`, `train.lr_min`): the learning
  rate as a pure function of the optimizer step counted over the whole run, so a
  resumed run, a preempted round replayed, and every client agree on it.
  `schedule_for` builds it from a config, None when the rate is constant.
- `EMA` (`train.ema_decay`): an exponential moving average of the weights, used for
  sampling and scoring only; the raw weights are what is trained and communicated.
  `ema_applied` swaps the average into a model for the length of a `with` block.
Gradient clipping (`train.grad_clip`) lives in `LocalTrainer.run`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate at optimizer step `step` (0-based, counted over the whole run):
    a linear warm-up from lr / warmup to lr over the first `warmup` steps, then constant
    (kind "constant") or a half cosine from lr down to `lr_min` at step `total` (kind
    "cosine"; lr_min after that)."""

    lr: float
    warmup: int = 0
    kind: str = "constant"
    total: int = 0
    lr_min: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "cosine" and self.total > self.warmup:
            progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
            return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * progress))
        return self.lr

    @property
    def active(self) -> bool:
        """False when the rate is always `lr` (the trainer then never touches it)."""
        return self.warmup > 0 or self.kind != "constant"

    @classmethod
    def from_config(cls, train_cfg, total_steps: int) -> LRSchedule:
        return cls(
            train_cfg.lr,
            train_cfg.warmup_steps,
            train_cfg.lr_schedule,
            int(total_steps),
            train_cfg.lr_min,
        )


class EMA:
    """Exponential moving average of a model's floating-point weights (`train.ema_decay`).

    After an update standing for `steps` optimizer steps the average becomes
    ema = d * ema + (1 - d) * theta, with d the product over those steps of
    min(decay, (1 + n) / (10 + n)), n counting the steps averaged so far: the usual
    warm-up, so that early on the average follows the weights instead of remembering the
    random initialization. The average lives in float32 buffers of its own; it is never
    trained and never communicated. `state_dict()` holds tensors and numbers only
    (checkpoints are read with torch.load(weights_only=True)).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) for an EMA, got {decay}")
        self.decay = float(decay)
        self.updates = 0  # optimizer steps averaged so far (n above)
        self.shadow = {
            name: t.detach().clone().float()
            for name, t in model.state_dict().items()
            if t.is_floating_point()
        }
        self._backup: dict | None = None

    def decay_for(self, steps: int = 1) -> float:
        d = 1.0
        for n in range(self.updates, self.updates + steps):
            d *= min(self.decay, (1 + n) / (10 + n))
        return d

    @torch.no_grad()
    def update(self, model: torch.nn.Module, steps: int = 1) -> None:
        """Fold the model's current weights in, as the average after `steps` more steps."""
        if steps <= 0:
            return
        weight = 1.0 - self.decay_for(steps)
        current = model.state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[k] for k in names], [current[k].float() for k in names], weight
        )
        self.updates += steps

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module) -> None:
        """Restart the average at the model's weights (n kept)."""
        current = model.state_dict()
        for k, t in self.shadow.items():
            t.copy_(current[k])

    @torch.no_grad()
    def mark(self) -> None:
        """Remember the average (a round's start; buffers allocated once)."""
        if not hasattr(self, "_mark"):
            self._mark = {k: t.clone() for k, t in self.shadow.items()}
        for k, t in self.shadow.items():
            self._mark[k].copy_(t)
        self._mark_updates = self.updates

    @torch.no_grad()
    def rollback(self) -> None:
        """Back to the last `mark()` (an abandoned or skipped round)."""
        for k, t in self.shadow.items():
            t.copy_(self._mark[k])
        self.updates = self._mark_updates

    def applied(self, model: torch.nn.Module):
        """Context manager: the model holds the averaged weights inside, its own after
        (copies in place, so weights bound to flat communication buffers stay bound)."""
        return _Swap(self, model)

    def to(self, device: torch.device) -> EMA:
        """The average on `device` (the model's: LocalTrainer moves both)."""
        self.shadow = {k: t.to(device) for k, t in self.shadow.items()}
        for name in ("_mark", "_backup"):
            kept = getattr(self, name, None)
            if kept is not None:
                setattr(self, name, {k: t.to(device) for k, t in kept.items()})
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the checkpoint's EMA does not fit this model")
        for k, t in state["shadow"].items():
            self.shadow[k].copy_(t)
        self.updates = int(state["updates"])


def ema_applied(ema: EMA | None, model: torch.nn.Module):
    """`ema.applied(model)`, or the model as it is when there is no EMA."""
    import contextlib

    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


def schedule_for(train_cfg, total_steps: int) -> LRSchedule | None:
    """The run's LRSchedule over `total_steps` optimizer steps, None when the rate is
    constant (the trainer then leaves the optimizer's rate alone)."""
    schedule = LRSchedule.from_config(train_cfg, total_steps)
    return schedule if schedule.active else None


class _Swap:
    def __init__(self, ema: EMA, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self):
        current = self.model.state_dict()
        if self.ema._backup is None:  # allocated once, reused at every evaluation
            self.ema._backup = {k: current[k].detach().clone() for k in self.ema.shadow}
        with torch.no_grad():
            for k, t in self.ema.shadow.items():
                self.ema._backup[k].copy_(current[k])
                current[k].copy_(t)
        return self.model

    def __exit__(self, *exc):
        current = self.model.state_dict()
        with torch.no_grad():
            for k in self.ema.shadow:
                current[k].copy_(self.ema._backup[k])
        return False
