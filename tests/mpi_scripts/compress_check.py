"""Under mpirun: compressed aggregation (fed.compress) checked against the
decompress-then-average of what the clients actually sent.

usage: mpirun -n W python tests/mpi_scripts/compress_check.py BACKEND SCHEME SECURE METHOD
       ROUNDS [wire] [noef]

Each round every client moves its weights by random noise, then one real
`Aggregator.exchange` runs with `CompressedFedAvg` (built by `make_strategy` from a
config, as a job does). The codec functions are wrapped to record each client's payload
(bf16, top-k) or its unmasked int8 values and scale; rank 0 rebuilds every region as
before + sum_k w_k decode(payload_k) and compares: int8 bit-exactly (integer sum), bf16
and top-k within float32 accumulation (rtol 1e-6). Each client also checks its
error-feedback residual (e = p - decode(payload), and next round's p = update + e).
Prints "COMPRESS OK ..." on rank 0; exits non-zero on a mismatch.

With `noef`: fed.error_feedback=false (int8 rounds stochastically). With `wire`: no checks and no extra messages (pml monitoring counts the run's bytes);
rank 0 prints "LEDGER BYTES <n>", the bytes the ledger says the exchanges moved.
"""

import sys

import numpy as np
import torch

import fedmpi.fl.compress as compress
from fedmpi.config import load_config
from fedmpi.dist.world import World
from fedmpi.fl.aggregate import Aggregator
from fedmpi.fl.ledger import Ledger, client_rows
from fedmpi.fl.methods import make_plan
from fedmpi.model.regions import REGIONS
from fedmpi.model.unet import UNet

backend, scheme, secure, method, rounds = sys.argv[1:6]
flags = set(sys.argv[6:])  # wire: bytes only; noef: fed.error_feedback=false
wire = "wire" in flags
secure, rounds = secure == "secure", int(rounds)
world = World(backend)
world.start_backend(torch.device("cpu"))
K = world.num_clients
cfg = load_config(
    None,
    [
        f"--fed.method={method}",
        f"--fed.compress={scheme}",
        f"--fed.secure={str(secure).lower()}",
        "--fed.topk_fraction=0.05",
        "--run.seed=5",
        f"--fed.error_feedback={str('noef' not in flags).lower()}",
    ],
)
torch.manual_seed(0)  # the same initial model everywhere
model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
ledger = Ledger(world.rank)
agg = Aggregator(world, model, ledger, cfg)
strategy = agg.strategy

sent: dict = {}  # region -> what this client's codec produced this round
if not wire:
    for name in ("encode_bf16", "encode_topk"):
        real = getattr(compress, name)

        def capture(p, *args, _real=real):
            out = _real(p, *args)
            sent[strategy._job[0].region] = (p.copy(), out.copy())
            return out

        setattr(compress, name, capture)
    real_q = compress.quantize_int8

    def capture_q(v, scale, levels, rng):
        q = real_q(v, scale, levels, rng)
        sent[strategy._job[0].region] = (v.copy(), q.copy(), np.array(scale, np.float32))
        return q

    compress.quantize_int8 = capture_q


def fail(msg: str, code: int) -> None:
    print(f"MISMATCH {scheme} {method} secure={secure}: {msg}", flush=True)
    world.abort(code)


