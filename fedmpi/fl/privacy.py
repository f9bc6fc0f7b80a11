"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018) building blocks.

This module owns `privacy.dp`: clipping a client's update, the Gaussian noise (central
or distributed), the uniform-weight average, the privacy accountant, and the aggregation
strategy that applies them around plain or secure FedAvg (`DifferentialPrivacy`, a
wrapper of `fedmpi.fl.strategy.AggregationStrategy`). It moves no bytes itself.

One round, per client k: delta_k = (local - global at round start) over all shared
regions of the round, flattened; `clip_update` scales it to L2 norm <= C. The released
quantity is the SUM of clipped deltas plus N(0, (z*C)^2) per coordinate, where z is the
noise multiplier; the average divides by the number of reporters m (uniform weights,
not n_k, so one client's influence on the sum is bounded by C):

- central DP (plain aggregation only): the federator adds std z*C to the sum
  (`noise_std(..., "central")`); it sees the noise-free sum, and clients that relay
  inside the Reduce see noise-free partial sums, so this trusts them.
- distributed DP (fed.secure only; the config refuses it without): each of the m
  clients adds std z*C/sqrt(m) to its own clipped delta, so the sum carries std z*C and
  the federator never sees a noise-free sum. This holds only if all m clients add
  their share.

Personal regions (UDEC's encoder + bottleneck, ULATDEC's encoder) are never uploaded,
so nothing about them is released and they need no clipping or noise; only shared
regions count.

With every client in every round (q = 1) the accountant composes `rounds` Gaussian
mechanisms of noise multiplier z; with Poisson sampling of rate q (fed.sampling=poisson,
fed.participation=q) it composes `rounds` Poisson-subsampled Gaussian mechanisms, the
amplification of DP-FedAvg (`epsilon`, dp_accounting's RDP accountant; an independent
implementation in tests/fl/test_accountant.py agrees to 1%). Fixed-size sampling is
refused with DP (the config check): this accountant does not cover it. The neighbouring relation is `ADJACENCY`: two federations are
neighbours when one has one client more (client level, add/remove); one client changes
the released sum by at most C. Under replace-one adjacency a client changes it by up to
2C, which doubles the sensitivity (the epsilon of z/2). Who sees what in each mode, and
what the epsilon does not cover, is in docs/privacy.md.

The noise comes from numpy's PCG64 seeded from OS entropy (`noise_generator`: not
replayable from the config, so runs with DP are not bit-for-bit reproducible); PCG64 is
not a cryptographic generator and the Gaussian sampling has the usual floating-point
caveats (Mironov 2012): fine for research runs, not a certified release.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fedmpi.fl.strategy import AggregationStrategy, Wrapper, host_view, write_back

MODES = ("central", "distributed")

# The neighbouring relation of every epsilon fedmpi reports (metrics.jsonl's
# `dp_adjacency`, the round and start lines, comm_summary.json's privacy block).
ADJACENCY = "add/remove one client"


class PrivacyError(ValueError):
    """An invalid DP setting."""


# Clipping aims this much below C, so that rounding the scaled update to float32 (each
# element by at most 2^-24 relative) cannot push its norm above C.
_CLIP_MARGIN = 1 - 2.0**-22


def l2_norm(arrays) -> float:
    """One L2 norm over several arrays (a client's update of all its uploaded regions),
    accumulated in float64 chunk by chunk (no float64 copy of a whole region)."""
    total = 0.0
    for a in arrays:
        flat = np.asarray(a).reshape(-1)
        for i in range(0, flat.size, 1 << 20):
            chunk = flat[i : i + (1 << 20)].astype(np.float64)
            total += float(np.dot(chunk, chunk))
    return math.sqrt(total)


def clip_factor(norm: float, clip: float) -> float:
    """The factor that scales an update of L2 norm `norm` to norm <= clip (1: untouched)."""
    if not clip > 0:
        raise PrivacyError(f"clip norm must be > 0 (privacy.clip), got {clip}")
    if not math.isfinite(norm):
        raise PrivacyError(f"the client update has a non-finite norm ({norm}): training diverged")
    return 1.0 if norm <= clip else clip / norm * _CLIP_MARGIN


