"""Aggregation cost of fedmpi per method against the raw MPI floor, plus a byte check.

What it measures (one launch = one world size W = 1 federator + K clients):
for each method (full, usplit, udec, ulatdec) it runs R real aggregation rounds of
`fedmpi.federated._exchange` on the configured UNet (default: the paper's model,
configs/paper/fmnist_full.yaml, 2,996,315 parameters) and reports per round

- the parameters and bytes moved, read from fedmpi's `Ledger` (client side, the rows a
  run writes to comm.csv), checked against `fedmpi.ledger.analytical_rows` for every
  method: `bytes check: PASS|FAIL`;
- agg ms: wall time of the whole `_exchange` call (what a run logs as agg_s: sub-
  communicator creation, flatten / scale / unflatten, Reduce + Bcast, ledger, Free);
- floor ms: in the same run, on communicators created the same way for the same member
  sets (`World.group`), the bare backend collectives on preallocated buffers of exactly
  the same sizes (Reduce of P+1 floats to the federator, Bcast of P floats, per region),
  i.e. the least any implementation of this plan can spend on the wire;
- setup ms (creating + freeing the per-region subcommunicators; MPI_Comm_split on the mpi
  backend, cached new_group on torch) and agg excl. setup ms (fedmpi's own per-region
  timing hook, `_exchange(..., timings=)`), so the ratio can be attributed.

Each time is the slowest rank's (MAX over ranks after a barrier); every measurement is
repeated (--warmup discarded, then --repeats kept, exchange and floor interleaved, order
alternating) and the median is reported. Local training between rounds is skipped by
default (--local-steps N runs N real LocalTrainer steps per client per round first).

Outputs (rank 0): per-round and summary markdown tables, bench/results/comm_<backend>_W<W>
{_rounds.csv,.csv,.png}. `--sweep 3,5,11` (run WITHOUT mpirun) launches itself once per
world size and backend, merges the tables into comm_<backend>_sweep.{csv,png,md}.

Laptop / workstation (Open MPI from the venv, root needs OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1):
    mpirun -n 3 --oversubscribe --bind-to none python bench/comm.py --quick
    mpirun -n 11 --oversubscribe --bind-to none python bench/comm.py --backend torch
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
import _common as C  # noqa: E402  (puts the repository root on sys.path)

DEFAULT_CONFIG = "configs/paper/fmnist_full.yaml"
METHOD_NAMES = ("full", "usplit", "udec", "ulatdec")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/comm.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="fedmpi YAML config (the model)")
    p.add_argument("--backend", default="mpi",
                   help="mpi | torch (with --sweep: a list, e.g. mpi,torch)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--rounds", type=int, default=None, help="rounds per method (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="discarded repeats (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per round (default 10; quick 5)")
    p.add_argument("--local-steps", type=int, default=0,
                   help="LocalTrainer steps per client before each round's aggregation "
                        "(default 0: skip training; bytes and timings do not depend on values)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: the config's run.device)")
    p.add_argument("--out-dir", default=str(C.RESULTS), help="where CSV / PNG / MD files go")
    p.add_argument("--quick", action="store_true", help="small repeat counts (1-2 min at W=11 on 2 cores)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the exchange calls on ranks 0 and 1 and print the top entries "
                        "(distorts the timings of that run)")
    p.add_argument("--sweep", default=None, metavar="W1,W2,...",
                   help="driver mode (run without mpirun): launch one job per world size and merge")
    p.add_argument("--launcher", "--mpirun", dest="launcher", default=C.DEFAULT_LAUNCHER,
                   help=C.LAUNCHER_HELP)
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
            self.recv = {r: (np.empty(n + 1, np.float32) if world.is_federator else None)
                         for r, n in sizes.items()}
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
    """Per region (up_group, down_group), created exactly as `_exchange` creates them."""
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
    from fedmpi.regions import REGIONS
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


def host_once(world, plan, model, sizes, n_k) -> float:
    """The local (non-communication) steps `_exchange` performs on this rank for this plan:
    the clients' scaling by n_k into the send buffer, the federator's division into its
    weights (plus copies where the model is not bound to flat buffers). The federator's
    reduced buffer is faked with ones (values do not matter for timing). Seconds."""
    import numpy as np
    from fedmpi.regions import REGIONS, region_array, unflatten
    me, fed = world.client, world.is_federator
    world.comm.Barrier()
    t0 = time.perf_counter()
    for region in REGIONS:
        ups, downs, n = plan.uploaders(region), plan.receivers(region), sizes[region]
        if ups and (fed or me in ups):
            send = world.scratch(f"send-{region}", n + 1)
            theta, is_view = region_array(model, region)
            if fed:
                total = world.scratch(f"host-{region}", n + 1)
                total.fill(1.0)  # stands for the Reduce output
                np.divide(total[:n], total[n], out=theta)
                if not is_view:
                    unflatten(model, region, theta)
            else:
                np.multiply(theta, np.float32(n_k), out=send[:n])
                send[n] = n_k
        if downs and (fed or me in downs):
            theta, is_view = region_array(model, region)
            if not fed and not is_view:
                unflatten(model, region, theta)
    return time.perf_counter() - t0


def measure(args, overrides) -> int:
    import numpy as np
    import torch

    from fedmpi.comm import World
    from fedmpi.config import load_config
    from fedmpi.federated import _exchange, _initial_broadcast
    from fedmpi.ledger import Ledger, analytical_rows
    from fedmpi.methods import make_plan
    from fedmpi.regions import bind_flat, region_sizes
    from fedmpi.summary import model_shape
    from fedmpi.trainer import derive_seed, pick_device, share_cpu_threads
    from fedmpi.unet import build_unet

    world = World(args.backends[0])
    W, K = world.size, world.num_clients
    MAX = world.MPI.MAX
    if W < 2:
        print("bench/comm.py needs at least 2 ranks (1 federator + 1 client): "
              "mpirun -n 3 ... or --sweep 3,5,11", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device or cfg.run.device, world.local_rank)
        if device.type == "cpu":
            share_cpu_threads(max(1, world.local_clients))
        channels, size = model_shape(cfg)
        torch.manual_seed(derive_seed(cfg.run.seed, 0xBE7C, world.rank))
        model = build_unet(cfg.model, channels, size).to(device)
        bind_flat(model)  # as fedmpi.federated does
        sizes = region_sizes(model)
        seed = cfg.run.seed
        trainer, n_k = None, float(100 + 10 * world.client)  # unequal client weights
        if args.local_steps and not world.is_federator:
            from fedmpi.data import load_client_data
            from fedmpi.diffusion import Diffusion
            from fedmpi.trainer import LocalTrainer
            images, _ = load_client_data(cfg, world.client, K)
            trainer = LocalTrainer(model, Diffusion.from_config(cfg.diffusion), images,
                                   cfg.train.batch_size, cfg.train.lr, device)
            n_k = float(len(images))
        if world.is_federator:
            n_k = 0.0
        world.start_backend(device)
        if world.is_federator:
            C.print_environment("bench/comm.py", C.environment(W, world.backend.name, device))
            print(f"# model {args.config} {' '.join(overrides)}: "
                  + ", ".join(f"{r} {n:,}" for r, n in sizes.items())
                  + f", total {sum(sizes.values()):,} parameters")
            print(f"# K={K} clients, R={args.rounds} rounds/method, warm-up {args.warmup} + "
                  f"{args.repeats} timed repeats (median), local steps {args.local_steps}", flush=True)
        raw = RawCollectives(world, sizes)

        profiler = None
        if args.profile and world.rank in (0, 1):
            import cProfile
            profiler = cProfile.Profile()

        round_rows, summary_rows, all_ok = [], [], True
        for method in args.methods:
            ledger = Ledger(world.rank)
            _initial_broadcast(world, model, ledger, sizes)
            samples = {"agg": [], "floor": [], "setup": [], "inner": [], "host": []}
            for r in range(1, args.rounds + 1):
                plan = make_plan(method, r, K, seed)
                if trainer is not None:
                    trainer.new_optimizer()
                    trainer.run(seed=derive_seed(seed, r, world.client), steps=args.local_steps)
                per = {"agg": [], "floor": [], "setup": [], "inner": [], "host": []}
                for rep in range(args.warmup + args.repeats):
                    # rep 0 writes the ledger (one real round); the others a scratch one
                    led = ledger if rep == 0 else Ledger(world.rank)

                    def exchange():
                        timings = {}
                        world.comm.Barrier()
                        if profiler is not None:
                            profiler.enable()
                        t0 = time.perf_counter()
                        _exchange(world, plan, model, n_k, led, sizes, r, timings=timings)
                        dt = time.perf_counter() - t0
                        if profiler is not None:
                            profiler.disable()
                        return dt, sum(timings.values())

                    if rep % 2 == 0:
                        (t_agg, t_inner), (t_floor, t_setup) = exchange(), floor_once(world, plan, raw)
                    else:
                        (t_floor, t_setup), (t_agg, t_inner) = floor_once(world, plan, raw), exchange()
                    t_host = host_once(world, plan, model, sizes, n_k)
                    t = np.empty(5)
                    world.comm.Allreduce(np.array([t_agg, t_inner, t_floor, t_setup, t_host]), t,
                                         op=MAX)
                    if rep >= args.warmup:
                        for key, v in zip(("agg", "inner", "floor", "setup", "host"), t):
                            per[key].append(float(v))
                            samples[key].append(float(v))
                if world.is_federator:
                    round_rows.append(dict(backend=world.backend.name.split(" (")[0], W=W, K=K, method=method,
                                           round=r, **{f"{k}_ms": 1e3 * C.median(v) for k, v in per.items()}))
            # ---- bytes: this method's ledger against the analytical rows
            gathered = world.gather(ledger.dicts())
            if world.is_federator:
                got = [row for rows in gathered for row in rows if row["client"] >= 0]
                want = analytical_rows(method, K, args.rounds, sizes, seed)
                key = ("round", "client", "src", "dst", "region", "direction", "params", "bytes")
                ok = sorted(tuple(x[k] for k in key) for x in got) == \
                    sorted(tuple(x[k] for k in key) for x in want)
                all_ok &= ok
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
                    per_round.append(row)
                agg, floor = C.median(samples["agg"]), C.median(samples["floor"])
                inner = C.median(samples["inner"])
                summary_rows.append(dict(
                    backend=world.backend.name.split(" (")[0], W=W, K=K, method=method, rounds=args.rounds,
                    repeats=args.repeats,
                    params_per_round=sum(x["params"] for x in per_round) / len(per_round),
                    bytes_per_round=sum(x["bytes"] for x in per_round) / len(per_round),
                    expected_bytes_per_round=sum(x["expected_bytes"] for x in per_round) / len(per_round),
                    bytes_check="PASS" if ok else "FAIL",
                    agg_ms=1e3 * agg, floor_ms=1e3 * floor, ratio=agg / floor,
                    setup_ms=1e3 * C.median(samples["setup"]), agg_excl_setup_ms=1e3 * inner,
                    ratio_excl_setup=inner / floor, host_ms=1e3 * C.median(samples["host"]),
                    round0_bytes=sum(x["bytes"] for x in got if x["round"] == 0)))
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


def _print_profile(world, profiler):
    import io
    import pstats
    for rank in (0, 1):
        if world.rank == rank and profiler is not None:
            s = io.StringIO()
            pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(15)
            print(f"\n## cProfile of _exchange on rank {rank} (sorted by own time)\n{s.getvalue()}",
                  flush=True)
        world.comm.Barrier()


def _fmt_bytes(b: float) -> str:
    return f"{b:,.0f}" if float(b).is_integer() else f"{b:,.1f}"


def summary_table(rows: list[dict]) -> str:
    headers = ["method", "backend", "W", "params/round", "bytes/round", "agg ms", "floor ms",
               "ratio", "setup ms", "agg excl. setup ms", "ratio excl. setup", "host copies ms",
               "bytes check"]
    body = [[r["method"], r["backend"], r["W"], _fmt_bytes(float(r["params_per_round"])),
             _fmt_bytes(float(r["bytes_per_round"])), f"{float(r['agg_ms']):.2f}",
             f"{float(r['floor_ms']):.2f}", f"{float(r['ratio']):.2f}",
             f"{float(r['setup_ms']):.2f}", f"{float(r['agg_excl_setup_ms']):.2f}",
             f"{float(r['ratio_excl_setup']):.2f}", f"{float(r['host_ms']):.2f}",
             r["bytes_check"]] for r in rows]
    return C.markdown_table(headers, body, align="ll" + "r" * (len(headers) - 3) + "l")


TARGET_RATIO = 1.25


def verdict(rows: list[dict]) -> str:
    """The aggregation target and where the time above the floor goes."""
    worst = max(rows, key=lambda r: float(r["ratio"]))
    met = all(float(r["ratio"]) <= TARGET_RATIO for r in rows)
    lines = [f"aggregation target (agg <= {TARGET_RATIO}x floor): {'MET' if met else 'NOT MET'} "
             f"(ratios {min(float(r['ratio']) for r in rows):.2f}..{float(worst['ratio']):.2f})"]
    if not met:
        r = worst
        gap = float(r["agg_ms"]) - float(r["floor_ms"])
        lines.append(
            f"  worst: {r['method']} W={r['W']}: agg {float(r['agg_ms']):.1f} ms = floor "
            f"{float(r['floor_ms']):.1f} + {gap:.1f} ms, of which communicator setup "
            f"{float(r['setup_ms']):.1f} ms; host copies alone (flatten / scale / divide / "
            f"unflatten / buffer allocation, slowest rank) take {float(r['host_ms']):.1f} ms "
            f"and they run serially around each collective (client flatten -> Reduce -> "
            f"federator unflatten + flatten -> Bcast -> client unflatten), so up to about "
            f"twice that lies on the critical path")
    return "\n".join(lines)


def rounds_table(rows: list[dict]) -> str:
    headers = ["method", "W", "round", "params", "bytes", "predicted bytes", "agg ms",
               "floor ms", "ratio", "setup ms", "agg excl. setup ms", "host copies ms"]
    body = [[r["method"], r["W"], r["round"], f"{r['params']:,}", f"{r['bytes']:,}",
             f"{r['expected_bytes']:,}", f"{r['agg_ms']:.2f}", f"{r['floor_ms']:.2f}",
             f"{r['ratio']:.2f}", f"{r['setup_ms']:.2f}", f"{r['inner_ms']:.2f}",
             f"{r['host_ms']:.2f}"] for r in rows]
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
        ax1.bar(xs, flo, width * 0.5, color="black", alpha=0.35,
                label="raw Reduce+Bcast floor" if i == 0 else None)
        ax2.bar(xs, [float(mine[w]["bytes_per_round"]) / 1e6 if w in mine else 0 for w in worlds],
                width * 0.95, color=bars.patches[0].get_facecolor(), label=m)
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
    C.write_csv(round_rows, Path(f"{stem}_rounds.csv"))
    C.write_csv(summary_rows, Path(f"{stem}.csv"))
    plot(summary_rows, Path(f"{stem}.png"), f"fedmpi aggregation vs raw MPI floor, {backend}, "
         f"{args.config}, W={W}")
    print("\n" + verdict(summary_rows))
    n = len(summary_rows)
    print(f"\nbytes check: {'PASS' if all_ok else 'FAIL'} (ledger == analytical_rows for "
          f"{n} method{'s' if n != 1 else ''}, W={W}, rounds 0..{args.rounds})")
    print(f"wrote {stem}.csv, {stem}_rounds.csv, {stem}.png", flush=True)


# ====================================================================== sweep driver

def sweep(args, overrides) -> int:
    worlds = C.int_list(args.sweep)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    C.print_environment("bench/comm.py --sweep (driver)",
                        C.environment(args.sweep, args.backend))
    child = [str(Path(__file__).resolve()), "--config", args.config, "--methods",
             ",".join(args.methods), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
             "--repeats", str(args.repeats), "--local-steps", str(args.local_steps),
             "--out-dir", str(out)]
    if args.device:
        child += ["--device", args.device]
    if args.profile:
        child.append("--profile")
    child += overrides
    failures, ok = [], True
    for backend in args.backends:
        merged = []
        for W in worlds:
            for stale in (out / f"comm_{backend}_W{W}.csv",):
                stale.unlink(missing_ok=True)
            proc = C.run_ranks(args.launcher, W, child + ["--backend", backend],
                               log_path=out / f"comm_{backend}_W{W}.log", timeout=args.timeout)
            path = out / f"comm_{backend}_W{W}.csv"
            if proc.returncode != 0 or not path.exists():
                failures.append(f"{backend} W={W} (exit {proc.returncode})")
                continue
            merged += C.read_csv(path)
        if not merged:
            continue
        ok &= all(r["bytes_check"] == "PASS" for r in merged)
        merged.sort(key=lambda r: (METHOD_NAMES.index(r["method"]), int(r["W"])))
        table = summary_table(merged)
        stem = out / f"comm_{backend}_sweep"
        C.write_csv(merged, Path(f"{stem}.csv"))
        Path(f"{stem}.md").write_text(table + "\n")
        plot(merged, Path(f"{stem}.png"), f"fedmpi aggregation vs raw floor, {backend}, "
             f"{args.config}, W={args.sweep}")
        print(f"\n## merged: backend {backend}, W = {args.sweep}\n\n{table}\n\n{verdict(merged)}\n"
              f"wrote {stem}.csv, {stem}.md, {stem}.png", flush=True)
    if failures:
        print(f"\nFAILED launches: {'; '.join(failures)}")
    print(f"\nbytes check (all methods, backends {args.backend}, W = {args.sweep}): "
          f"{'PASS' if ok and not failures else 'FAIL'}", flush=True)
    return 0 if ok and not failures else 1


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    if args.sweep is not None:
        return sweep(args, overrides)
    from fedmpi.comm import launched_by_mpi
    if not launched_by_mpi():
        print("bench/comm.py: run it under an MPI launcher (mpirun -n 3 --oversubscribe "
              "python bench/comm.py --quick) or give --sweep 3,5,11 to launch itself",
              file=sys.stderr)
        return 2
    return measure(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
