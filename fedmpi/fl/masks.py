"""Pairwise masks of secure aggregation (fed.secure): key agreement and mask streams.

This module owns the cryptography of `fedmpi.fl.secure`'s protocol, and moves no bytes:

1. Once per run every client makes an X25519 key pair (`make_keypair`) and sends
   `public_bytes(key)` to the federator, which relays all of them back. Each client
   derives a 32-byte secret per peer (`derive_secrets`): HKDF-SHA256 over the X25519
   shared key, with both client ids (canonical order) and the run id in `info`, so a
   secret is bound to one pair in one run.
2. Per (round, region) each pair expands its secret with HKDF into an AES-256-CTR key
   and draws a uint64 mask stream (`mask_stream`). AES-CTR rather than ChaCha20
   because AES-NI makes it ~1.6x faster here; both are in `cryptography`.
3. A client adds the masks of the pairs where it has the lower id to its encoded upload
   and subtracts those where it has the higher one, modulo 2^64 (`mask_inplace`).
   `mask_peers` can restrict the pairs to a ring of 2k neighbours, so a client's cost
   stops growing with the reporter count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmpi.fl.fixedpoint import CHUNK, SecureAggError

_SECRET_BYTES = 32


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
    """Add (me < peer) or subtract (me > peer) each pair's mask, modulo 2^64 for a uint64
    buffer (fixed point) or 2^8 for a uint8 one (int8-compressed uploads), in place.
    `peers`: the other reporters of this region in this round (own id skipped), as the
    plan gives them, or `mask_peers(...)` of them; subsets differ per region, so every
    reporter must derive its peers from the same set. The masks are the pair's AES-CTR
    keystream read as buf's dtype (`mask_stream`'s for uint64), drawn chunk by chunk
    (`scratch`: optional uint64 buffer, reused across calls).
    """
    if buf.dtype not in (np.uint64, np.uint8) or not buf.flags.c_contiguous:
        raise ValueError(f"mask_inplace needs a contiguous uint64 or uint8 buffer, got {buf.dtype}")
    width = buf.dtype.itemsize
    flat = buf.reshape(-1)
    pairs = []
    for peer in sorted({int(p) for p in peers} - {me}):
        if peer not in secrets:
            raise SecureAggError(
                f"client {me} has no pair secret with client {peer}; run the key "
                "exchange (derive_secrets) over all clients before round 1"
            )
        # unsigned arithmetic wraps modulo 2^(8 * width)
        pairs.append(
            (_mask_cipher(secrets[peer], round_index, region), np.add if me < peer else np.subtract)
        )
    if scratch is None or scratch.size < CHUNK + 2:
        scratch = np.empty(CHUNK + 2, np.uint64)
    out_bytes = memoryview(scratch).cast("B")  # CTR's update_into wants 15 spare bytes
    stream = scratch.view(buf.dtype)
    zeros = _Zeros.get(width * CHUNK)
    for i in range(0, flat.size, CHUNK):
        part = flat[i : i + CHUNK]
        mask = stream[: part.size]
        for enc, op in pairs:
            enc.update_into(zeros[: width * part.size], out_bytes)
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
