"""Compressed client updates (fed.compress): fewer bytes per upload, and the collective
that sums them.

What is compressed is a client's update of a region, p = theta - start (its weights
after local training minus the round's global weights), plus, with error feedback
(fed.error_feedback, EF: Seide et al. 2014, Karimireddy et al. 2019), the residual e that
earlier rounds did not send: p = theta - start + e, then e := p - decompress(compress(p)).
The federator rebuilds the round's average as before + sum_k w_k * decompress(c_k), with
the FedAvg weights w_k known on every rank (`RegionRound.weights`). Downloads stay
float32 (the global weights; an int8 reporter also receives the region's scales).

Scheme, payload (P values in the region, k = ceil(fed.topk_fraction * P)), collective:

- bf16: p rounded to bfloat16, 2 P bytes. A linear Gather to the federator (MPI has no
  bfloat16 type, and a Reduce in 16 bits would round every partial sum); the federator
  widens each upload to float32 and adds them in rank order (deterministic).
- int8: a scale per block of INT8_BLOCK = 1,024 values agreed first, s_b = max_k max
  |w_k p_k| / L over the block, with L = floor(127 / m) for m reporting ranks (a MAX
  Reduce of the block maxima and its Bcast: `World.agree_max`); each client sends
  q_k = round(w_k p_k / s) in [-L, L] as one byte per value, and one uint8 SUM Reduce
  (modulo 2^8) yields sum_k q_k exactly, which fits in [-127, 127] by the choice of L.
  P + 4 ceil(P / 1024) bytes up (and the agreed scales down). With error feedback the
  rounding is to nearest (the residual carries its error); without, it is stochastic
  (unbiased, QSGD-style), its randomness drawn from the run seed, round, region and
  rank, so resume is bit-exact either way. The sum is modular, so pairwise masks modulo
  2^8 cancel in it: int8 is the scheme that works with fed.secure
  (`fedmpi.fl.masks.mask_inplace`).
- topk: the k entries of largest |p|, as int32 indices and float32 values, 8 k bytes. A
  linear Gather (every client picks different indices: no sum on the wire is possible);
  the federator scatter-adds w_k * value in rank order.

A rank hosting several clients (fed.clients > ranks) uploads the mean of its clients'
models, so it is the rank that compresses and keeps the error-feedback residual (one per
rank and region, `ErrorFeedback`), as it is the rank that masks under fed.secure.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmpi.fl.strategy import AggregationStrategy, host_view
from fedmpi.model.regions import REGIONS

SCHEMES = ("none", "bf16", "int8", "topk")
INT8_MAX = 127
INT8_BLOCK = 1024  # values per int8 scale (one float32 scale per block, each way)


def topk_count(params: int, fraction: float) -> int:
    """k: how many entries a top-k upload of `params` values keeps (at least 1)."""
    return min(params, max(1, math.ceil(fraction * params)))


def int8_levels(reporters: int) -> int:
    """L: the largest |q| a client may send when `reporters` ranks add their int8 values
    (their sum must stay within [-127, 127])."""
    return INT8_MAX // max(1, reporters)


def int8_blocks(params: int) -> int:
    """How many int8 scales a region of `params` values has (one per INT8_BLOCK)."""
    return -(-params // INT8_BLOCK)


def payload_bytes(scheme: str, params: int, topk_fraction: float = 0.01) -> int:
    """Bytes a client hands to MPI to upload a region of `params` values."""
    if scheme == "bf16":
        return 2 * params
    if scheme == "int8":
        return params + scale_bytes(scheme, params)
    if scheme == "topk":
        return 8 * topk_count(params, topk_fraction)
    raise ValueError(f"no compressed payload for fed.compress={scheme!r}")


def scale_bytes(scheme: str, params: int) -> int:
    """Bytes of a region's agreed scales (int8: one float32 per block; else none): a
    reporter sends its block maxima and receives the agreed ones."""
    return 4 * int8_blocks(params) if scheme == "int8" else 0


# --- the codecs (pure, host memory) ----------------------------------------------------


def encode_bf16(p: np.ndarray) -> np.ndarray:
    """p rounded to bfloat16 (round to nearest even), as 2 P bytes."""
    return torch.from_numpy(p).to(torch.bfloat16).view(torch.uint8).numpy()


def decode_bf16(payload: np.ndarray) -> np.ndarray:
    return torch.from_numpy(payload).view(torch.bfloat16).float().numpy()


def encode_topk(p: np.ndarray, k: int) -> np.ndarray:
    """The k entries of largest |p| as [int32 indices (ascending), float32 values]."""
    idx = np.sort(np.argpartition(np.abs(p), p.size - k)[p.size - k :]).astype(np.int32)
    return np.concatenate([idx.view(np.uint8), p[idx].astype(np.float32).view(np.uint8)])


def decode_topk(payload: np.ndarray, size: int) -> np.ndarray:
    """The dense float32 vector of `size` values that a top-k payload stands for."""
    k = payload.size // 8
    idx = payload[: 4 * k].view(np.int32)
    out = np.zeros(size, np.float32)
    out[idx] = payload[4 * k :].view(np.float32)
    return out


def block_max(v: np.ndarray) -> np.ndarray:
    """max |v| over each INT8_BLOCK values (the last block may be shorter), float32."""
    padded = np.zeros(int8_blocks(v.size) * INT8_BLOCK, np.float32)
    padded[: v.size] = np.abs(v)
    return padded.reshape(-1, INT8_BLOCK).max(axis=1)


def per_value(scales: np.ndarray, size: int) -> np.ndarray:
    """Each value's block scale."""
    return np.repeat(scales.astype(np.float32), INT8_BLOCK)[:size]


