"""Secure aggregation by pairwise masks that cancel in one integer SUM reduce.

This module owns the transport-free half of `fed.secure`: key agreement, fixed-point
encoding, mask streams and the checks that refuse unsafe set-ups. It moves no bytes;
the caller relays public keys through the federator and reduces the masked uploads
with an unsigned 64-bit SUM (`MPI.UINT64_T`, or int64 on torch: the same bits).

Protocol (honest-but-curious federator, no collusion with clients; an MPI job is
all-or-nothing, so SecAgg's dropout recovery is not needed):

1. Once per run every client makes an X25519 key pair (`make_keypair`) and sends
   `public_bytes(key)` to the federator, which relays all of them back. Each client
   derives a 32-byte secret per peer (`derive_secrets`): HKDF-SHA256 over the X25519
   shared key, with both client ids (canonical order) and the run id in `info`, so a
   secret is bound to one pair in one run.
2. Per (round, region) each pair expands its secret with HKDF into an AES-256-CTR key
   and draws a uint64 mask stream (`mask_stream`). AES-CTR rather than ChaCha20
   because AES-NI makes it ~1.6x faster here; both are in `cryptography`.
3. A client encodes its upload in fixed point (`encode`), adds the masks of the pairs
   where it has the lower id and subtracts those where it has the higher one, modulo
   2^64 (`mask_inplace`). Summed over the region's reporters every mask appears once
   with + and once with -, so the SUM reduce yields the plain encoded sum exactly and
   the federator decodes only that (`decode`). `mask_peers` can restrict the pairs to
   a ring of 2k neighbours, so a client's cost stops growing with the reporter count.

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

Intermediate ranks of the reduction (Open MPI's tree, gloo's ring, which also leaves
partial sums in the senders' buffers) only ever see sums of masked uploads: a sum over
a proper subset of the reporters still carries the masks of the pairs that cross it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
_SECRET_BYTES = 32
# Values per step of encode / mask_inplace: a chunk of the upload and of each mask stream
# stay in the L2 cache, which halves the time of the memory-bound passes (measured on a
# 3M-value upload: 16 ms instead of 32 ms per mask on this project's 2-core VM).
_CHUNK = 1 << 15


class SecureAggError(RuntimeError):
    """A set-up or an upload that secure aggregation cannot make safe."""


# --- keys -----------------------------------------------------------------------------


def make_keypair() -> X25519PrivateKey:
    """A fresh X25519 private key (its public half via `public_bytes`)."""
    return X25519PrivateKey.generate()


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key: what the federator relays."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _run_id_bytes(run_id) -> bytes:
    return run_id if isinstance(run_id, bytes) else str(run_id).encode("utf-8")


def derive_secrets(
    private_key: X25519PrivateKey, my_id: int, publics: Mapping[int, bytes], run_id
) -> dict[int, bytes]:
    """Pair secret with every other client: {peer_id: 32 bytes}.

    `publics` maps client id -> raw public key (this client's own entry, if present, is
    skipped). Both ends of a pair get the same secret because X25519 is symmetric and
    the HKDF info names the ids in ascending order plus `run_id` (str or bytes; the
    same on every rank), so secrets never repeat across pairs or runs.
    """
    run = _run_id_bytes(run_id)
    secrets = {}
    for peer, pub in publics.items():
        peer = int(peer)
        if peer == my_id:
            continue
        if len(pub) != 32:
            raise SecureAggError(
                f"public key of client {peer} has {len(pub)} bytes, expected 32 (raw X25519); "
                "relay the bytes of secure.public_bytes() unchanged"
            )
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(bytes(pub)))
        lo, hi = sorted((my_id, peer))
        info = b"fedmpi/secure/pair|run=%s|%d|%d" % (run, lo, hi)
        secrets[peer] = HKDF(hashes.SHA256(), _SECRET_BYTES, salt=None, info=info).derive(shared)
    return secrets


# --- fixed point ----------------------------------------------------------------------


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
    work = np.empty(min(src.size, _CHUNK), np.float64)
    for i in range(0, src.size, _CHUNK):
        w = work[: min(_CHUNK, src.size - i)]
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


# --- masks ----------------------------------------------------------------------------


def _mask_key(pair_secret: bytes, round_index: int, region: str) -> bytes:
    info = b"fedmpi/secure/mask|round=%d|region=%s" % (int(round_index), region.encode())
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(pair_secret)


def _mask_cipher(pair_secret: bytes, round_index: int, region: str):
    """The pair's AES-256-CTR keystream for one (round, region), from counter block 0."""
    return Cipher(
        algorithms.AES(_mask_key(pair_secret, round_index, region)), modes.CTR(bytes(16))
    ).encryptor()


