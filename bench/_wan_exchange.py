"""Under mpirun (bench/wan.py launches it inside the namespaced network): the time of a
round's exchange for each method x upload scheme, with the code a job runs.

For each combination, every rank builds the config's UNet (same seed), binds its flat
regions as a run does and builds the `Aggregator` the job would (`make_strategy` from the
config: plain, or `CompressedFedAvg`). Then --rounds + 1 rounds: the clients move their
weights by a small random step (the stand-in for local training, which this script does
not time), all ranks meet, and `Aggregator.exchange` runs; its time is the slowest
rank's. Round 1 (which creates the subgroups) is discarded; the median of the rest is the
communication seconds per round. Bytes per round come from the ledger (client rows).

usage: mpirun -n 3 python bench/_wan_exchange.py --config C --combos full:none,udec:int8+EF
       --rounds 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedmpi.config import load_config
from fedmpi.dist.world import World
from fedmpi.fl.aggregate import Aggregator
from fedmpi.fl.ledger import Ledger, client_rows
from fedmpi.fl.methods import make_plan
from fedmpi.model.regions import REGIONS, bind_flat
from fedmpi.model.summary import model_shape
from fedmpi.model.unet import build_unet

SCHEME_FLAGS = {
    "none": [],
    "bf16": ["--fed.compress=bf16", "--fed.error_feedback=false"],
    "int8+EF": ["--fed.compress=int8", "--fed.error_feedback=true"],
    "topk+EF": ["--fed.compress=topk", "--fed.error_feedback=true"],
}


def one(world, config: str, method: str, scheme: str, rounds: int, topk: float) -> dict:
    cfg = load_config(
        config, [f"--fed.method={method}", f"--fed.topk_fraction={topk}", *SCHEME_FLAGS[scheme]]
    )
    torch.manual_seed(cfg.run.seed)
    model = build_unet(cfg.model, *model_shape(cfg))
    bind_flat(model)
    ledger = Ledger(world.rank)
    agg = Aggregator(world, model, ledger, cfg)
    rng = np.random.default_rng(world.rank)
    K = world.num_clients
    times = []
    for r in range(1, rounds + 2):
        start = {reg: agg.flat[reg].clone() for reg in REGIONS}
        if world.trains:
            for reg in REGIONS:
                step = rng.standard_normal(agg.flat[reg].numel()).astype(np.float32) * 1e-3
                agg.flat[reg].add_(torch.from_numpy(step))
        world.comm.Barrier()
        t0 = time.perf_counter()
        agg.exchange(make_plan(method, r, K, cfg.run.seed), [1] * K, r, start=start)
        took = world.comm.allreduce(time.perf_counter() - t0, op=world.MPI.MAX)
        if r > 1:
            times.append(took)
    rows = [row for row in client_rows(ledger.dicts()) if row["round"] > 1]
    mine = sum(row["bytes"] for row in rows)
    total = world.comm.allreduce(mine)
    return {
        "method": method,
        "scheme": scheme,
        "comm_s": statistics.median(times),
        "bytes_per_round": total / rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--combos", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--topk-fraction", type=float, default=0.01)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    world = World("mpi")
    world.start_backend(torch.device("cpu"))
    torch.set_num_threads(1)
    results = []
    for combo in args.combos.split(","):
        method, scheme = combo.split(":")
        results.append(one(world, args.config, method, scheme, args.rounds, args.topk_fraction))
        if world.is_federator:
            r = results[-1]
            print(
                f"{method} {scheme}: {r['comm_s']:.3f} s/round, "
                f"{r['bytes_per_round'] / 1e6:.2f} MB/round",
                flush=True,
            )
    if world.is_federator:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    world.close()


if __name__ == "__main__":
    main()
