"""Server-side optimizers on the FedAvg average (FedAvgM, FedAdam, FedYogi).

This module owns `ServerOptimizer`: what the federator does to each region's average
before broadcasting it, and the optimizer state (per-region moments) that goes into its
checkpoint. It is pure torch (no communication): the federator applies `step` to every
region's freshly computed average, in place, before the broadcast, so the clients
receive the server-updated weights as the next round's global model.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2). With x the
global region at the round's start and avg the FedAvg average of the clients' uploads,
the pseudo-gradient is delta = avg - x, and the new global region is

    none:     x' = avg                      (the average untouched, bit for bit)
    fedavgm:  m = momentum * m + delta;                           x' = x + lr * m
    fedadam:  m = b1 m + (1 - b1) delta;  v = b2 v + (1 - b2) delta^2
              x' = x + lr * m / (sqrt(v) + tau)
    fedyogi:  m as fedadam;  v = v - (1 - b2) delta^2 sign(v - delta^2);  x' as fedadam

m and v start at zero, one pair per region (created at the region's first step, on its
device and in its dtype), with no bias correction, as in the paper. fedavgm with
momentum 0 and lr 1 is plain FedAvg again.
"""

from __future__ import annotations

import torch

from fedmpi.errors import ConfigError

KINDS = ("none", "fedavgm", "fedadam", "fedyogi")


class ServerOptimizer:
    """The server's update rule of `kind` (one of `KINDS`) with its per-region state.

    `lr`: the server learning rate (eta); `momentum`: fedavgm's beta; `beta1`, `beta2`,
    `tau`: fedadam / fedyogi's moment decays and adaptivity (the paper's epsilon)."""

    def __init__(
        self,
        kind: str = "none",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown server optimizer '{kind}' ({' | '.join(KINDS)})")
        if not lr > 0:
            raise ValueError(f"server lr must be > 0, not {lr}")
        for name, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"server {name} must be in [0, 1), not {value}")
        if not tau > 0:
            raise ValueError(f"server tau must be > 0, not {tau}")
        self.kind = kind
        self.lr, self.momentum = float(lr), float(momentum)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, fed_cfg) -> ServerOptimizer:
        """From a config's fed section (`server_opt`, `server_lr`, `server_momentum`,
        `server_beta1`, `server_beta2`, `server_tau`; a missing field takes the default)."""
        default = cls()
        try:
            return cls(
                getattr(fed_cfg, "server_opt", default.kind),
                getattr(fed_cfg, "server_lr", default.lr),
                getattr(fed_cfg, "server_momentum", default.momentum),
                getattr(fed_cfg, "server_beta1", default.beta1),
                getattr(fed_cfg, "server_beta2", default.beta2),
                getattr(fed_cfg, "server_tau", default.tau),
            )
        except ValueError as e:
            raise ConfigError(f"fed.server_*: {e}") from e

    @property
    def active(self) -> bool:
        """Whether `step` changes anything (kind is not none)."""
        return self.kind != "none"

    def _moments(self, region: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The region's m (and v for the adaptive kinds), zero at first, on `like`'s
        device and dtype (a loaded state is moved there once)."""
        names = ("m",) if self.kind == "fedavgm" else ("m", "v")
        state = self._state.setdefault(region, {})
        for name in names:
            t = state.get(name)
            if t is None:
                state[name] = torch.zeros_like(like)
            elif t.shape != like.shape:
                raise ValueError(
                    f"region '{region}': server optimizer state has shape {tuple(t.shape)}, "
                    f"the region {tuple(like.shape)}"
                )
            elif t.device != like.device or t.dtype != like.dtype:
                state[name] = t.to(device=like.device, dtype=like.dtype)
        return state

    @torch.no_grad()
    def step(self, region: str, before: torch.Tensor, average: torch.Tensor) -> None:
        """Overwrite `average` (the region's FedAvg average) in place with the new global
        region, from `before` (the global region at the round's start, same shape)."""
        if not self.active:
            return
        if before.shape != average.shape:
            raise ValueError(
                f"region '{region}': before {tuple(before.shape)} and average "
                f"{tuple(average.shape)} differ in shape"
            )
        state = self._moments(region, average)
        delta = average.sub_(before)  # the pseudo-gradient, in the average's memory
        m = state["m"]
        if self.kind == "fedavgm":
            m.mul_(self.momentum).add_(delta)
            torch.add(before, m, alpha=self.lr, out=average)
            return
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = state["v"]
        if self.kind == "fedadam":
            v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)
        else:  # fedyogi: v moves towards delta^2 by at most (1 - b2) delta^2
            d2 = delta * delta
            v.addcmul_(d2, torch.sign(v - d2), value=-(1 - self.beta2))
        denom = v.sqrt().add_(self.tau)
        torch.addcdiv(before, m, denom, value=self.lr, out=average)

    def state_dict(self) -> dict:
        """{"kind": kind, "regions": {region: {"m": ..., "v": ...}}}: copies of the
        moments (a later step does not change a saved state)."""
        regions = {
            region: {name: t.detach().clone() for name, t in state.items()}
            for region, state in self._state.items()
        }
        return {"kind": self.kind, "regions": regions}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`; a state of another kind is refused (ValueError)."""
        kind = state.get("kind")
        if kind != self.kind:
            raise ValueError(
                f"server optimizer state is of kind '{kind}', this run uses '{self.kind}'"
            )
        self._state = {
            region: {name: t.detach().clone() for name, t in moments.items()}
            for region, moments in state.get("regions", {}).items()
        }