class _Zeros:
    """One shared read-only zero buffer, grown on demand: the CTR plaintext."""

    buf = memoryview(b"")

    @classmethod
    def get(cls, nbytes: int) -> memoryview:
        if len(cls.buf) < nbytes:
            cls.buf = memoryview(bytes(nbytes))
        return cls.buf[:nbytes]


def mask_stream(
    pair_secret: bytes, round_index: int, region: str, n: int, out: np.ndarray | None = None
) -> np.ndarray:
    """n uniform uint64 from AES-256-CTR, keyed by HKDF(pair secret, round, region).

    The key is unique per (pair, round, region), so a zero counter block is safe.
    `out`: optional uint64 buffer of at least n + 2 elements (CTR's `update_into` wants
    15 spare bytes), reused across pairs to avoid allocating per pair.
    """
    enc = _mask_cipher(pair_secret, round_index, region)
    if out is None:
        out = np.empty(n + 2, np.uint64)
    elif out.dtype != np.uint64 or out.size < n + 2:
        raise ValueError(f"mask_stream out must be uint64 with >= {n + 2} elements")
    enc.update_into(_Zeros.get(8 * n), memoryview(out).cast("B"))
    return out[:n]


def mask_inplace(
    buf: np.ndarray,
    me: int,
    peers: Iterable[int],
    secrets: Mapping[int, bytes],
    round_index: int,
    region: str,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Add (me < peer) or subtract (me > peer) each pair's mask, modulo 2^64, in place.

    `peers`: the other reporters of this region in this round (own id skipped), as the
    plan gives them, or `mask_peers(...)` of them; subsets differ per region, so every
    reporter must derive its peers from the same set. The masks are `mask_stream`'s,
    drawn chunk by chunk (`scratch`: optional uint64 buffer, reused across calls).
    """
    if buf.dtype != np.uint64 or not buf.flags.c_contiguous:
        raise ValueError(f"mask_inplace needs a contiguous uint64 buffer, got {buf.dtype}")
    flat = buf.reshape(-1)
    pairs = []
    for peer in sorted({int(p) for p in peers} - {me}):
        if peer not in secrets:
            raise SecureAggError(
                f"client {me} has no pair secret with client {peer}; run the key "
                "exchange (derive_secrets) over all clients before round 1"
            )
        # uint64 arithmetic wraps modulo 2^64
        pairs.append(
            (_mask_cipher(secrets[peer], round_index, region), np.add if me < peer else np.subtract)
        )
    if scratch is None or scratch.size < _CHUNK + 2:
        scratch = np.empty(_CHUNK + 2, np.uint64)
    out_bytes = memoryview(scratch).cast("B")  # CTR's update_into wants 15 spare bytes
    zeros = _Zeros.get(8 * _CHUNK)
    for i in range(0, flat.size, _CHUNK):
        part = flat[i : i + _CHUNK]
        mask = scratch[: part.size]
        for enc, op in pairs:
            enc.update_into(zeros[: 8 * part.size], out_bytes)
            op(part, mask, out=part)
    return buf


def mask_peers(me: int, reporters: Iterable[int], neighbors: int | None = None) -> list[int]:
    """The reporters that `me` shares a mask with in one region and round.

    neighbors=None: every other reporter (m - 1 masks per client). neighbors=k: the k
    nearest on each side of the ring of sorted reporter ids (2k masks, whatever m), a
    symmetric choice, so both ends of every pair agree without communication. The ring
    is connected, so against the federator alone it hides the same as all pairs: every
    upload and every partial sum short of the whole set carries a mask it cannot remove.
    It is weaker only if clients collude: the 2k neighbours of a client together could
    unmask it (with all pairs, all m - 1 others would have to).
    """
    ring = sorted({int(r) for r in reporters} | {me})
    m = len(ring)
    if neighbors is None or 2 * neighbors >= m - 1:
        return [p for p in ring if p != me]
    if neighbors < 1:
        raise SecureAggError(f"secure mask neighbours must be >= 1 (or all), got {neighbors}")
    i = ring.index(me)
    return sorted({ring[(i + d) % m] for d in range(-neighbors, neighbors + 1) if d != 0})


def check_reporters(
    region: str, round_index: int, reporters: Iterable[int], min_reporters: int = 2
) -> None:
    """Refuse a region whose reporter set is too small to hide any single upload.

    With one reporter the 'sum' is that client's upload (e.g. USPLIT at K = 2). Call it
    at set-up for every region of every round's plan. `min_reporters` below 2 is an
    explicit opt-out (fed.secure_min_reporters) and accepts such regions in the clear.
    """
    m = len(set(reporters))
    if m == 0 or m >= min_reporters:
        return  # a region nobody reports is not aggregated at all
    raise SecureAggError(
        f"secure aggregation: region {region!r} in round {round_index} has {m} reporter(s) "
        f"{sorted(set(reporters))}, fewer than {min_reporters}, so the federator would see "
        f"that upload in the clear (e.g. USPLIT at K = 2); use more clients or another "
        f"method, or accept it explicitly with fed.secure_min_reporters=1"
    )


# --- the client-side object -----------------------------------------------------------


class SecureAggregator:
    """One client's key pair and pair secrets; encodes and masks its uploads.

    Caller flow: `public_bytes()` -> federator relays {id: bytes} -> `establish(publics,
    run_id)`; each round per region `upload(values, round, region, peers)` -> SUM reduce
    -> federator calls `decode(total)` (or the module-level `decode`).
    """

    def __init__(
        self,
        client_id: int,
        frac_bits: int = DEFAULT_FRAC_BITS,
        private_key: X25519PrivateKey | None = None,
    ):
        self.client_id = int(client_id)
        self.frac_bits = int(frac_bits)
        self._key = private_key if private_key is not None else make_keypair()
        self.secrets: dict[int, bytes] = {}
        self._scratch = np.empty(0, np.uint64)

    def public_bytes(self) -> bytes:
        return public_bytes(self._key)

    def establish(self, publics: Mapping[int, bytes], run_id) -> None:
        self.secrets = derive_secrets(self._key, self.client_id, publics, run_id)

    def upload(
        self,
        values: np.ndarray,
        round_index: int,
        region: str,
        peers: Iterable[int],
        out: np.ndarray | None = None,
        neighbors: int | None = None,
    ) -> np.ndarray:
        """Encode `values` (float) and mask them for this (round, region): a uint64 array.

        `peers`: the region's reporters this round (own id may be included). `out`: a
        uint64 buffer of values' shape to reuse. `neighbors`: see `mask_peers` (the
        same on every client).
        """
        reporters = {int(p) for p in peers} | {self.client_id}
        where = f" (client {self.client_id}, region {region!r}, round {round_index})"
        enc = encode(values, self.frac_bits, reporters=len(reporters), out=out, where=where)
        if self._scratch.size < enc.size + 2:
            self._scratch = np.empty(enc.size + 2, np.uint64)
        return mask_inplace(
            enc,
            self.client_id,
            mask_peers(self.client_id, reporters, neighbors),
            self.secrets,
            round_index,
            region,
            scratch=self._scratch,
        )

    def upload_fedavg(
        self,
        theta: np.ndarray,
        weight: float,
        round_index: int,
        region: str,
        peers: Iterable[int],
        out: np.ndarray,
        neighbors: int | None = None,
    ) -> np.ndarray:
        """The FedAvg upload [weight * theta, weight] of one region, encoded and masked into
        `out` (uint64, theta.size + 1): what `upload` does, without a float64 copy of it."""
        reporters = {int(p) for p in peers} | {self.client_id}
        where = f" (client {self.client_id}, region {region!r}, round {round_index})"
        if out.dtype != np.uint64 or out.shape != (theta.size + 1,):
            raise ValueError(f"upload_fedavg out must be uint64[{theta.size + 1}]")
        encode(
            theta.reshape(-1),
            self.frac_bits,
            len(reporters),
            out=out[:-1],
            where=where,
            scale=weight,
        )
        encode(
            np.array([weight], np.float64),
            self.frac_bits,
            len(reporters),
            out=out[-1:],
            where=where,
        )
        if self._scratch.size < out.size + 2:
            self._scratch = np.empty(out.size + 2, np.uint64)
        return mask_inplace(
            out,
            self.client_id,
            mask_peers(self.client_id, reporters, neighbors),
            self.secrets,
            round_index,
            region,
            scratch=self._scratch,
        )

    def decode(self, total: np.ndarray) -> np.ndarray:
        return decode(total, self.frac_bits)