rng = np.random.default_rng(100 + world.rank)
sizes = [10 + 7 * (k + 1) for k in range(K)]
residual_before: dict = {}
for r in range(1, rounds + 1):
    plan = make_plan(method, r, K, seed=cfg.run.seed)
    start = {reg: agg.flat[reg].clone() for reg in REGIONS}
    if world.trains:
        for reg in REGIONS:  # local "training": a random step of a different size per rank
            step = rng.standard_normal(agg.flat[reg].numel()).astype(np.float32)
            agg.flat[reg].add_(torch.from_numpy(step * 1e-2 * world.rank))
    update = {reg: (agg.flat[reg] - start[reg]).numpy().copy() for reg in REGIONS}
    before = {reg: agg.flat[reg].clone() for reg in REGIONS}
    if getattr(strategy, "feedback", None) is not None:
        residual_before = {k: v.copy() for k, v in strategy.feedback.residual.items()}
    sent.clear()
    agg.exchange(plan, sizes, r, start=start)
    if wire:
        continue
    # a client: p = update + residual; the new residual is p - what was sent
    if world.trains:
        for reg, got in sent.items():
            w = agg.reporting(plan, sizes)[reg][1]
            w = w[agg.reporting(plan, sizes)[reg][0].index(world.client)] / sum(w)
            p = update[reg] + residual_before.get(reg, 0)
            if scheme == "int8":
                v, q, scale = got
                if not np.allclose(v, np.float32(w) * p, rtol=1e-6, atol=1e-9):
                    fail(f"rank {world.rank} {reg}: int8 input is not w (update + e)", 3)
                decoded = q.astype(np.float32) * scale / np.float32(w)
            else:
                if not np.allclose(got[0], p, rtol=1e-6, atol=1e-9):
                    fail(f"rank {world.rank} {reg}: the update sent is not update + e", 3)
                decoded = (
                    compress.decode_bf16(got[1])
                    if scheme == "bf16"
                    else compress.decode_topk(got[1], p.size)
                )
            if strategy.feedback is not None:
                e = strategy.feedback.residual[reg]
                if not np.allclose(e, p - decoded, rtol=1e-5, atol=1e-8):
                    fail(f"rank {world.rank} {reg}: residual is not p - decoded", 4)
    everything = world.comm.gather(dict(sent), root=0)
    after = {reg: agg.flat[reg].numpy().copy() for reg in REGIONS}
    results = world.comm.gather(after, root=0)
    if not world.is_federator:
        continue
    reporting = agg.reporting(plan, sizes)
    for reg in REGIONS:
        if reg not in reporting:
            continue
        slots, ns = reporting[reg]
        ws = [n / sum(ns) for n in ns]
        b = before[reg].numpy()
        if scheme == "int8":
            total = sum(everything[s + 1][reg][1].astype(np.int64) for s in slots)
            scales = [everything[s + 1][reg][2] for s in slots]
            same = all(np.array_equal(x, scales[0]) for x in scales)
            if not same or np.abs(total).max() > 127:
                fail(f"{reg}: scales agree {same}, |sum q| max {np.abs(total).max()}", 5)
            want = b + total.astype(np.float32) * scales[0]
            ok = np.array_equal(after[reg], want)

        else:
            acc = np.zeros(b.size, np.float64)
            for s, w in zip(slots, ws):
                payload = everything[s + 1][reg][1]
                dec = (
                    compress.decode_bf16(payload)
                    if scheme == "bf16"
                    else compress.decode_topk(payload, b.size)
                )
                acc += w * dec.astype(np.float64)
            want = b + acc
            ok = np.allclose(after[reg], want, rtol=1e-6, atol=1e-7)
        if not ok:
            fail(f"round {r} region {reg}: max |diff| {np.abs(after[reg] - want).max()}", 6)
        for k in range(K):  # every client received the federator's new weights
            if reg in plan.downloads[k] and not np.array_equal(results[k + 1][reg], after[reg]):
                fail(f"round {r} region {reg}: client {k} holds other weights", 7)

# one fixed-size message, so that runs of different lengths differ on the wire only by
# their exchanges
mine = sum(row["bytes"] for row in client_rows(ledger.dicts()) if row["round"] > 0)
total = world.reduce_array(np.array([mine], np.int64))
if world.is_federator:
    if wire:
        print(f"LEDGER BYTES {int(total[0])}", flush=True)
    else:
        print(f"COMPRESS OK {scheme} {method} secure={secure} rounds={rounds}", flush=True)
world.close()
