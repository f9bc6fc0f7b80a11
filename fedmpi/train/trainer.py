"""The local training loop, shared by the centralized baseline and every federated client.

A `LocalTrainer` owns one model's optimization on one dataset held in memory (the
whole shard lives on the training device as uint8 and is scaled per batch, so there
is no DataLoader worker overhead). Randomness (shuffling, timesteps, noise) comes from
generators seeded from (run seed, round or epoch, client), never from global state, so
a resumed run replays exactly the same batches as an uninterrupted one.

It also owns the recipe pieces that make short runs sample well (all off by default,
and off in the paper configs):

- gradient clipping (`train.grad_clip`, in `LocalTrainer.run`): what makes a high
  learning rate safe.
- `LRSchedule` (`train.warmup_steps`, `train.lr_schedule`, `train.lr_min`): the learning
  rate as a pure function of the optimizer step counted over the whole run, so a
  resumed run, a preempted round replayed, and every client agree on it.
- `EMA` (`train.ema_decay`): an exponential moving average of the weights, used for
  sampling and scoring only; the raw weights are what is trained and communicated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.model.diffusion import Diffusion
from fedmpi.model.unet import compile_unet, cudagraph_step
from fedmpi.runtime import autocast_for


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


class LocalTrainer:
    """Mini-batch epsilon-prediction training of `model` on uint8 images (N, C, H, W).

    `schedule` (an `LRSchedule`): the learning rate of each step, looked up at the step's
    run-wide index (`run(start_step=...)`). `ema` (an `EMA`): updated after every
    optimizer step when given. `grad_clip` (`train.grad_clip`, 0: off): each step's
    gradient is scaled to L2 norm at most this before Adam sees it (what lets the
    quickstart train at a high learning rate without its early spikes)."""

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: Diffusion,
        images: np.ndarray,
        batch_size: int,
        lr: float,
        device: torch.device,
        schedule: LRSchedule | None = None,
        ema: EMA | None = None,
        grad_clip: float = 0.0,
    ):
        if len(images) == 0:
            raise ValueError("this client has no training images")
        self.model = model.to(device)
        self.diffusion = diffusion
        self.device = device
        self.batch_size = batch_size
        self.lr = lr
        self.schedule = schedule if schedule is not None and schedule.active else None
        self.ema = ema.to(device) if ema is not None else None
        self.grad_clip = float(grad_clip)
        # what set_speed changes: fp32, no gradient scaler, the eager model
        self.precision, self.scaler, self.net = "fp32", None, self.model
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def new_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # The fused kernel: one pass over all parameters (3.6 ms per step for the
        # quickstart UNet on one CPU core against 14-20 ms for the per-tensor loop).
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(params, lr=self.lr, fused=fused or None)
        return self.optimizer

    def set_speed(
        self,
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool = False,
        compile_mode: str = "default",
    ) -> None:
        """Mixed precision for the forward / backward pass (`bf16`, `fp16` with a gradient
        scaler), torch.compile of the UNet and channels-last activations. The weights, the
        optimizer state and every communicated region stay float32 in their own layout;
        only activations are computed in low precision / stored NHWC."""
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision '{precision}' (fp32 | bf16 | fp16)")
        if hasattr(self.model, "channels_last"):
            self.model.channels_last = channels_last
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.net = compile_unet(self.model, compile_mode) if compile else self.model

    def speed_from(self, train_cfg) -> None:
        """`set_speed` from a config's train section (precision, compile, channels_last,
        compile_mode)."""
        self.set_speed(
            train_cfg.precision, train_cfg.compile, train_cfg.channels_last, train_cfg.compile_mode
        )

    def scaler_state(self) -> dict | None:
        """fp16's loss scale and its growth count (None for bf16 / fp32): part of the
        state a resumed or rolled-back run must continue from."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        """Continue from `scaler_state()` (nothing to do without fp16 or a saved state)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def autocast(self):
        """The autocast context of this trainer's precision (a no-op for fp32)."""
        return autocast_for(self.precision, self.device)

    def reset_optimizer(self) -> torch.optim.Optimizer:
        """Adam as if newly created (moments and step zeroed), in place: the same numbers
        as a new optimizer without allocating its state again every round."""
        if self.optimizer is None:
            return self.new_optimizer()
        tensors = [
            v
            for state in self.optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v)
        ]
        if tensors:
            with torch.no_grad():
                torch._foreach_zero_(tensors)  # one call for every moment and step count
        return self.optimizer

    def _batches(
        self, epochs: int | None, steps: int | None, gen: torch.Generator
    ) -> Iterable[torch.Tensor]:
        """Shuffled index batches: `steps` batches if given, else `epochs` full passes."""
        total = steps if steps is not None else epochs * self.steps_per_epoch()
        done = 0
        while done < total:
            perm = torch.randperm(self.num_samples, generator=gen).to(self.device)
            for i in range(0, self.num_samples, self.batch_size):
                if done == total:
                    return
                yield perm[i : i + self.batch_size]
                done += 1

    def _clip(self) -> None:
        # foreach: one fused pass; the norm stays on the device (no host sync)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)

    def steps_for(self, epochs: int | None = None, steps: int | None = None) -> int:
        """Optimizer steps that run(epochs=..., steps=...) takes."""
        return steps if steps is not None else epochs * self.steps_per_epoch()

    def run(
        self,
        seed: int,
        epochs: int | None = None,
        steps: int | None = None,
        on_step: Callable[[int, float], None] | None = None,
        start_step: int = 0,
        log_every: int = 0,
    ) -> dict:
        """Train for `epochs` passes or `steps` optimizer steps; returns loss and throughput.

        `start_step`: the run-wide index of the first step (for the LR schedule).
        `log_every`: also return "step_losses", [run-wide step, mean loss] of every
        window of `log_every` steps ending in this call (no extra synchronisation: the
        losses are read once, at the end)."""
        if self.optimizer is None:
            self.new_optimizer()
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device=self.device).manual_seed(seed ^ 0x5DEECE66D)
        if not self.model.training:  # train() walks every module (1.4 ms, paper UNet);
            self.model.train()  # eval() / train() are only ever called on whole trees
        losses, n_images = [], 0
        start = time.perf_counter()
        for step, idx in enumerate(self._batches(epochs, steps, cpu_gen)):
            if self.schedule is not None:
                lr = self.schedule(start_step + step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            x0 = self.images[idx].float().div_(127.5).sub_(1.0)
            # An epoch's last, smaller batch runs eager: compiling (and graph-capturing) a
            # second batch shape costs minutes for one step per epoch.
            net = self.net if len(idx) == self.batch_size else self.model
            # CUDA graphs: a new step, so the graphs may reuse the last step's memory. Marked
            # explicitly, as the samplers do: once a sampler has marked a step, torch stops
            # telling training steps apart by itself.
            cudagraph_step(net)
            with self.autocast():
                loss = self.diffusion.loss(net, x0, generator=dev_gen)
            self.optimizer.zero_grad(set_to_none=True)
            scaler = self.scaler
            if scaler is not None:  # fp16: scale the loss so small gradients survive
                scaler.scale(loss).backward()
                if self.grad_clip > 0:
                    scaler.unscale_(self.optimizer)  # clip the true gradient
                    self._clip()
                scaler.step(self.optimizer)
                scaler.update()
            else:
                loss.backward()
                if self.grad_clip > 0:
                    self._clip()
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            losses.append(loss.detach())
            n_images += len(idx)
            if on_step is not None:
                on_step(step, losses[-1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        loss_values = torch.stack(losses).float().cpu().numpy() if losses else np.zeros(0)
        out = {
            "loss": float(loss_values.mean()) if len(loss_values) else float("nan"),
            "loss_last": float(loss_values[-10:].mean()) if len(loss_values) else float("nan"),
            "steps": len(loss_values),
            "images": n_images,
            "train_s": seconds,
            "images_per_s": n_images / seconds if seconds > 0 else float("nan"),
        }
        if log_every:
            out["step_losses"] = window_means(loss_values, start_step, log_every)
        if self.schedule is not None and len(loss_values):
            out["lr_last"] = self.schedule(start_step + len(loss_values) - 1)
        return out


def window_means(losses: np.ndarray, start_step: int, every: int) -> list:
    """[[step, mean loss]] for each window of `every` steps (run-wide steps start_step + 1,
    ...) that ends inside this array; `step` is the window's last step, 1-based."""
    out = []
    for i, _ in enumerate(losses):
        end = start_step + i + 1
        if end % every == 0:
            lo = max(0, i + 1 - every)
            out.append([end, float(losses[lo : i + 1].mean())])
    return out