def clip_update(delta: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """(delta scaled to L2 norm <= clip, its original norm); a new array, same dtype.

    The norm is accumulated in float64; the scaling aims 2^-22 (relative) below `clip`
    so that the float32 result stays within the bound.
    """
    delta = np.asarray(delta)
    norm = l2_norm([delta])
    factor = clip_factor(norm, clip)
    return (delta * delta.dtype.type(factor)).astype(delta.dtype, copy=False), norm


def clip_upload(thetas, starts, clip: float) -> tuple[float, float]:
    """A client's DP upload, in place: theta <- start + clip(theta - start).

    `thetas`, `starts`: the float arrays of the regions the client uploads (its weights
    after local training, and the global weights it started the round from). The clip is
    ONE L2 norm over all of them (the sensitivity of the client's whole upload). The
    noise comes later, on the sum or as distributed shares (`DifferentialPrivacy`).
    Returns (norm before clipping, norm after clipping), the second <= clip.

    The upload is start + clipped delta in the weights' dtype, so the delta the
    federator effectively receives differs from the clipped one by the float32 rounding
    of that sum (half an ulp of each weight), as in any float implementation.
    """
    for theta, start in zip(thetas, starts):
        np.subtract(theta, start, out=theta)  # theta holds the delta from here on
    norm = l2_norm(thetas)
    factor = clip_factor(norm, clip)
    if factor != 1.0:
        for theta in thetas:
            theta *= theta.dtype.type(factor)
    clipped = l2_norm(thetas) if factor != 1.0 else norm
    for theta, start in zip(thetas, starts):
        theta += start
    return norm, clipped


def noise_std(noise_multiplier: float, clip: float, mode: str, reporters: int) -> float:
    """Std of the Gaussian noise one party adds per coordinate.

    central: the federator adds z*C to the sum (clients add 0 and call nothing).
    distributed: each of `reporters` clients adds z*C/sqrt(reporters) to its delta.
    """
    if mode not in MODES:
        raise PrivacyError(f"privacy.mode must be one of {MODES}, got {mode!r}")
    if noise_multiplier < 0:
        raise PrivacyError(
            f"noise multiplier must be >= 0 (privacy.noise_multiplier), got {noise_multiplier}"
        )
    if reporters < 1:
        raise PrivacyError(f"need at least one reporter, got {reporters}")
    std = noise_multiplier * clip
    return std if mode == "central" else std / math.sqrt(reporters)


def noise_generator() -> np.random.Generator:
    """A PCG64 seeded from the operating system's entropy: the noise must stay unknown
    to the federator (a generator seeded from run.seed could be replayed and subtracted)."""
    return np.random.default_rng()


def add_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, std^2) to every element of float array `x`, in place; returns x."""
    if std > 0:
        # standard_normal draws float32 directly for float32 buffers: no float64 copy
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        noise = rng.standard_normal(x.shape, dtype=dtype)
        noise *= std
        x += noise
    return x


def private_average(
    clipped_sum: np.ndarray,
    reporters: int,
    noise_multiplier: float,
    clip: float,
    mode: str,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Federator side: the DP average delta from the sum of m clipped (noised) deltas.

    Adds the central noise when mode is "central" (distributed: the clients did), then
    divides by m: uniform weights. Returns a new float64 array.
    """
    out = np.array(clipped_sum, dtype=np.float64)
    if mode == "central":
        if rng is None:
            raise PrivacyError("central DP needs the federator's seeded generator (rng)")
        add_noise(out, noise_std(noise_multiplier, clip, mode, reporters), rng)
    else:
        noise_std(noise_multiplier, clip, mode, reporters)  # validates the settings
    out /= reporters
    return out


def epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon after `rounds` rounds of the (sampled) Gaussian mechanism, for `delta`.

    dp_accounting's RDP accountant over SelfComposed(PoissonSampled(q, Gaussian(z))),
    `ADJACENCY` (add/remove one client). q = 1: every client reports every round.
    """
    import dp_accounting  # only DP runs need it (a second of import time)
    from dp_accounting import rdp

    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1) (privacy.delta), got {delta}")
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate}")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        int(rounds),
    )
    accountant = rdp.RdpAccountant()
    # For large q the accountant drops fractional orders whose series does not converge
    # (a warning per order, per call): the remaining orders still bound epsilon from above.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl_log.setLevel(level)


def epsilon_fields(eps: float, delta: float) -> dict:
    """The guarantee as metrics.jsonl's round rows record it."""
    return {"epsilon": eps, "dp_delta": delta, "dp_adjacency": ADJACENCY}


def epsilon_text(eps: float, delta: float) -> str:
    """The guarantee as the round line prints it."""
    return f"eps {eps:.3g} (delta {delta:g}, {ADJACENCY})"


# --- the strategy ---------------------------------------------------------------------


