"""Fixed-point encoding of secure aggregation's uploads (fed.secure).

This module owns how a float upload becomes the uint64 words that a SUM Reduce adds
modulo 2^64, how the federator turns the sum back into floats, and the overflow check
that keeps the sum exact. It knows nothing of masks, keys or transports
(`fedmpi.fl.masks` / `fedmpi.fl.secure`).

Fixed point: a value v becomes round(v * 2^frac_bits) as int64, stored as uint64 (two's
complement). The SUM over m reporters decodes correctly as long as it stays inside
int64, which each client enforces for its own upload (`check_overflow`):
m * (max|v| * 2^frac_bits + 1/2) < 2^63. If every reporter stays within that share
of the range, the sum cannot wrap, with no extra communication.

Resolution (what "secure = plain" means): each client rounds n_k * theta_k once, by at
most 2^-(F+1), so the decoded average sum n_k theta_k / sum n_k is within
m * 2^-(F+1) / sum n_k of the exact one, then rounded once to float32
(`decode_average`). The plain float32 path itself is off by a few float32 ulps of the
largest |theta_k| (it rounds n_k * theta_k and every partial sum), which at the default
F = 24 and any n_k >= 1 is the larger term: one round of secure aggregation equals the
plain one within m * 2^-(F+1) / sum n_k + (m + 2) ulp(max |theta_k|). Training
amplifies such last-bit differences over later rounds as it does any other rounding
difference, so runs are compared round by round, not bit for bit after many rounds.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

# Default fractional bits (fed.secure_frac_bits). The upload is [n_k * theta_k, n_k].
# Headroom, worst case n_k = 1e6 samples and |theta| = 1e2, so max|v| = 1e8 ~ 2^26.6:
# m * 1e8 * 2^24 < 2^63 holds for up to m = 5497 reporters (2^39 / 1e8); at typical
# |theta| <= 10 it is 10x that. Resolution: each client rounds by at most 2^-25, so the
# average (sum / sum n_k) is off by at most 2^-25 / mean(n_k): 3e-8 in the degenerate
# n_k = 1 case, 3e-12 at n_k = 1e4 (Fashion-MNIST split over a few clients), i.e.
# ~300x below the float32 spacing of a weight of 0.01 (9.3e-10) and below the
# plain path's own float32 rounding of n_k * theta.
DEFAULT_FRAC_BITS = 24

_INT64_LIMIT = 2**63
# Values per step of encode (and of fedmpi.fl.masks.mask_inplace): a chunk of the upload
# and of each mask stream stay in the L2 cache, which halves the time of the memory-bound
# passes (measured on a 3M-value upload: 16 ms instead of 32 ms per mask on this
# project's 2-core VM).
CHUNK = 1 << 15


class SecureAggError(RuntimeError):
    """A set-up or an upload that secure aggregation cannot make safe."""


def max_frac_bits(max_abs: float, reporters: int) -> int:
    """The largest frac_bits for which `reporters` uploads of |v| <= max_abs cannot overflow."""
    f = 62
    while f > 0 and reporters * (Fraction(max_abs) * 2**f + Fraction(1, 2)) >= _INT64_LIMIT:
        f -= 1
    return f


def check_overflow(max_abs: float, reporters: int, frac_bits: int, where: str = "") -> None:
    """Raise SecureAggError unless reporters * (max_abs * 2^frac_bits + 1/2) < 2^63.

    `max_abs` is the largest |value| a client uploads (the +1/2 is its rounding); each
    client checks its own, which bounds the decoded sum to int64. Exact (rational)
    arithmetic, so the boundary is not blurred by float rounding.
    """
    if not math.isfinite(max_abs):
        raise SecureAggError(
            f"secure aggregation{where}: the upload holds a non-finite value "
            f"(max |value| = {max_abs}); the local update diverged"
        )
    if reporters * (Fraction(max_abs) * 2**frac_bits + Fraction(1, 2)) >= _INT64_LIMIT:
        fit = max_frac_bits(max_abs, reporters)
        if reporters * (Fraction(max_abs) * 2**fit + Fraction(1, 2)) >= _INT64_LIMIT:
            raise SecureAggError(
                f"secure aggregation{where}: max |value| {max_abs:.6g} over {reporters} reporters "
                "exceeds 64-bit fixed point at any fed.secure_frac_bits; the update diverged"
            )
        raise SecureAggError(
            f"secure aggregation{where} would overflow: {reporters} reporters x max |value| "
            f"{max_abs:.6g} x 2^{frac_bits} (fed.secure_frac_bits) reaches 2^63, the range of "
            f"the fixed-point sum; lower fed.secure_frac_bits to {fit} or less "
            f"(resolution 2^-{fit} = {2.0**-fit:.3g})"
        )


def encode(
    values: np.ndarray,
    frac_bits: int = DEFAULT_FRAC_BITS,
    reporters: int = 1,
    out: np.ndarray | None = None,
    where: str = "",
    scale: float = 1.0,
) -> np.ndarray:
    """round(scale * values * 2^frac_bits) as uint64 (two's complement), after `check_overflow`.

    `values`: float64 or float32, scaled in float64 (one rounding at most; none when
    `scale` is an integer below 2^24 and values are float32). `reporters`: how many
    uploads will be summed. `out`: a uint64 buffer to fill. `scale`: e.g. the FedAvg
    weight n_k, so that n_k * theta_k needs no float temporary.
    """
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise SecureAggError(f"encode expects a float array, got {values.dtype}")
    if values.size:  # max and min (NaN propagates) instead of abs: no temporary
        lo, hi = float(values.min()), float(values.max())
        max_abs = max(abs(lo), abs(hi)) if math.isfinite(lo) and math.isfinite(hi) else math.nan
    else:
        max_abs = 0.0
    check_overflow(max_abs * abs(float(scale)), reporters, frac_bits, where)
    if out is None:
        out = np.empty(values.shape, np.uint64)
    elif out.dtype != np.uint64 or out.shape != values.shape or not out.flags.c_contiguous:
        raise ValueError(f"encode out must be contiguous uint64 of shape {values.shape}")
    src, dst = values.reshape(-1), out.reshape(-1).view(np.int64)
    factor = float(scale) * 2.0**frac_bits
    work = np.empty(min(src.size, CHUNK), np.float64)
    for i in range(0, src.size, CHUNK):
        w = work[: min(CHUNK, src.size - i)]
        np.multiply(src[i : i + w.size], factor, out=w, dtype=np.float64)
        np.rint(w, out=w)  # round to nearest (ties to even)
        # float64 -> int64 (|x| < 2^63 after the check: exact), stored as uint64
        np.copyto(dst[i : i + w.size], w, casting="unsafe")
    return out


def decode_average(total: np.ndarray, frac_bits: int, out: np.ndarray) -> float:
    """The federator's step on a summed FedAvg upload [sum n_k theta_k, sum n_k] in fixed
    point: writes sum n_k theta_k / sum n_k into the float array `out` (one pass, in
    float64 before the final rounding to out's dtype) and returns sum n_k. With a
    weight <= 0 (every reporter left out) `out` is left untouched."""
    if total.dtype != np.uint64 or total.size != out.size + 1:
        raise ValueError(
            f"decode_average expects uint64[{out.size + 1}], got {total.dtype}[{total.size}]"
        )
    weight = float(decode(total[-1:], frac_bits)[0])
    if weight > 0:
        np.multiply(
            total[:-1].view(np.int64),
            2.0**-frac_bits / weight,
            out=out.reshape(-1),
            casting="same_kind",
        )
    return weight


def decode(
    total: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, out: np.ndarray | None = None
) -> np.ndarray:
    """float64 values of a (summed) uint64 fixed-point buffer (into `out` if given)."""
    total = np.asarray(total)
    if total.dtype not in (np.uint64, np.int64):
        raise ValueError(f"decode expects the uint64 (or int64) SUM buffer, got {total.dtype}")
    if out is None:
        out = np.empty(total.shape, np.float64)
    elif out.dtype != np.float64 or out.shape != total.shape:
        raise ValueError(f"decode out must be float64 of shape {total.shape}")
    np.multiply(
        total.view(np.int64), 2.0**-frac_bits, out=out
    )  # int64 -> float64 rounds only beyond 2^53
    return out
