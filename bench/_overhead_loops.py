"""The two loops bench/overhead.py compares: `BareLoop` (a bare PyTorch DDPM loop, no
fedmpi code on the hot path) and `FedmpiClientRound` (one client round through fedmpi's
own `LocalTrainer`, as the round loop drives it), and `client_trainer`, the client both
the throughput and the progress-relay parts train.
"""

from __future__ import annotations

import time


class BareLoop:
    """The loop a user would write: no fedmpi code on the hot path."""

    def __init__(self, model, images_u8, diffusion, batch_size, lr, device):
        import torch

        self.torch = torch
        self.model, self.device, self.batch_size = model, device, batch_size
        self.images = images_u8  # uint8 tensor on the device
        self.T = diffusion.T
        self.sqrt_ac = torch.tensor(
            diffusion.sqrt_alphas_cumprod, dtype=torch.float32, device=device
        )
        self.sqrt_1m = torch.tensor(
            diffusion.sqrt_one_minus_alphas_cumprod, dtype=torch.float32, device=device
        )
        self.huber = diffusion.loss_type == "huber"
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def run(self, steps: int) -> tuple[int, float]:
        torch, F = self.torch, self.torch.nn.functional
        self.model.train()
        n = len(self.images)
        images = 0
        start = time.perf_counter()
        perm = torch.randperm(n, device=self.device)
        pos = 0
        for _ in range(steps):
            if pos >= n:
                perm, pos = torch.randperm(n, device=self.device), 0
            idx = perm[pos : pos + self.batch_size]
            pos += self.batch_size
            x0 = self.images[idx].float().div_(127.5).sub_(1.0)
            t = torch.randint(0, self.T, (len(idx),), device=self.device)
            noise = torch.randn_like(x0)
            xt = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m[t].view(-1, 1, 1, 1) * noise
            pred = self.model(xt, t)
            loss = F.smooth_l1_loss(pred, noise) if self.huber else F.mse_loss(pred, noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            images += len(idx)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return images, time.perf_counter() - start


class FedmpiClientRound:
    """One client round as `the round loop` performs it: the round-start copy a preempted
    round rolls back to (the method's personal regions, with the Adam state when it is
    kept across rounds), Adam zeroed in place when fed.reset_optimizer."""

    def __init__(self, trainer, cfg):
        from fedmpi.fl.methods import personal_regions
        from fedmpi.model.regions import bind_flat
        from fedmpi.train.state import RoundStart

        self.trainer, self.cfg, self.round = trainer, cfg, 0
        flat = bind_flat(trainer.model)  # as the Aggregator binds a client's model
        self.start = RoundStart(
            {r: flat[r] for r in personal_regions(cfg.fed.method)},
            keep_optimizer=not cfg.fed.reset_optimizer,
        )

    def snapshot(self):
        self.start.save(self.trainer)

    def run(self, steps: int) -> tuple[int, float, dict]:
        from fedmpi.runtime import derive_seed

        self.round += 1
        t = self.trainer
        start = time.perf_counter()
        self.snapshot()  # the round loop keeps it for a preemption rollback
        if self.cfg.fed.reset_optimizer or t.optimizer is None:
            t.reset_optimizer()
        stats = t.run(
            seed=derive_seed(self.cfg.run.seed, self.round, 0),
            steps=steps,
            on_step=lambda step, loss: None,
        )
        return stats["images"], time.perf_counter() - start, stats


def client_trainer(args, cfg, device):
    """A LocalTrainer on `args.images` training images (or synthetic ones) and a freshly
    seeded UNet: the client of the throughput and progress-relay parts."""
    import numpy as np
    import torch

    from fedmpi.data import load_arrays
    from fedmpi.model.diffusion import Diffusion
    from fedmpi.model.summary import model_shape
    from fedmpi.model.unet import build_unet
    from fedmpi.runtime import derive_seed
    from fedmpi.train.trainer import LocalTrainer

    channels, size = model_shape(cfg)
    if args.synthetic:
        images = np.random.default_rng(0).integers(
            0, 256, (args.images, channels, size, size), dtype=np.uint8
        )
    else:
        images = np.ascontiguousarray(load_arrays(cfg.data, "train")[0][: args.images])
    torch.manual_seed(derive_seed(cfg.run.seed, 0xC0FFEE))
    model = build_unet(cfg.model, channels, size).to(device)
    return LocalTrainer(
        model,
        Diffusion.from_config(cfg.diffusion),
        images,
        args.batch_size or cfg.train.batch_size,
        cfg.train.lr,
        device,
    )
