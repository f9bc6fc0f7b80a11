"""Under mpirun: one aggregation per method on random client models, checked on rank 0
against a pure-numpy size-weighted average of what the clients uploaded.

usage: mpirun -n W python tests/mpi_scripts/aggregate_check.py BACKEND
Prints "AGGREGATE OK <method>" per method on rank 0; exits non-zero on a mismatch.
"""

import sys

import numpy as np
import torch

from fedmpi.dist.world import World
from fedmpi.fl.aggregate import Aggregator
from fedmpi.fl.ledger import Ledger
from fedmpi.fl.methods import METHODS, fedavg, make_plan
from fedmpi.model.regions import REGIONS, flatten, region_sizes
from fedmpi.model.unet import UNet

world = World(sys.argv[1])
world.start_backend(torch.device("cpu"))
K = world.num_clients


def check_methods(tag: str) -> None:
    """One exchange per method, checked against numpy's FedAvg; prints "AGGREGATE OK"."""
    for m_index, method in enumerate(METHODS):
        torch.manual_seed(1000 * m_index + world.rank)  # every rank a different model
        model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
        sizes = region_sizes(model)
        n_k = float(10 + 7 * world.rank)  # unequal client sizes
        plan = make_plan(method, 3, K, seed=11)
        before = {r: flatten(model, r) for r in REGIONS}
        fed_before = world.comm.bcast(before if world.is_federator else None, root=0)
        uploads = world.comm.gather((before, n_k), root=0)
        ledger = Ledger(world.rank)
        Aggregator(world, model, ledger).exchange(plan, [10 + 7 * (k + 1) for k in range(K)], 3)
        # the ledger holds exactly the bytes handed to the collectives: [w_k theta, w_k] up
        # (float32, + 1 value) and theta down, for the regions this rank takes part in
        mine = ledger.pop_round(3)
        expect = 0
        for region in REGIONS:
            n = sizes[region]
            if world.is_federator:
                expect += 4 * (n + 1) * len(plan.uploaders(region)) + 4 * n * len(
                    plan.receivers(region)
                )
            else:
                expect += 4 * (n + 1) * (region in plan.uploads[world.client])
                expect += 4 * n * (region in plan.downloads[world.client])
        if sum(r["bytes"] for r in mine) != expect:
            print(f"LEDGER MISMATCH {method} rank {world.rank}", flush=True)
            world.abort(4)
        after = {r: flatten(model, r) for r in REGIONS}
        results = world.comm.gather(after, root=0)
        if world.is_federator:
            for region in REGIONS:
                ups = plan.uploaders(region)
                expected = (
                    fedavg(
                        [uploads[k + 1][0][region] for k in ups], [uploads[k + 1][1] for k in ups]
                    )
                    if ups
                    else fed_before[region]
                )
                for k in range(K):
                    got = results[k + 1][region]
                    if region in plan.downloads[k]:
                        ok = np.allclose(got, expected, rtol=1e-5, atol=1e-6)
                    else:  # personal: untouched
                        ok = np.array_equal(got, uploads[k + 1][0][region])
                    if not ok:
                        print(f"MISMATCH {method} client {k} region {region}", flush=True)
                        world.abort(3)
            print(f"{tag}AGGREGATE OK {method}", flush=True)


check_methods("")
# The same through host staging, emulated on the CPU: every tensor but the federator's zero
# summand is "device memory" the transport copies through its host buffers (what happens
# to CUDA tensors without CUDA-aware MPI, or with gloo when ranks share a GPU).
host_memory = set()
zeros_of = Aggregator.zeros


def zeros_on_host(self, region):
    z = zeros_of(self, region)
    host_memory.add(z.untyped_storage().data_ptr())
    return z


Aggregator.zeros = zeros_on_host
world.backend.stages_on_host = lambda t: t.untyped_storage().data_ptr() not in host_memory
staged, staged_of = [], world.staged
world.staged = lambda t, sends=True: staged.append(t.numel()) or staged_of(t, sends)
check_methods("STAGED ")
if not staged:
    print(f"STAGING NOT EXERCISED rank {world.rank}", flush=True)
    world.abort(9)
world.staged = staged_of
del world.backend.stages_on_host  # the backend's own method again
Aggregator.zeros = zeros_of

# A non-finite average (in a job: float32 overflow of finite uploads; here client 1 uploads
# inf in its decoder) is broadcast, then found by the federator's one check, which names
# the region; the clients are not held up by it.
from fedmpi.fl.aggregate import NonFiniteAverage

model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
agg = Aggregator(world, model, Ledger(world.rank))
if world.rank == 1:
    agg.flat["decoder"].fill_(float("inf"))
try:
    agg.exchange(make_plan("full", 1, K, seed=11), [1] * K, 1)
    outcome = "no error"
except NonFiniteAverage as e:
    outcome = str(e)
if world.is_federator:
    if "region(s) decoder is not finite" not in outcome:
        print(f"NONFINITE CHECK FAILED: {outcome}", flush=True)
        world.abort(5)
    print("NONFINITE OK", flush=True)
elif outcome != "no error" or torch.isfinite(agg.flat["decoder"]).all():
    print(f"NONFINITE CLIENT FAILED rank {world.rank}: {outcome}", flush=True)
    world.abort(6)

# The subgroup cache (USPLIT asks for new reporter sets every round): with room for 2,
# every proper subgroup of the world, twice over, is built, evicted (freed) and built
# again on every rank in the same order, and each still sums correctly.
import itertools

world.backend.CACHE = 2
subsets = [(0, *c) for n in range(1, K) for c in itertools.combinations(range(1, K + 1), n)]
for members in subsets * 2:
    group = world.backend.group(members)
    if group.is_member:
        t = torch.tensor([float(world.rank)])
        world.reduce_sum(group, t)
        if world.is_federator and t.item() != sum(members):
            print(f"GROUP CACHE FAILED {members}: {t.item()}", flush=True)
            world.abort(7)
    world.release(group)
cached = world.backend.cache if hasattr(world.backend, "cache") else world.backend.groups
if len(cached) > 2:
    print(f"GROUP CACHE FAILED rank {world.rank}: {len(cached)} groups kept", flush=True)
    world.abort(8)
if world.is_federator:
    print(f"GROUP CACHE OK ({len(subsets)} subgroups twice, 2 kept)", flush=True)
world.close()
