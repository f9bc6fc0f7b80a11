"""Aggregation cost of fedmpi per method against the raw MPI floor, secure aggregation
against plain, plus a byte check.

What it measures (one launch = one world size W = 1 federator + K clients):
for each method (full, usplit, udec, ulatdec) it runs R real aggregation rounds of
`fedmpi.fl.aggregate.Aggregator.exchange` (the code a run calls, not a copy) on the
configured UNet (default: the paper's model, configs/paper/fmnist_full.yaml, 2,996,315
parameters) and reports per round

- the parameters and bytes moved, read from fedmpi's `Ledger` (client side, the rows a
  run writes to comm.csv), checked against `fedmpi.fl.ledger.analytical_rows` for every
  method: `bytes check: PASS|FAIL`;
- agg ms: wall time of the whole `exchange` call (what a run logs as agg_s: sub-
  communicator look-up, pack_upload, Reduce + Bcast, the federator's finiteness check,
  ledger);
- floor ms: in the same run, on communicators created the same way for the same member
  sets (`World.group`), the bare backend collectives on preallocated buffers of exactly
  the same sizes (Reduce of P+1 floats to the federator, Bcast of P floats, per region),
  i.e. the least any implementation of this plan can spend on the wire;
- setup ms (creating + freeing the per-region subcommunicators; MPI_Comm_split on the mpi
  backend, cached new_group on torch) and agg excl. setup ms (fedmpi's own per-region
  timing hook, `exchange(..., timings=)`), so the ratio can be attributed;
- with --secure, in the same run on the same weights: secure ms, the `exchange` of an
  Aggregator with fed.secure (fixed-point encoding, pairwise AES-CTR masks, one uint64
  SUM Reduce, decoding), its ratio to agg ms, its bytes checked against the analytical
  rows at 8 bytes per uploaded value, and secure host ms: the encoding + masking (clients)
  and decoding (federator) alone, in CPU time, slowest rank and summed over ranks. On a
  machine with fewer cores than ranks the clients' masking runs one after another, so the
  secure time is bounded below by that sum / cores; with a core (or node) per rank the
  masking runs in parallel and adds about the slowest rank's time.
  Methods fed.secure refuses at this K (USPLIT at K = 2 or 3) are reported as such.

Each time is the slowest rank's (MAX over ranks after a barrier); every measurement is
repeated (--warmup discarded, then --repeats kept, exchange, floor and secure exchange
interleaved, order alternating) and the median is reported. Local training between rounds is skipped by
default (--local-steps N runs N real LocalTrainer steps per client per round first).

Outputs (rank 0): per-round and summary markdown tables, bench/results/comm_<backend>_W<W>
{_rounds.csv,.csv,.png}. `--sweep 3,5,11` (run WITHOUT mpirun) launches itself once per
world size and backend, merges the tables into comm_<backend>_sweep.{csv,png,md}.

Laptop / workstation (Open MPI from the venv, root needs OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1):
    mpirun -n 3 --oversubscribe --bind-to none python bench/comm.py --quick
    mpirun -n 11 --oversubscribe --bind-to none python bench/comm.py --backend torch
    mpirun -n 11 --oversubscribe --bind-to none python bench/comm.py --quick --secure
    python bench/comm.py --quick --sweep 3,5,11 --backend mpi,torch
Slurm (inside an allocation of enough tasks, or as the body of an sbatch script):
    srun --mpi=pmix -n 11 python bench/comm.py --config configs/paper/fmnist_full.yaml
    python bench/comm.py --sweep 3,5,9,17 --launcher "srun --mpi=pmix -n {n}"
Any trailing --section.key=value is a fedmpi config override (e.g. --model.dim=64).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

DEFAULT_CONFIG = "configs/paper/fmnist_full.yaml"
METHOD_NAMES = ("full", "usplit", "udec", "ulatdec")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/comm.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="fedmpi YAML config (the model)")
    p.add_argument(
        "--backend", default="mpi", help="mpi | torch (with --sweep: a list, e.g. mpi,torch)"
    )
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds per method (default 3; quick 2)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="discarded repeats (default 2; quick 1)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per round (default 10; quick 5)"
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=0,
        help="LocalTrainer steps per client before each round's aggregation "
        "(default 0: skip training; bytes and timings do not depend on values)",
    )
    p.add_argument(
        "--device", default=None, help="cpu | cuda | auto (default: the config's run.device)"
    )
    p.add_argument("--out-dir", default=str(C.RESULTS), help="where CSV / PNG / MD files go")
    p.add_argument(
        "--quick", action="store_true", help="small repeat counts (1-2 min at W=11 on 2 cores)"
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="also time the fed.secure exchange on the same weights (with "
        "--fed.secure_neighbors=k etc. as config overrides)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the exchange calls on ranks 0 and 1 and print the top entries "
        "(distorts the timings of that run)",
    )
    p.add_argument(
        "--count-copies",
        action="store_true",
        help="CUDA: count host<->device copies of one exchange per method on every "
        "rank with torch.profiler (0 with NCCL or a CUDA-aware MPI; with a "
        "host-only MPI, a sender's values to the host and a receiver's back)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="W1,W2,...",
        help="driver mode (run without mpirun): launch one job per world size and merge",
    )
    p.add_argument(
        "--launcher", "--mpirun", dest="launcher", default=C.DEFAULT_LAUNCHER, help=C.LAUNCHER_HELP
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launched job (--sweep)")
    args, overrides = p.parse_known_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (5 if args.quick else 10)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHOD_NAMES]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")
    args.backends = [b for b in args.backend.split(",") if b]
    if any(b not in ("mpi", "torch") for b in args.backends):
        p.error("--backend must be mpi, torch or (with --sweep) a list of them")
    if args.sweep is None and len(args.backends) != 1:
        p.error("one --backend per launch (a list needs --sweep)")
    for o in overrides:
        if not o.startswith("--") or "." not in o.split("=")[0]:
            p.error(f"unrecognized argument {o!r} (config overrides look like --model.dim=64)")
    return args, overrides


# ====================================================================== under MPI


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


def measure(args, overrides) -> int:
    import numpy as np
    import torch

    from fedmpi.config import load_config
    from fedmpi.dist.world import World
    from fedmpi.fl.aggregate import Aggregator
    from fedmpi.fl.ledger import FLOAT_BYTES, SECURE_VALUE_BYTES, Ledger
    from fedmpi.fl.methods import make_plan
    from fedmpi.model.regions import bind_flat, region_sizes
    from fedmpi.model.summary import model_shape
    from fedmpi.model.unet import build_unet
    from fedmpi.runtime import derive_seed, pick_device, share_cpu_threads

    world = World(args.backends[0])
    W, K = world.size, world.num_clients
    MAX, SUM = world.MPI.MAX, world.MPI.SUM
    if W < 2:
        print(
            "bench/comm.py needs at least 2 ranks (1 federator + 1 client): "
            "mpirun -n 3 ... or --sweep 3,5,11",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device or cfg.run.device, world.local_rank)
        if device.type == "cpu":
            share_cpu_threads(max(1, world.local_clients))
        channels, size = model_shape(cfg)
        torch.manual_seed(derive_seed(cfg.run.seed, 0xBE7C, world.rank))
        model = build_unet(cfg.model, channels, size).to(device)
        bind_flat(model)  # as fedmpi.train.loop does
        sizes = region_sizes(model)
        seed = cfg.run.seed
        trainer, n_k = None, float(100 + 10 * world.client)  # unequal client weights
        if args.local_steps and not world.is_federator:
            from fedmpi.data import load_client_data
            from fedmpi.model.diffusion import Diffusion
            from fedmpi.train.trainer import LocalTrainer

            images, _ = load_client_data(cfg, world.client, K)
            trainer = LocalTrainer(
                model,
                Diffusion.from_config(cfg.diffusion),
                images,
                cfg.train.batch_size,
                cfg.train.lr,
                device,
            )
            n_k = float(len(images))
        if world.is_federator:
            n_k = 0.0
        sizes_all = world.allgather(n_k)[1:]  # every client's n_k, as the round's flags carry it
        world.start_backend(device)
        # The aggregation a run uses; with --secure a second one on the same weights, whose
        # construction runs the key agreement (a collective, timed once).
        agg = Aggregator(world, model, Ledger(world.rank))
        sagg, t_keys = None, 0.0
        if args.secure:
            world.comm.Barrier()
            t0 = time.perf_counter()
            sagg = Aggregator(world, model, Ledger(world.rank), cfg.replace({"fed.secure": True}))
            t_keys = world.comm.allreduce(time.perf_counter() - t0, op=MAX)
        if world.is_federator:
            C.print_environment("bench/comm.py", C.environment(W, world.backend.name, device))
            print(
                f"# model {args.config} {' '.join(overrides)}: "
                + ", ".join(f"{r} {n:,}" for r, n in sizes.items())
                + f", total {sum(sizes.values()):,} parameters"
            )
            print(
                f"# K={K} clients, R={args.rounds} rounds/method, warm-up {args.warmup} + "
                f"{args.repeats} timed repeats (median), local steps {args.local_steps}",
                flush=True,
            )
            if sagg is not None:
                nb = cfg.fed.secure_neighbors
                print(
                    f"# secure: fed.secure_frac_bits {cfg.fed.secure_frac_bits}, masks with "
                    f"{'every other reporter' if nb is None else f'{nb} ring neighbours each side'}; "
                    f"key agreement {1e3 * t_keys:.1f} ms (once per run)",
                    flush=True,
                )
        raw = RawCollectives(world, sizes)

        profiler = None
        if args.profile and world.rank in (0, 1):
            import cProfile

            profiler = cProfile.Profile()

        def timed(fn):
            world.comm.Barrier()
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
            return dt, out

        keys = (
            "agg",
            "inner",
            "floor",
            "setup",
            "host",
            "secure",
            "secure_inner",
            "secure_host",
            "secure_host_sum",
        )
        round_rows, summary_rows, all_ok = [], [], True
        for method in args.methods:
            ledger, sledger = Ledger(world.rank), Ledger(world.rank)
            agg.ledger = ledger
            agg.initial_broadcast()
            refused = (
                secure_refusal(method, K, args.rounds, seed, cfg.fed.secure_min_reporters)
                if sagg is not None
                else "not measured (--secure)"
            )
            if refused is None:  # round 0 of the secure ledger: the same broadcast
                sagg.ledger = sledger
                sagg.initial_broadcast()
            samples = {k: [] for k in keys}
            for r in range(1, args.rounds + 1):
                plan = make_plan(method, r, K, seed)
                if trainer is not None:
                    trainer.new_optimizer()
                    trainer.run(seed=derive_seed(seed, r, world.client), steps=args.local_steps)
                per = {k: [] for k in keys}
                for rep in range(args.warmup + args.repeats):
                    # rep 0 writes the ledgers (one real round); the others scratch ones
                    agg.ledger = ledger if rep == 0 else Ledger(world.rank)
                    timings: dict = {}
                    stimings: dict = {}  # the secure exchange's region loop (after masking)
                    runs = [
                        ("agg", lambda: agg.exchange(plan, sizes_all, r, timings=timings)),
                        ("floor", lambda: floor_once(world, plan, raw)),
                    ]
                    if refused is None:
                        sagg.ledger = sledger if rep == 0 else Ledger(world.rank)
                        runs.append(
                            ("secure", lambda: sagg.exchange(plan, sizes_all, r, timings=stimings))
                        )
                    t = dict.fromkeys(keys, float("nan"))
                    for name, fn in runs if rep % 2 == 0 else runs[::-1]:  # alternate order
                        dt, out = timed(fn)
                        if name == "floor":
                            t["floor"], t["setup"] = out
                        else:
                            t[name] = dt
                    t["inner"] = sum(timings.values())
                    if refused is None:
                        t["secure_inner"] = sum(stimings.values())
                    t["host"] = host_once(world, plan, agg, sizes_all)
                    if refused is None:
                        t["secure_host"] = t["secure_host_sum"] = secure_host_once(
                            world, plan, sagg, n_k, r
                        )
                    vals = np.array([t[k] for k in keys])
                    mx, tot = np.empty_like(vals), np.empty_like(vals)
                    world.comm.Allreduce(vals, mx, op=MAX)
                    world.comm.Allreduce(vals, tot, op=SUM)
                    mx[keys.index("secure_host_sum")] = tot[keys.index("secure_host_sum")]
                    if rep >= args.warmup:
                        for key, v in zip(keys, mx):
                            per[key].append(float(v))
                            samples[key].append(float(v))
                if world.is_federator:
                    round_rows.append(
                        dict(
                            backend=world.backend.name.split(" (")[0],
                            W=W,
                            K=K,
                            method=method,
                            round=r,
                            **{f"{k}_ms": 1e3 * C.median(v) for k, v in per.items()},
                        )
                    )
            if args.count_copies and device.type == "cuda":
                copies = count_host_copies(world, lambda: agg.exchange(plan, sizes_all, r))
                rows = world.comm.gather(copies, root=0)
                if world.is_federator:
                    print(
                        f"\n# {method}, round {r}: host<->device copies in one exchange "
                        f"(torch.profiler CUDA memcpy events; {world.backend.name}; "
                        f"{len(frozenset().union(*plan.uploads))} region(s) uploaded)"
                    )
                    print(
                        C.markdown_table(
                            ["rank", "device->host", "host->device"],
                            [[i, c["DtoH"], c["HtoD"]] for i, c in enumerate(rows)],
                        )
                    )
            # ---- bytes: this method's ledgers against the analytical rows
            got, want, ok = ledger_check(
                world, ledger, method, K, args.rounds, sizes, seed, FLOAT_BYTES
            )
            sok, sgot = True, None
            if refused is None:
                sgot, _, sok = ledger_check(
                    world, sledger, method, K, args.rounds, sizes, seed, SECURE_VALUE_BYTES
                )
            if world.is_federator:
                all_ok &= ok and sok
                per_round = []
                for row in round_rows:
                    if row["method"] != method:
                        continue
                    r = row["round"]
                    row["params"] = sum(x["params"] for x in got if x["round"] == r)
                    row["bytes"] = sum(x["bytes"] for x in got if x["round"] == r)
                    row["expected_bytes"] = sum(x["bytes"] for x in want if x["round"] == r)
                    row["bytes_ok"] = row["bytes"] == row["expected_bytes"]
                    row["ratio"] = row["agg_ms"] / row["floor_ms"]
                    row["secure_bytes"] = (
                        sum(x["bytes"] for x in sgot if x["round"] == r)
                        if sgot is not None
                        else float("nan")
                    )
                    row["secure_ratio"] = row["secure_ms"] / row["agg_ms"]
                    per_round.append(row)
                med = {k: C.median(v) for k, v in samples.items()}
                n = len(per_round)
                summary_rows.append(
                    dict(
                        backend=world.backend.name.split(" (")[0],
                        W=W,
                        K=K,
                        method=method,
                        rounds=args.rounds,
                        repeats=args.repeats,
                        params_per_round=sum(x["params"] for x in per_round) / n,
                        bytes_per_round=sum(x["bytes"] for x in per_round) / n,
                        expected_bytes_per_round=sum(x["expected_bytes"] for x in per_round) / n,
                        bytes_check="PASS" if ok else "FAIL",
                        agg_ms=1e3 * med["agg"],
                        floor_ms=1e3 * med["floor"],
                        ratio=med["agg"] / med["floor"],
                        setup_ms=1e3 * med["setup"],
                        agg_excl_setup_ms=1e3 * med["inner"],
                        ratio_excl_setup=med["inner"] / med["floor"],
                        host_ms=1e3 * med["host"],
                        round0_bytes=sum(x["bytes"] for x in got if x["round"] == 0),
                        secure=refused or "measured",
                        secure_ms=1e3 * med["secure"],
                        secure_ratio=med["secure"] / med["agg"],
                        secure_comm_ms=1e3 * med["secure_inner"],
                        # one core (or node) per rank: the clients mask in parallel, so the round
                        # costs the reduces + broadcasts plus the slowest rank's masking
                        secure_core_per_rank_ratio=(med["secure_inner"] + med["secure_host"])
                        / med["agg"],
                        secure_host_ms=1e3 * med["secure_host"],
                        secure_host_sum_ms=1e3 * med["secure_host_sum"],
                        secure_bytes_per_round=(sum(x["secure_bytes"] for x in per_round) / n),
                        secure_bytes_check=("PASS" if sok else "FAIL") if refused is None else "-",
                        key_agreement_ms=1e3 * t_keys,
                    )
                )
        if world.is_federator:
            report(args, world.backend_name, W, round_rows, summary_rows, all_ok)
        if args.profile:
            _print_profile(world, profiler)  # collective (barriers) on every rank
        world.comm.Barrier()
        world.close()
        return 0 if all_ok or not world.is_federator else 1
    except Exception:
        print(f"[rank {world.rank}] bench/comm.py failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        world.abort(1)
        return 1


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


def _print_profile(world, profiler):
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


def _fmt_bytes(b: float) -> str:
    return f"{b:,.0f}" if float(b).is_integer() else f"{b:,.1f}"


def summary_table(rows: list[dict]) -> str:
    headers = [
        "method",
        "backend",
        "W",
        "params/round",
        "bytes/round",
        "agg ms",
        "floor ms",
        "ratio",
        "setup ms",
        "agg excl. setup ms",
        "ratio excl. setup",
        "host copies ms",
        "bytes check",
    ]
    body = [
        [
            r["method"],
            r["backend"],
            r["W"],
            _fmt_bytes(float(r["params_per_round"])),
            _fmt_bytes(float(r["bytes_per_round"])),
            f"{float(r['agg_ms']):.2f}",
            f"{float(r['floor_ms']):.2f}",
            f"{float(r['ratio']):.2f}",
            f"{float(r['setup_ms']):.2f}",
            f"{float(r['agg_excl_setup_ms']):.2f}",
            f"{float(r['ratio_excl_setup']):.2f}",
            f"{float(r['host_ms']):.2f}",
            r["bytes_check"],
        ]
        for r in rows
    ]
    return C.markdown_table(headers, body, align="ll" + "r" * (len(headers) - 3) + "l")


TARGET_RATIO = 1.25


def verdict(rows: list[dict]) -> str:
    """The aggregation target and where the time above the floor goes."""
    worst = max(rows, key=lambda r: float(r["ratio"]))
    met = all(float(r["ratio"]) <= TARGET_RATIO for r in rows)
    lines = [
        f"aggregation target (agg <= {TARGET_RATIO}x floor): {'MET' if met else 'NOT MET'} "
        f"(ratios {min(float(r['ratio']) for r in rows):.2f}..{float(worst['ratio']):.2f})"
    ]
    if not met:
        r = worst
        gap = float(r["agg_ms"]) - float(r["floor_ms"])
        lines.append(
            f"  worst: {r['method']} W={r['W']}: agg {float(r['agg_ms']):.1f} ms = floor "
            f"{float(r['floor_ms']):.1f} + {gap:.1f} ms, of which communicator setup "
            f"{float(r['setup_ms']):.1f} ms; the local steps alone (clients' pack_upload, "
            f"the federator's finiteness check; slowest rank) take {float(r['host_ms']):.1f} ms "
            f"and they run serially around each collective (client pack -> Reduce -> "
            f"federator check -> Bcast)"
        )
    return "\n".join(lines)


SECURE_TARGET = 2.5  # secure aggregation time / plain aggregation time (issue 13)


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("secure") == "measured"]


def secure_table(rows: list[dict]) -> str:
    headers = [
        "method",
        "backend",
        "W",
        "plain ms",
        "secure ms",
        "secure / plain",
        "secure reduce+bcast ms",
        "encode+mask CPU ms (slowest rank)",
        "encode+mask CPU ms (all ranks)",
        "projected secure / plain, a core per rank",
        "secure bytes/round",
        "plain bytes/round",
        "secure bytes check",
    ]
    body = []
    for r in rows:
        if r.get("secure") != "measured":
            body.append(
                [
                    r["method"],
                    r["backend"],
                    r["W"],
                    f"{float(r['agg_ms']):.2f}",
                    r.get("secure", "-"),
                ]
                + ["-"] * (len(headers) - 5)
            )
            continue
        body.append(
            [
                r["method"],
                r["backend"],
                r["W"],
                f"{float(r['agg_ms']):.2f}",
                f"{float(r['secure_ms']):.2f}",
                f"{float(r['secure_ratio']):.2f}",
                f"{float(r['secure_comm_ms']):.2f}",
                f"{float(r['secure_host_ms']):.1f}",
                f"{float(r['secure_host_sum_ms']):.1f}",
                f"{float(r['secure_core_per_rank_ratio']):.2f}",
                _fmt_bytes(float(r["secure_bytes_per_round"])),
                _fmt_bytes(float(r["bytes_per_round"])),
                r["secure_bytes_check"],
            ]
        )
    return C.markdown_table(headers, body, align="ll" + "r" * (len(headers) - 3) + "l")


def secure_verdict(rows: list[dict]) -> str:
    """The secure aggregation target, and what bounds the secure time on this machine."""
    rows = _measured(rows)
    if not rows:
        return "secure aggregation: no method measured"
    worst = max(rows, key=lambda r: float(r["secure_ratio"]))
    met = all(float(r["secure_ratio"]) <= SECURE_TARGET for r in rows)
    cores = C.environment(None, None)["cpu_cores"]
    W = int(worst["W"])
    lines = [
        f"secure aggregation target (secure <= {SECURE_TARGET}x plain): "
        f"{'MET' if met else 'NOT MET'} (ratios "
        f"{min(float(r['secure_ratio']) for r in rows):.2f}..{float(worst['secure_ratio']):.2f})"
    ]
    serial = float(worst["secure_host_sum_ms"]) / max(1, min(cores, W))
    lines.append(
        f"  worst: {worst['method']} W={W}: secure {float(worst['secure_ms']):.1f} ms vs plain "
        f"{float(worst['agg_ms']):.1f} ms; encoding + masking take {float(worst['secure_host_ms']):.1f} "
        f"ms of CPU on the slowest rank and {float(worst['secure_host_sum_ms']):.1f} ms summed over "
        f"the {W} ranks, i.e. >= {serial:.1f} ms of wall time on this machine's {cores} cores"
        + (
            " (more ranks than cores: the clients' masking runs one after another; with a core "
            "per rank it runs in parallel)"
            if W > cores
            else ""
        )
    )
    lines.append(
        f"  its reduces + broadcasts (after masking) take {float(worst['secure_comm_ms']):.1f} ms: "
        f"with a core per rank, the round would cost that plus the slowest rank's masking, "
        f"{float(worst['secure_core_per_rank_ratio']):.2f}x plain (a projection from this "
        f"run's parts, not a measurement)"
    )
    return "\n".join(lines)


def rounds_table(rows: list[dict]) -> str:
    headers = [
        "method",
        "W",
        "round",
        "params",
        "bytes",
        "predicted bytes",
        "agg ms",
        "floor ms",
        "ratio",
        "setup ms",
        "agg excl. setup ms",
        "host copies ms",
    ]
    body = [
        [
            r["method"],
            r["W"],
            r["round"],
            f"{r['params']:,}",
            f"{r['bytes']:,}",
            f"{r['expected_bytes']:,}",
            f"{r['agg_ms']:.2f}",
            f"{r['floor_ms']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['setup_ms']:.2f}",
            f"{r['inner_ms']:.2f}",
            f"{r['host_ms']:.2f}",
        ]
        for r in rows
    ]
    return C.markdown_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = C.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    worlds = sorted({int(r["W"]) for r in rows})
    methods = [m for m in METHOD_NAMES if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        mine = {int(r["W"]): r for r in rows if r["method"] == m}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(worlds))]
        agg = [float(mine[w]["agg_ms"]) if w in mine else 0 for w in worlds]
        flo = [float(mine[w]["floor_ms"]) if w in mine else 0 for w in worlds]
        bars = ax1.bar(xs, agg, width * 0.95, label=f"{m} (fedmpi)")
        ax1.bar(
            xs,
            flo,
            width * 0.5,
            color="black",
            alpha=0.35,
            label="raw Reduce+Bcast floor" if i == 0 else None,
        )
        ax2.bar(
            xs,
            [float(mine[w]["bytes_per_round"]) / 1e6 if w in mine else 0 for w in worlds],
            width * 0.95,
            color=bars.patches[0].get_facecolor(),
            label=m,
        )
    for ax, ylabel in ((ax1, "aggregation per round [ms]"), (ax2, "MB moved per round (clients)")):
        ax.set_xticks(range(len(worlds)), [f"W={w}" for w in worlds])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, backend, W, round_rows, summary_rows, all_ok) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"comm_{backend}_W{W}"
    print(f"\n## per round (W={W}, backend {backend}; median of {args.repeats} repeats)\n")
    print(rounds_table(round_rows))
    print(f"\n## summary (W={W}, backend {backend}; median over all rounds x repeats)\n")
    print(summary_table(summary_rows))
    if args.secure:
        print(
            f"\n## secure vs plain aggregation (W={W}, backend {backend}; median over all "
            f"rounds x repeats)\n"
        )
        print(secure_table(summary_rows))
    C.write_csv(round_rows, Path(f"{stem}_rounds.csv"))
    C.write_csv(summary_rows, Path(f"{stem}.csv"))
    plot(
        summary_rows,
        Path(f"{stem}.png"),
        f"fedmpi aggregation vs raw MPI floor, {backend}, {args.config}, W={W}",
    )
    print("\n" + verdict(summary_rows))
    if args.secure:
        print(secure_verdict(summary_rows))
    n = len(summary_rows)
    print(
        f"\nbytes check: {'PASS' if all_ok else 'FAIL'} (ledger == analytical_rows for "
        f"{n} method{'s' if n != 1 else ''}, W={W}, rounds 0..{args.rounds})"
    )
    print(f"wrote {stem}.csv, {stem}_rounds.csv, {stem}.png", flush=True)


# ====================================================================== sweep driver


def sweep(args, overrides) -> int:
    worlds = C.int_list(args.sweep)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    C.print_environment("bench/comm.py --sweep (driver)", C.environment(args.sweep, args.backend))
    child = [
        str(Path(__file__).resolve()),
        "--config",
        args.config,
        "--methods",
        ",".join(args.methods),
        "--rounds",
        str(args.rounds),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--local-steps",
        str(args.local_steps),
        "--out-dir",
        str(out),
    ]
    if args.device:
        child += ["--device", args.device]
    if args.profile:
        child.append("--profile")
    if args.secure:
        child.append("--secure")
    child += overrides
    failures, ok = [], True
    for backend in args.backends:
        merged = []
        for W in worlds:
            for stale in (out / f"comm_{backend}_W{W}.csv",):
                stale.unlink(missing_ok=True)
            proc = C.run_ranks(
                args.launcher,
                W,
                child + ["--backend", backend],
                log_path=out / f"comm_{backend}_W{W}.log",
                timeout=args.timeout,
            )
            path = out / f"comm_{backend}_W{W}.csv"
            if proc.returncode != 0 or not path.exists():
                failures.append(f"{backend} W={W} (exit {proc.returncode})")
                continue
            merged += C.read_csv(path)
        if not merged:
            continue
        ok &= all(
            r["bytes_check"] == "PASS" and r.get("secure_bytes_check", "-") != "FAIL"
            for r in merged
        )
        merged.sort(key=lambda r: (METHOD_NAMES.index(r["method"]), int(r["W"])))
        table = summary_table(merged)
        if args.secure:
            table += (
                f"\n\n## secure vs plain aggregation\n\n{secure_table(merged)}\n\n"
                f"{secure_verdict(merged)}"
            )
        stem = out / f"comm_{backend}_sweep"
        C.write_csv(merged, Path(f"{stem}.csv"))
        Path(f"{stem}.md").write_text(table + "\n")
        plot(
            merged,
            Path(f"{stem}.png"),
            f"fedmpi aggregation vs raw floor, {backend}, {args.config}, W={args.sweep}",
        )
        print(
            f"\n## merged: backend {backend}, W = {args.sweep}\n\n{table}\n\n{verdict(merged)}\n"
            f"wrote {stem}.csv, {stem}.md, {stem}.png",
            flush=True,
        )
    if failures:
        print(f"\nFAILED launches: {'; '.join(failures)}")
    print(
        f"\nbytes check (all methods, backends {args.backend}, W = {args.sweep}): "
        f"{'PASS' if ok and not failures else 'FAIL'}",
        flush=True,
    )
    return 0 if ok and not failures else 1


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    if args.sweep is not None:
        return sweep(args, overrides)
    from fedmpi.dist.world import launched_by_mpi

    if not launched_by_mpi():
        print(
            "bench/comm.py: run it under an MPI launcher (mpirun -n 3 --oversubscribe "
            "python bench/comm.py --quick) or give --sweep 3,5,11 to launch itself",
            file=sys.stderr,
        )
        return 2
    return measure(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
