"""The timed pieces of bench/comm.py, run on every rank under MPI.

The floor (`RawCollectives`, `floor_once`: the backend's bare Reduce / Bcast on
communicators created as `Aggregator.exchange` creates them), the local steps of a plain
and of a secure exchange alone (`host_once`, `secure_host_once`), which methods fed.secure
refuses (`secure_refusal`), the byte ledger against the analytical rows (`ledger_check`),
and the diagnostics (`count_host_copies`, `print_profile`). All of it calls fedmpi's own
code (`fedmpi.fl`, `fedmpi.model.regions`), never a copy.
"""

from __future__ import annotations

import time


class RawCollectives:
    """The floor: the backend's bare Reduce / Bcast on preallocated buffers."""

    def __init__(self, world, sizes):
        self.world = world
        self.torch_backend = world.backend_name == "torch"
        import numpy as np

        if self.torch_backend:
            import torch
            import torch.distributed as dist

            self.dist = dist
            dev = world.backend.device
            self.up = {r: torch.zeros(n + 1, device=dev) for r, n in sizes.items()}
            self.down = {r: torch.zeros(n, device=dev) for r, n in sizes.items()}
        else:
            self.up = {r: np.zeros(n + 1, np.float32) for r, n in sizes.items()}
            self.recv = {
                r: (np.empty(n + 1, np.float32) if world.is_federator else None)
                for r, n in sizes.items()
            }
            self.down = {r: np.zeros(n, np.float32) for r, n in sizes.items()}

    def reduce(self, group, region):
        if self.torch_backend:
            self.dist.reduce(self.up[region], dst=0, op=self.dist.ReduceOp.SUM, group=group.handle)
        else:
            group.handle.Reduce(self.up[region], self.recv[region], op=self.world.MPI.SUM, root=0)

    def bcast(self, group, region):
        if self.torch_backend:
            self.dist.broadcast(self.down[region], src=0, group=group.handle)
        else:
            group.handle.Bcast(self.down[region], root=0)

    def sync(self):
        if self.torch_backend and self.world.backend.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.world.backend.device)


def _groups(world, plan, regions):
    """Per region (up_group, down_group), created exactly as `Aggregator.exchange` does."""
    out = []
    for region in regions:
        ups, downs = plan.uploaders(region), plan.receivers(region)
        up = world.group(ups) if ups else None
        down = None
        if downs:
            down = up if downs == ups else world.group(downs)
        out.append((region, up, down))
    return out


def _release(world, specs):
    for _, up, down in specs:
        for g in {id(g): g for g in (up, down) if g is not None}.values():
            world.release(g)


def floor_once(world, plan, raw) -> tuple[float, float]:
    """(raw collective seconds, communicator setup seconds) on this rank."""
    from fedmpi.model.regions import REGIONS

    world.comm.Barrier()
    t0 = time.perf_counter()
    specs = _groups(world, plan, REGIONS)
    t_create = time.perf_counter() - t0
    world.comm.Barrier()
    t0 = time.perf_counter()
    for region, up, down in specs:
        if up is not None and up.is_member:
            raw.reduce(up, region)
        if down is not None and down.is_member:
            raw.bcast(down, region)
    raw.sync()
    t_coll = time.perf_counter() - t0
    world.comm.Barrier()
    t0 = time.perf_counter()
    _release(world, specs)
    t_release = time.perf_counter() - t0
    return t_coll, t_create + t_release


