"""Under mpirun: one aggregation per method on random client models, checked on rank 0
against a pure-numpy size-weighted average of what the clients uploaded.

usage: mpirun -n W python tests/mpi_scripts/aggregate_check.py BACKEND
Prints "AGGREGATE OK <method>" per method on rank 0; exits non-zero on a mismatch.
"""
import sys

import numpy as np
import torch

from fedmpi.comm import World
from fedmpi.federated import _exchange
from fedmpi.ledger import Ledger
from fedmpi.methods import METHODS, fedavg, make_plan
from fedmpi.regions import REGIONS, bind_flat, flatten, region_sizes
from fedmpi.unet import UNet

world = World(sys.argv[1])
world.start_backend(torch.device("cpu"))
K = world.num_clients
for m_index, method in enumerate(METHODS):
    torch.manual_seed(1000 * m_index + world.rank)  # every rank a different model
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    if world.rank % 2 == 0:  # both paths: in-place flat buffers and copies
        bind_flat(model)
    sizes = region_sizes(model)
    n_k = float(10 + 7 * world.rank)  # unequal client sizes
    plan = make_plan(method, 3, K, seed=11)
    before = {r: flatten(model, r) for r in REGIONS}
    fed_before = world.comm.bcast(before if world.is_federator else None, root=0)
    uploads = world.comm.gather((before, n_k), root=0)
    _exchange(world, plan, model, n_k, Ledger(world.rank), sizes, 3)
    after = {r: flatten(model, r) for r in REGIONS}
    results = world.comm.gather(after, root=0)
    if world.is_federator:
        for region in REGIONS:
            ups = plan.uploaders(region)
            expected = (fedavg([uploads[k + 1][0][region] for k in ups],
                               [uploads[k + 1][1] for k in ups]) if ups else fed_before[region])
            for k in range(K):
                got = results[k + 1][region]
                if region in plan.downloads[k]:
                    ok = np.allclose(got, expected, rtol=1e-5, atol=1e-6)
                else:  # personal: untouched
                    ok = np.array_equal(got, uploads[k + 1][0][region])
                if not ok:
                    print(f"MISMATCH {method} client {k} region {region}", flush=True)
                    world.abort(3)
        print(f"AGGREGATE OK {method}", flush=True)
world.close()
