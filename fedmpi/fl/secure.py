"""Secure aggregation (fed.secure): pairwise masks that cancel in one integer SUM Reduce.

This module owns the protocol's two ends: a client's key pair, pair secrets and masked
uploads (`SecureAggregator`), the aggregation strategy that runs them in a round
(`SecureFedAvg`), and the set-up check that refuses unsafe plans (`check_reporters`).
The pieces it is built from are `fedmpi.fl.fixedpoint` (encoding, overflow, decoding)
and `fedmpi.fl.masks` (key agreement, mask streams); their names are importable from
here too.

Protocol (honest-but-curious federator, no collusion with clients; an MPI job is
all-or-nothing, so SecAgg's dropout recovery is not needed):

1. Once per run every client makes an X25519 key pair and the federator relays the
   public keys, with a fresh run id (`SecureFedAvg.agree`); each client derives a
   secret per peer (`masks.derive_secrets`).
2. Per (round, region) a client encodes its FedAvg upload [n_k theta_k, n_k] in fixed
   point (`fixedpoint.encode`) and adds or subtracts each pair's AES-CTR mask stream
   modulo 2^64 (`masks.mask_inplace`). Summed over the region's reporters every mask
   appears once with + and once with -, so the SUM Reduce (`MPI.UINT64_T`, or int64 on
   torch: the same bits) yields the plain encoded sum exactly and the federator decodes
   only that (`fixedpoint.decode_average`), within the resolution `fedmpi.fl.fixedpoint`
   states: m * 2^-(F+1) / sum n_k of the exact average.

Intermediate ranks of the reduction (Open MPI's tree, gloo's ring, which also leaves
partial sums in the senders' buffers) only ever see sums of masked uploads: a sum over
a proper subset of the reporters still carries the masks of the pairs that cross it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmpi.fl.fixedpoint import (
    DEFAULT_FRAC_BITS,
    SecureAggError,
    check_overflow,
    decode,
    decode_average,
    encode,
    max_frac_bits,
)
from fedmpi.fl.masks import (
    derive_secrets,
    make_keypair,
    mask_inplace,
    mask_peers,
    mask_stream,
    public_bytes,
)
from fedmpi.fl.strategy import AggregationStrategy, host_view, write_back

__all__ = [
    "DEFAULT_FRAC_BITS",
    "SecureAggError",
    "SecureAggregator",
    "SecureFedAvg",
    "check_overflow",
    "check_reporters",
    "decode",
    "decode_average",
    "derive_secrets",
    "encode",
    "make_keypair",
    "mask_inplace",
    "mask_peers",
    "mask_stream",
    "max_frac_bits",
    "public_bytes",
]


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


# --- the client-side object ----------------------------------------------------------


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
        return self._mask(enc, reporters, round_index, region, neighbors)

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
        return self._mask(out, reporters, round_index, region, neighbors)

    def _mask(self, enc, reporters, round_index: int, region: str, neighbors) -> np.ndarray:
        """Add this client's pair masks to its encoded upload `enc`, in place."""
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

    def decode(self, total: np.ndarray) -> np.ndarray:
        return decode(total, self.frac_bits)


# --- the strategy --------------------------------------------------------------------


class SecureFedAvg(AggregationStrategy):
    """FedAvg through pairwise-masked fixed point: [n_k theta_k, n_k] encoded as uint64
    and masked with the region's other reporters, one uint64 SUM Reduce, the federator
    decodes the sum alone and divides (finite uploads: a finite average).

    A client's side holds its `SecureAggregator` (`client`; None on the federator); every
    rank one uint64 buffer per region (`words`), allocated once per run. `barrier(phase)`:
    called on every rank after the masking (`World.wait_all` in a job; None: none)."""

    value_bytes = 8
    federator_summand = False

    def __init__(
        self,
        client: SecureAggregator | None,
        frac_bits: int = DEFAULT_FRAC_BITS,
        neighbors: int | None = None,
        min_reporters: int = 2,
        barrier=None,
    ):
        self.client, self.frac_bits, self.neighbors = client, int(frac_bits), neighbors
        self.min_reporters, self.barrier = min_reporters, barrier
        self.words: dict[str, np.ndarray] = {}

    @classmethod
    def agree(cls, world, fed_cfg) -> SecureFedAvg:
        """The strategy of `fed_cfg` (fed.secure_*) on this rank, after the key agreement:
        a collective on every rank (the federator relays every client's public key and
        adds a fresh nonce that binds the pair secrets to this job)."""
        frac_bits = fed_cfg.secure_frac_bits
        client = None if world.is_federator else SecureAggregator(world.client, frac_bits)
        mine = os.urandom(16).hex() if world.is_federator else client.public_bytes()
        relayed = world.relay(mine)
        if client is not None:
            client.establish(
                {rank - 1: pub for rank, pub in enumerate(relayed) if rank > 0}, run_id=relayed[0]
            )
        return cls(
            client,
            frac_bits,
            fed_cfg.secure_neighbors,
            fed_cfg.secure_min_reporters,
            world.wait_all,
        )

    def buffer(self, region: str, n: int) -> np.ndarray:
        """The region's uint64[n + 1] upload / sum buffer."""
        buf = self.words.get(region)
        if buf is None:
            buf = self.words[region] = np.empty(n + 1, np.uint64)
        return buf

    def begin_round(self, bufs, round_index, client, uploads, start):
        """A client encodes and masks every region it uploads, with its size n_k there;
        then all ranks meet in a barrier that sleeps while it waits. Masking takes CPU
        time that differs between clients; ranks that finished would otherwise busy-poll
        inside the Reduce, taking the cores of those still masking when ranks share them."""
        for job in uploads:
            theta = bufs.flat[job.region]
            self.client.upload_fedavg(
                host_view(theta),
                job.size_of(client),
                round_index,
                job.region,
                job.uploaders,
                out=self.buffer(job.region, theta.numel()),
                neighbors=self.neighbors,
            )
        if self.barrier is not None:
            self.barrier(f"round {round_index}: secure aggregation (masking)")
        return {}

    def upload(self, bufs, job, client):
        return self.buffer(job.region, bufs.sizes[job.region])  # masked by begin_round

    def receive(self, bufs, job):
        buf = self.buffer(job.region, bufs.sizes[job.region])
        buf.fill(0)
        return buf, None

    def reduce(self, world, group, buf, own=None):
        world.reduce_sum_u64(group, buf)

    def finish(self, bufs, job, total):
        theta = bufs.flat[job.region]
        host = host_view(theta)
        if decode_average(total, self.frac_bits, out=host) > 0:  # else all were left out
            write_back(theta, host)
        return False