def host_once(world, plan, agg, sizes) -> float:
    """The local (non-communication) steps of `Aggregator.exchange` on this rank for this
    plan: the clients' `pack_upload` (w_k * theta; into the aggregator's scratch buffer
    here, so the model is left alone, where the job packs in place: the same one pass),
    the federator's finiteness check of the average. `sizes`: every client's n_k.
    Seconds."""
    import torch

    from fedmpi.fl.methods import fedavg_weights, pack_upload
    from fedmpi.model.regions import REGIONS, finite

    me, fed = world.client, world.is_federator
    world.comm.Barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        for region in REGIONS:
            ups = plan.uploaders(region)
            if not ups or not (fed or me in ups):
                continue
            theta = agg.flat[region]
            if fed:
                finite(theta)
            else:
                w = fedavg_weights([sizes[k] for k in ups])[ups.index(me)]
                pack_upload(theta, w, agg.upload_buffer(region))
    return time.perf_counter() - t0


_SCRATCH: dict = {}


def _scratch_like(t):
    key = (t.numel(), t.dtype, str(t.device))
    if key not in _SCRATCH:
        _SCRATCH[key] = t.clone()
    return _SCRATCH[key]


def secure_host_once(world, plan, sagg, n_k, round_index) -> float:
    """The local steps of the secure exchange on this rank (no communication): a client's
    fixed-point encoding and masking of every region it uploads (`upload_fedavg` with all
    its pair masks), the federator's decoding of every region's sum into a scratch copy of
    its weights. CPU seconds of this process (wall time would count the waits for a core
    when ranks outnumber cores)."""
    import numpy as np

    from fedmpi.fl.secure import decode_average
    from fedmpi.model.regions import REGIONS

    me, fed, sec = world.client, world.is_federator, sagg.secure
    world.comm.Barrier()
    t0 = time.process_time()
    for region in REGIONS:
        ups = plan.uploaders(region)
        if not ups or not (fed or me in ups):
            continue
        theta = sagg.flat[region]
        buf = sec.buffer(region, theta.numel())
        if fed:
            buf[-1] = np.uint64(1 << sec.frac_bits)  # a total weight of 1
            decode_average(buf, sec.frac_bits, _scratch_like(theta).numpy())
        else:
            sec.client.upload_fedavg(
                theta.numpy(), n_k, round_index, region, ups, out=buf, neighbors=sec.neighbors
            )
    return time.process_time() - t0


def secure_refusal(method: str, K: int, rounds: int, seed: int, min_reporters: int):
    """Why fed.secure refuses this method at K clients (a region with one reporter), or None."""
    from fedmpi.fl.methods import make_plan
    from fedmpi.fl.secure import SecureAggError, check_reporters
    from fedmpi.model.regions import REGIONS

    try:
        for r in range(1, rounds + 1):
            plan = make_plan(method, r, K, seed)
            for region in REGIONS:
                check_reporters(region, r, plan.uploaders(region), min_reporters)
    except SecureAggError:
        return f"a region has one reporter at K={K}"
    return None


def ledger_check(world, ledger, method, K, rounds, sizes, seed, value_bytes):
    """(client rows gathered on rank 0, analytical rows, equal?) for this method's ledger."""
    from fedmpi.fl.ledger import FIELDS, analytical_rows, client_rows

    gathered = world.gather(ledger.dicts())
    if not world.is_federator:
        return None, None, True
    got = client_rows([row for rows in gathered for row in rows])
    want = analytical_rows(method, K, rounds, sizes, seed, value_bytes)
    ok = sorted(tuple(x[k] for k in FIELDS) for x in got) == sorted(
        tuple(x[k] for k in FIELDS) for x in want
    )
    return got, want, ok


def count_host_copies(world, fn) -> dict:
    """Host<->device memcpy events (CUDA) while fn() runs on this rank (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    world.comm.Barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {
        "DtoH": sum("Memcpy DtoH" in n for n in names),
        "HtoD": sum("Memcpy HtoD" in n for n in names),
    }


def print_profile(world, profiler):
    import io
    import pstats

    for rank in (0, 1):
        if world.rank == rank and profiler is not None:
            s = io.StringIO()
            pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(15)
            print(
                f"\n## cProfile of the exchange calls on rank {rank} (sorted by own time)\n{s.getvalue()}",
                flush=True,
            )
        world.comm.Barrier()
