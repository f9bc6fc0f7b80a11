"""DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) around an epsilon-prediction network.

The noise schedule lives here in float64 numpy, outside the nn.Module, so that the
network's parameters are the only state that exists to communicate. Per-timestep
coefficients are gathered in float64 and cast to the sample's dtype at use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedmpi.model.unet import cudagraph_step


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""

    def alpha_bar(t):
        return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(timesteps)],
        dtype=np.float64,
    )


# the reference's loss_type choices (The Annotated Diffusion Model's p_losses)
LOSSES = {"huber": F.smooth_l1_loss, "mse": F.mse_loss, "l1": F.l1_loss}


class Diffusion:
    """Schedule, forward process, loss and samplers (no learnable state)."""

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        loss: str = "huber",
        weighting: str = "none",
        snr_gamma: float = 5.0,
    ):
        if schedule == "linear":
            betas = linear_betas(timesteps, beta_start, beta_end)
        elif schedule == "cosine":
            betas = cosine_betas(timesteps)
        else:
            raise ValueError(f"unknown schedule '{schedule}' (linear | cosine)")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss '{loss}' ({' | '.join(LOSSES)})")
        if weighting not in ("none", "min_snr"):
            raise ValueError(f"unknown loss weighting '{weighting}' (none | min_snr)")
        self.T = timesteps
        self.loss_type = loss
        self.weighting = weighting
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x_0): "fixed small" variance beta_tilde_t and mean coefficients.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )
        # Min-SNR-gamma weight of each timestep's epsilon loss: min(SNR_t, gamma) / SNR_t
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.loss_weight = np.minimum(snr, snr_gamma) / snr

    @classmethod
    def from_config(cls, d) -> Diffusion:
        return cls(
            d.timesteps, d.schedule, d.beta_start, d.beta_end, d.loss, d.weighting, d.snr_gamma
        )

    def _at(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped (B, 1, 1, 1) on like's device and dtype, gathered on the device
        from a float64 copy of the schedule made once per device (no host sync per call)."""
        tables = self.__dict__.setdefault("_tables", {})
        key = (id(arr), like.device)
        table = tables.get(key)
        if table is None:
            table = tables[key] = torch.from_numpy(arr).to(like.device)
        return table[t.to(like.device)].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    # forward process -------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0(self, xt, t, eps):
        return (xt - self._at(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / self._at(
            self.sqrt_alphas_cumprod, t, xt
        )

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, xt) * x0
            + self._at(self.posterior_mean_coef2, t, xt) * xt
        )
        return mean, self._at(self.posterior_variance, t, xt)

    # training --------------------------------------------------------------------
    def loss(
        self, model, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Epsilon-prediction loss at t ~ U{0..T-1} (Huber, MSE or L1), each image's loss
        weighted by `loss_weight[t]` when `weighting` is min_snr."""
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        pred = model(self.q_sample(x0, t, noise), t)
        fn = LOSSES[self.loss_type]
        if self.weighting == "none":
            return fn(pred, noise)
        per_image = fn(pred.float(), noise, reduction="none").mean(dim=tuple(range(1, x0.dim())))
        return (self._at(self.loss_weight, t, per_image).reshape(-1) * per_image).mean()

    # sampling --------------------------------------------------------------------
    @torch.no_grad()
    def p_sample(self, model, xt, t_int: int, generator=None):
        """One ancestral step x_t -> x_{t-1} with the fixed-small posterior variance."""
        t = torch.full((xt.shape[0],), t_int, device=xt.device, dtype=torch.long)
        cudagraph_step(model)
        eps = model(xt, t)
        # Ho et al.'s mean: 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps)
        coef = self.betas[t_int] / self.sqrt_one_minus_alphas_cumprod[t_int]
        mean = (xt - coef * eps) / math.sqrt(self.alphas[t_int])
        if t_int == 0:
            return mean
        noise = torch.randn(xt.shape, device=xt.device, dtype=xt.dtype, generator=generator)
        return mean + math.sqrt(self.posterior_variance[t_int]) * noise

    @torch.no_grad()
    def sample_ddpm(self, model, shape, device, generator=None, progress: Callable = None):
        """Full T-step ancestral sampling; returns images clipped to [-1, 1]."""
        x = torch.randn(shape, device=device, generator=generator)
        steps = range(self.T - 1, -1, -1)
        for t in progress(steps) if progress else steps:
            x = self.p_sample(model, x, t, generator)
        return x.clamp(-1, 1)

    def ddim_timesteps(self, steps: int) -> np.ndarray:
        """`steps` evenly spaced timesteps from T-1 down to 0 (inclusive)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in 1..{self.T}, got {steps}")
        ts = np.linspace(self.T - 1, 0, steps).round().astype(np.int64)
        return np.unique(ts)[::-1].copy()

    @torch.no_grad()
    def sample_ddim(
        self,
        model,
        shape,
        device,
        steps: int = 100,
        eta: float = 0.0,
        generator=None,
        progress: Callable = None,
    ):
        """DDIM sampling over `steps` timesteps; eta=0 is deterministic, eta=1 ~ DDPM."""
        ts = self.ddim_timesteps(steps)
        x = torch.randn(shape, device=device, generator=generator)
        pairs = list(zip(ts, list(ts[1:]) + [-1]))
        for t_int, t_prev in progress(pairs) if progress else pairs:
            t = torch.full((shape[0],), int(t_int), device=device, dtype=torch.long)
            cudagraph_step(model)
            eps = model(x, t)
            a_t = self.alphas_cumprod[t_int]
            a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with the clipped x0
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0 and t_prev >= 0:
                x = x + sigma * torch.randn(
                    x.shape, device=device, dtype=x.dtype, generator=generator
                )
        return x.clamp(-1, 1)

    def sample(
        self,
        model,
        shape,
        device,
        sampler: str = "ddim",
        steps: int = 100,
        eta: float = 0.0,
        generator=None,
        progress=None,
    ):
        was_training = model.training
        model.eval()
        try:
            if sampler == "ddpm":
                return self.sample_ddpm(model, shape, device, generator, progress)
            return self.sample_ddim(model, shape, device, steps, eta, generator, progress)
        finally:
            model.train(was_training)
