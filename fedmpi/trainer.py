"""The local training loop, shared by the centralized baseline and every federated client.

A `LocalTrainer` owns one model's optimization on one dataset held in memory (the
whole shard lives on the training device as uint8 and is scaled per batch, so there
is no DataLoader worker overhead). Randomness (shuffling, timesteps, noise) comes from
generators seeded from (run seed, round or epoch, client), never from global state, so
a resumed run replays exactly the same batches as an uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .diffusion import Diffusion


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, client, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def pick_device(setting: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda:(local_rank % visible GPUs) when CUDA is available (and allowed), else CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but CUDA is not available on this node")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def share_cpu_threads(ranks_on_node: int) -> None:
    """Split the node's cores between the ranks on it, unless OMP_NUM_THREADS decides:
    oversubscribed torch thread pools slow every rank down."""
    import os
    if "OMP_NUM_THREADS" not in os.environ and ranks_on_node > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // ranks_on_node))


class LocalTrainer:
    """Mini-batch epsilon-prediction training of `model` on uint8 images (N, C, H, W)."""

    def __init__(self, model: torch.nn.Module, diffusion: Diffusion, images: np.ndarray,
                 batch_size: int, lr: float, device: torch.device):
        if len(images) == 0:
            raise ValueError("this client has no training images")
        self.model = model.to(device)
        self.diffusion = diffusion
        self.device = device
        self.batch_size = batch_size
        self.lr = lr
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def new_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.lr)
        return self.optimizer

    def reset_optimizer(self) -> torch.optim.Optimizer:
        """Adam as if newly created (moments and step zeroed), in place: the same numbers
        as a new optimizer without allocating its state again every round."""
        if self.optimizer is None:
            return self.new_optimizer()
        with torch.no_grad():
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        return self.optimizer

    def _batches(self, epochs: Optional[int], steps: Optional[int], gen: torch.Generator
                 ) -> Iterable[torch.Tensor]:
        """Shuffled index batches: `steps` batches if given, else `epochs` full passes."""
        total = steps if steps is not None else epochs * self.steps_per_epoch()
        done = 0
        while done < total:
            perm = torch.randperm(self.num_samples, generator=gen).to(self.device)
            for i in range(0, self.num_samples, self.batch_size):
                if done == total:
                    return
                yield perm[i:i + self.batch_size]
                done += 1

    def run(self, seed: int, epochs: Optional[int] = None, steps: Optional[int] = None,
            on_step: Optional[Callable[[int, float], None]] = None) -> dict:
        """Train for `epochs` passes or `steps` optimizer steps; returns loss and throughput."""
        if self.optimizer is None:
            self.new_optimizer()
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device=self.device).manual_seed(seed ^ 0x5DEECE66D)
        self.model.train()
        losses, n_images = [], 0
        start = time.perf_counter()
        for step, idx in enumerate(self._batches(epochs, steps, cpu_gen)):
            x0 = self.images[idx].float().div_(127.5).sub_(1.0)
            loss = self.diffusion.loss(self.model, x0, generator=dev_gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.detach())
            n_images += len(idx)
            if on_step is not None:
                on_step(step, losses[-1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        loss_values = torch.stack(losses).float().cpu().numpy() if losses else np.zeros(0)
        return {"loss": float(loss_values.mean()) if len(loss_values) else float("nan"),
                "loss_last": float(loss_values[-10:].mean()) if len(loss_values) else float("nan"),
                "steps": len(loss_values), "images": n_images, "train_s": seconds,
                "images_per_s": n_images / seconds if seconds > 0 else float("nan")}
