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
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from _comm_bench import CommBench
from _comm_report import (
    METHOD_NAMES,
    plot,
    report,
    secure_table,
    secure_verdict,
    summary_table,
    verdict,
)
from _exchange import print_profile

from fedmpi.store import tables

DEFAULT_CONFIG = "configs/paper/fmnist_full.yaml"


def _parser() -> argparse.ArgumentParser:
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
    _add_mode_arguments(p)
    return p


def _add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """--secure, the diagnostics and the --sweep driver's options."""
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


def parse_args(argv=None):
    p = _parser()
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


def measure(args, overrides) -> int:
    from fedmpi.dist.world import World

    world = World(args.backends[0])
    if world.size < 2:
        print(
            "bench/comm.py needs at least 2 ranks (1 federator + 1 client): "
            "mpirun -n 3 ... or --sweep 3,5,11",
            file=sys.stderr,
        )
        return 2
    try:
        bench = CommBench(args, overrides, world)
        for method in args.methods:
            bench.method(method)
        if world.is_federator:
            report(
                args,
                world.backend_name,
                world.size,
                bench.round_rows,
                bench.summary_rows,
                bench.all_ok,
            )
        if args.profile:
            print_profile(world, bench.profiler)  # collective (barriers) on every rank
        world.comm.Barrier()
        world.close()
        return 0 if bench.all_ok or not world.is_federator else 1
    except Exception:
        print(f"[rank {world.rank}] bench/comm.py failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        world.abort(1)
        return 1


# ====================================================================== sweep driver


def _child_argv(args, out: Path, overrides) -> list[str]:
    """The command line of one launched measurement (its backend added per launch)."""
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
    return child + overrides


def _sweep_backend(args, backend: str, child: list[str], out: Path, failures: list) -> bool:
    """Launch one job per world size on `backend`, merge and write their tables; False
    when a merged row fails a bytes check."""
    merged = []
    for W in C.int_list(args.sweep):
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
        merged += tables.read_csv(path)
    if not merged:
        return True
    ok = all(
        r["bytes_check"] == "PASS" and r.get("secure_bytes_check", "-") != "FAIL" for r in merged
    )
    merged.sort(key=lambda r: (METHOD_NAMES.index(r["method"]), int(r["W"])))
    table = summary_table(merged)
    if args.secure:
        table += (
            f"\n\n## secure vs plain aggregation\n\n{secure_table(merged)}\n\n"
            f"{secure_verdict(merged)}"
        )
    stem = out / f"comm_{backend}_sweep"
    tables.write_csv(Path(f"{stem}.csv"), merged)
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
    return ok


def sweep(args, overrides) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    C.print_environment("bench/comm.py --sweep (driver)", C.environment(args.sweep, args.backend))
    child = _child_argv(args, out, overrides)
    failures, ok = [], True
    for backend in args.backends:
        ok &= _sweep_backend(args, backend, child, out, failures)
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