class DifferentialPrivacy(Wrapper):
    """DP-FedAvg around another strategy (`inner`: plain or secure FedAvg).

    Uniform weights (every client of size > 0 counts 1). After its local training, each
    client's uploaded regions become start + clip(theta - start), one L2 norm over all of
    them (`prepare_client`), before they join its rank's mean. In distributed mode each
    reporting rank then adds its noise share to its mean (`begin_round`): std
    z C / (c sqrt(m)) for a rank of c clients among m reporting ranks, so that the sum of
    the clipped updates carries std z C. In central mode the federator's own summand of
    the sum is the noise (the inner strategy must allow a float summand: not the secure
    one).

    `denominator` (Poisson sampling): the average divides the noised sum of clipped
    updates by this fixed expected number of clients q N instead of the number m that
    reported (DP-FedAvg's fixed-denominator estimator, McMahan et al. 2018): the federator
    rescales the inner strategy's average, before + (average - before) m / (q N), so the
    released model depends on m only through the noised sum. None: divide by m (every
    client reports every round, m is public). `rng`: the noise generator (default
    `noise_generator()`)."""

    def __init__(
        self,
        inner: AggregationStrategy,
        clip: float,
        noise_multiplier: float,
        mode: str = "central",
        delta: float = 1e-5,
        rng: np.random.Generator | None = None,
        sample_rate: float = 1.0,
        denominator: float | None = None,
    ):
        if mode == "central" and not inner.federator_summand:
            raise PrivacyError(
                f"central DP adds the noise as the federator's summand, which "
                f"{type(inner).__name__} does not have; use privacy.mode=distributed"
            )
        if denominator is not None and not denominator > 0:
            raise PrivacyError(f"the fixed denominator must be > 0, got {denominator}")
        super().__init__(inner)
        self.clip, self.noise_multiplier, self.mode, self.delta = (
            clip,
            noise_multiplier,
            mode,
            delta,
        )
        self.sample_rate, self.denominator = float(sample_rate), denominator
        self.rng = rng if rng is not None else noise_generator()

    @classmethod
    def from_config(
        cls, inner: AggregationStrategy, privacy_cfg, population=None
    ) -> DifferentialPrivacy:
        """From privacy.*; with a sampled population (`fedmpi.fl.population`), its
        sample rate q and fixed denominator q N."""
        p = privacy_cfg
        q, denominator = 1.0, None
        if population is not None and not population.everyone:
            q, denominator = population.participation, population.expected()
        return cls(inner, p.clip, p.noise_multiplier, p.mode, p.delta, None, q, denominator)

    @property
    def needs_before(self) -> bool:
        return self.denominator is not None or self.inner.needs_before

    def fedavg_sizes(self, sizes):
        return [1.0 if n > 0 else 0.0 for n in self.inner.fedavg_sizes(sizes)]

    def prepare_client(self, bufs, regions, start) -> dict:
        """A client's update of the regions it uploads, clipped in place (one L2 norm over
        all of them); its norm before and after."""
        stats = self.inner.prepare_client(bufs, regions, start)
        if not regions:
            return stats
        if start is None:
            raise RuntimeError(
                "privacy.dp needs the client's weights at the round's start "
                "(prepare_client(..., start=RoundStart.weights))"
            )
        thetas = [host_view(bufs.flat[r]) for r in regions]
        starts = [host_view(start[r]) for r in regions]
        norm, clipped = clip_upload(thetas, starts, self.clip)
        for r, host in zip(regions, thetas):
            write_back(bufs.flat[r], host)
        return {**stats, "dp_update_norm": norm, "dp_clipped_norm": clipped}

    def begin_round(self, bufs, round_index, client, uploads, start):
        if client is not None and self.mode == "distributed":
            for job in uploads:
                ranks = max(1, sum(n > 0 for n in job.sizes))
                own = job.size_of(client)
                if own > 0:
                    std = noise_std(self.noise_multiplier, self.clip, self.mode, ranks) / own
                    host = host_view(bufs.flat[job.region])
                    add_noise(host, std, self.rng)
                    write_back(bufs.flat[job.region], host)
        return self.inner.begin_round(bufs, round_index, client, uploads, start)

    def receive(self, bufs, job):
        """Central DP: N(0, (z C)^2) per coordinate on the sum of the clipped uploads,
        i.e. N(0, (z C / m)^2) on the average of m reporters, as the federator's summand."""
        dst, own = self.inner.receive(bufs, job)
        if self.mode == "central" and job.reported:
            own = bufs.upload_buffer(job.region).zero_()
            std = noise_std(self.noise_multiplier, self.clip, "central", 1) / sum(job.sizes)
            host = host_view(own[:-1])
            add_noise(host, std, self.rng)
            write_back(own[:-1], host)
        return dst, own

    def released_every_round(self, shared):
        """With sampling, every round releases every shared region with its noise, also
        when nobody reported it: the accountant's mechanism is a noised sum each round."""
        return tuple(shared) if self.denominator is not None else ()

    def finish(self, bufs, job, total):
        out = self.inner.finish(bufs, job, total)
        if self.denominator is None:
            return out
        theta, before = bufs.flat[job.region], bufs.before(job.region)
        with torch.no_grad():
            if job.reported:
                # before + (average - before) * m / (q N): the fixed-denominator estimator
                theta.sub_(before).mul_(sum(job.sizes) / self.denominator).add_(before)
            else:  # nobody reported: before + N(0, (z C)^2) / (q N)
                host = host_view(theta)
                std = noise_std(self.noise_multiplier, self.clip, "central", 1)
                add_noise(host, std / self.denominator, self.rng)
                write_back(theta, host)
        return True  # float arithmetic on the weights: check it for overflow

    def epsilon(self, rounds: int) -> float:
        """The (epsilon, delta) guarantee after `rounds` rounds (sample rate q)."""
        return epsilon(self.noise_multiplier, rounds, self.delta, self.sample_rate)