def quantize_int8(v: np.ndarray, scale, levels: int, rng: np.random.Generator | None):
    """v / scale rounded to integers in [-levels, levels], as int8. `scale`: one per
    value (0: that value sends 0). `rng`: stochastic rounding (unbiased, E[q] * scale =
    v), else round to nearest (with error feedback, which carries the rounding error)."""
    scale = np.broadcast_to(np.asarray(scale, np.float32), v.shape)
    x = np.divide(v, scale, out=np.zeros(v.size, np.float32), where=scale > 0)
    q = np.floor(x + rng.random(v.size, dtype=np.float32)) if rng is not None else np.rint(x)
    return np.clip(q, -levels, levels).astype(np.int8)


def rounding_rng(seed: int, round_index: int, region: str, slot: int) -> np.random.Generator:
    """The int8 rounding's random stream of one rank, region and round (resume-exact)."""
    return np.random.default_rng([int(seed), int(round_index), REGIONS.index(region), slot])


class ErrorFeedback:
    """A rank's residuals: per region, what its compressed uploads have not yet sent
    (float32, on the host). Checkpointed with the rank (`state_dict`)."""

    def __init__(self):
        self.residual: dict[str, np.ndarray] = {}

    def add_to(self, region: str, p: np.ndarray) -> None:
        e = self.residual.get(region)
        if e is not None:
            p += e

    def keep(self, region: str, p: np.ndarray, sent: np.ndarray) -> None:
        """e := p - sent (what this upload left out)."""
        self.residual[region] = (p - sent).astype(np.float32)

    def state_dict(self) -> dict:
        return {r: torch.from_numpy(e.copy()) for r, e in sorted(self.residual.items())}

    def load_state_dict(self, state: dict) -> None:
        self.residual = {r: t.numpy().astype(np.float32) for r, t in state.items()}


