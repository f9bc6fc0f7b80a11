"""The local training loop, shared by the centralized baseline and every federated client.

A `LocalTrainer` owns one model's optimization on one dataset held in memory (the
whole shard lives on the training device as uint8 and is scaled per batch, so there
is no DataLoader worker overhead). Randomness (shuffling, timesteps, noise) comes from
generators seeded from (run seed, round or epoch, client), never from global state, so
a resumed run replays exactly the same batches as an uninterrupted one.

It applies the recipe pieces that make short runs sample well (all off by default,
and off in the paper configs): gradient clipping (`train.grad_clip`, in
`LocalTrainer.run`: what makes a high learning rate safe), and, from recipe.py, the
`LRSchedule` (the learning rate of each run-wide optimizer step) and the `EMA` of the
weights (for sampling and scoring only). `EMA`, `LRSchedule`, `ema_applied` and
`schedule_for` stay importable from here.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
with `prox_mu` > 0, each `run` minimizes loss + (mu / 2) ||w - w_0||^2 over the
trainable weights, w_0 being the weights at the run's start (a client's round starts
from the global model). The term enters as its gradient, mu (w - w_0), added after the
backward pass (after fp16's unscaling) and before clipping and Adam.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from fedmpi.model.diffusion import Diffusion
from fedmpi.model.unet import compile_unet, cudagraph_step
from fedmpi.runtime import autocast_for
from fedmpi.train.recipe import EMA, LRSchedule, ema_applied, schedule_for

__all__ = ["EMA", "LRSchedule", "LocalTrainer", "ema_applied", "schedule_for", "window_means"]


class LocalTrainer:
    """Mini-batch epsilon-prediction training of `model` on uint8 images (N, C, H, W).

    `schedule` (an `LRSchedule`): the learning rate of each step, looked up at the step's
    run-wide index (`run(start_step=...)`). `ema` (an `EMA`): updated after every
    optimizer step when given. `grad_clip` (`train.grad_clip`, 0: off): each step's
    gradient is scaled to L2 norm at most this before Adam sees it (what lets the
    quickstart train at a high learning rate without its early spikes). `prox_mu`
    (FedProx's mu, 0: off): the proximal pull towards the weights each `run` starts
    from. `use_images` swaps the training set (one trainer for several clients)."""

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
        prox_mu: float = 0.0,
    ):
        if not prox_mu >= 0:
            raise ValueError(f"prox_mu must be >= 0, not {prox_mu}")
        self.device = device
        self.use_images(images)  # (refuses an empty set before anything moves)
        self.model = model.to(device)
        self.diffusion = diffusion
        self.batch_size = batch_size
        self.lr = lr
        self.optimizer_kind, self.momentum = "adam", 0.0  # optimizer_from(train config)
        self.schedule = schedule if schedule is not None and schedule.active else None
        self.ema = ema.to(device) if ema is not None else None
        self.grad_clip = float(grad_clip)
        self.prox_mu = float(prox_mu)
        # FedProx's w_0, one buffer per parameter ever trained (allocated once, copied
        # into at each run's start), and this run's [params, anchors]
        self._anchors: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._prox: tuple[list, list] = ([], [])
        # what set_speed changes: fp32, no gradient scaler, the eager model
        self.precision, self.scaler, self.net = "fp32", None, self.model
        self.optimizer: torch.optim.Optimizer | None = None

    def use_images(self, images: np.ndarray) -> None:
        """Train on `images` (uint8, N x C x H x W) from now on, held on the trainer's
        device (the previous set is released first)."""
        if len(images) == 0:
            raise ValueError("this client has no training images")
        self.images = None
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)

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
        if self.optimizer_kind == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        else:
            self.optimizer = torch.optim.Adam(params, lr=self.lr, fused=fused or None)
        return self.optimizer

    def optimizer_from(self, train_cfg) -> None:
        """train.optimizer (adam | sgd) and train.momentum, for the next new_optimizer()."""
        if train_cfg.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer '{train_cfg.optimizer}' (adam | sgd)")
        self.optimizer_kind, self.momentum = train_cfg.optimizer, train_cfg.momentum

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

    @torch.no_grad()
    def _mark_anchor(self) -> None:
        """FedProx's w_0: the trainable weights now, copied into buffers kept across runs."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        anchors = []
        for p in params:
            a = self._anchors.get(p)
            if a is None or a.shape != p.shape or a.device != p.device or a.dtype != p.dtype:
                a = self._anchors[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            anchors.append(a)
        torch._foreach_copy_(anchors, params)
        self._prox = (params, anchors)

    @torch.no_grad()
    def _add_prox(self) -> None:
        """grad += mu (w - w_0) for every parameter with a gradient (foreach: fused)."""
        params, grads, anchors = [], [], []
        for p, a in zip(*self._prox):
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                anchors.append(a)
        if params:
            torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=self.prox_mu)

    def _update(self, loss: torch.Tensor, prox: bool) -> None:
        """One step's backward pass, FedProx's pull (`prox`), clipping and Adam step."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        if scaler is not None:  # fp16: scale the loss so small gradients survive
            scaler.scale(loss).backward()
            if self.grad_clip > 0 or prox:
                scaler.unscale_(self.optimizer)  # clip / pull on the true gradient
                if prox:
                    self._add_prox()
                if self.grad_clip > 0:
                    self._clip()
            scaler.step(self.optimizer)
            scaler.update()
        else:
            loss.backward()
            if prox:
                self._add_prox()
            if self.grad_clip > 0:
                self._clip()
            self.optimizer.step()

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
        prox = self.prox_mu > 0
        if prox:
            self._mark_anchor()
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
            self._update(loss, prox)
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