class CompressedFedAvg(AggregationStrategy):
    """FedAvg of compressed updates (see the module docstring), optionally with error
    feedback and, for int8, with secure aggregation's pairwise masks (`secure`: a
    `fedmpi.fl.secure.SecureFedAvg` after its key agreement, whose pair secrets and
    neighbours it uses). `seed`: the run seed (int8's rounding)."""

    federator_summand = False

    def __init__(
        self,
        scheme: str,
        error_feedback: bool = True,
        topk_fraction: float = 0.01,
        seed: int = 0,
        secure=None,
    ):
        if scheme not in SCHEMES[1:]:
            raise ValueError(f"fed.compress must be one of {SCHEMES[1:]}, got {scheme!r}")
        if secure is not None and scheme != "int8":
            raise ValueError(f"fed.secure works with fed.compress=int8 only, not {scheme}")
        self.scheme, self.topk_fraction, self.seed = scheme, float(topk_fraction), int(seed)
        self.feedback = ErrorFeedback() if error_feedback else None
        self.secure = secure
        self.min_reporters = secure.min_reporters if secure is not None else 0
        self._updates: dict[str, np.ndarray | None] = {}
        self._job = None

    @property
    def needs_before(self) -> bool:
        return True  # the average is rebuilt as before + the decompressed sum

    # --- a client -------------------------------------------------------------------
    def begin_round(self, bufs, round_index, client, uploads, start):
        """A client rank's update p (+ its residual) of every region it uploads. Returns
        the L2 norms of its update and of the residual it carries into this round (over
        all those regions: metrics.jsonl's client rows)."""
        self._updates = {}
        if client is None:
            return {}
        norms = {"update_norm": 0.0, "ef_residual_norm": 0.0}
        if start is None:
            raise RuntimeError("fed.compress needs the rank's weights at the round's start")
        for job in uploads:
            if job.size_of(client) <= 0:  # left out (fed.on_nonfinite: skip): zeros
                self._updates[job.region] = None
                continue
            p = host_view(bufs.flat[job.region]) - host_view(start[job.region])
            p = p.astype(np.float32, copy=False).reshape(-1)
            norms["update_norm"] += float(np.dot(p, p))
            if self.feedback is not None:
                e = self.feedback.residual.get(job.region)
                norms["ef_residual_norm"] += float(np.dot(e, e)) if e is not None else 0.0
                self.feedback.add_to(job.region, p)
            self._updates[job.region] = p
        return {k: v**0.5 for k, v in norms.items()}

    def upload(self, bufs, job, client):
        """The rank's update of the region (None: left out, it sends zeros); `reduce`
        encodes and sends it."""
        self._job = (job, client, bufs.sizes[job.region])
        return self._updates.get(job.region)

    def receive(self, bufs, job):
        """The federator's buffer for the decoded sum_k w_k c_k (no summand of its own)."""
        self._job = (job, None, bufs.sizes[job.region])
        return np.zeros(bufs.sizes[job.region], np.float32), None

    def reduce(self, world, group, buf, own=None) -> int:
        """Encode and send (a client: `buf` is its update) or receive and decode into
        `buf` (the federator). Returns the bytes one client handed to MPI (the ledger's)."""
        job, slot, size = self._job
        if self.scheme == "int8":
            return self._reduce_int8(world, group, job, slot, size, buf)
        nbytes = payload_bytes(self.scheme, size, self.topk_fraction)
        if slot is not None:  # a client: encode, send, keep the residual
            p = buf
            if p is None:
                payload = np.zeros(nbytes, np.uint8)
                if self.scheme == "topk":  # k distinct indices (of value 0)
                    k = nbytes // 8
                    payload[: 4 * k] = np.arange(k, dtype=np.int32).view(np.uint8)
            elif self.scheme == "bf16":
                payload = encode_bf16(p)
            else:
                payload = encode_topk(p, topk_count(size, self.topk_fraction))
            world.gather_bytes(group, payload, None)
            if p is not None and self.feedback is not None:
                self.feedback.keep(job.region, p, self._decode(payload, size))
            return nbytes
        rows = np.empty((len(job.uploaders), nbytes), np.uint8)
        world.gather_bytes(group, np.empty(0, np.uint8), rows)
        for w, row in zip(job.weights, rows):  # rank order: the same sum every run
            if w > 0:
                buf += np.float32(w) * self._decode(row, size)
        return nbytes

    def _decode(self, payload: np.ndarray, size: int) -> np.ndarray:
        return decode_bf16(payload) if self.scheme == "bf16" else decode_topk(payload, size)

    def _reduce_int8(self, world, group, job, slot, size, buf) -> int:
        """The scales' agreement (per block of values, the MAX of max |w_k p_k| over the
        reporters), then one uint8 SUM Reduce of the (masked) rounded values."""
        levels = int8_levels(sum(n > 0 for n in job.sizes))
        amax = np.zeros(int8_blocks(size), np.float32)
        w = 0.0
        if slot is not None:
            w = job.weights[job.uploaders.index(slot)]
            if buf is not None:
                v = np.float32(w) * buf
                amax = block_max(v)
        world.agree_max(group, amax)
        scale = per_value(amax / np.float32(levels), size)
        if slot is None:  # the federator: the sum of the q_k, times the scales
            total = np.zeros(size, np.uint8)
            world.reduce_sum_u8(group, total)
            buf += total.view(np.int8).astype(np.float32) * scale
            return payload_bytes("int8", size)
        q = np.zeros(size, np.int8)
        if buf is not None:
            # error feedback carries the rounding error: round to nearest; else unbiased
            rng = None
            if self.feedback is None:
                rng = rounding_rng(self.seed, job.round_index, job.region, slot)
            q = quantize_int8(v, scale, levels, rng)
        if buf is not None and self.feedback is not None:
            sent = q.astype(np.float32) * scale / np.float32(w)
            self.feedback.keep(job.region, buf, sent)
        words = q.view(np.uint8)  # two's complement: the modular sum is sum q mod 2^8
        if self.secure is not None:  # masked in place (q is spent)
            from fedmpi.fl.masks import mask_inplace, mask_peers

            agg = self.secure.client
            peers = mask_peers(slot, job.uploaders, self.secure.neighbors)
            mask_inplace(words, slot, peers, agg.secrets, job.round_index, job.region)
        world.reduce_sum_u8(group, words)
        return payload_bytes("int8", size)

    def finish(self, bufs, job, total):
        """The federator: theta := before + the decoded weighted sum of the updates."""
        if not job.reported:
            return False  # every reporter was left out: the region keeps its weights
        theta = bufs.flat[job.region]
        with torch.no_grad():
            decoded = torch.from_numpy(total).to(theta.device).view_as(theta)
            torch.add(bufs.before(job.region), decoded, out=theta)
        return True

    def state_dict(self) -> dict | None:
        """The error-feedback residuals (a client rank's checkpoint), else None."""
        return self.feedback.state_dict() if self.feedback is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.feedback is not None:
            self.feedback.load_state_dict(state or {})
