"""Virtual clients at scale: a round's fixed cost, the set-up time and a client rank's
memory against the number of clients N, from real `mpirun -n 3 python -m fedmpi.train`
jobs (1 federator + 2 client ranks) on configs/quickstart.yaml's model.

(a) Fixed cost. N = 10, 100, 1000 clients, 10 sampled per round (fed.participation =
10 / N, fed.sampling=fixed), local training cut to one step of batch 1, no evaluation,
a checkpoint every round, the full training set (N = 1000: 60 images per client). Per
round the fixed cost is round_s (the kind=round row) minus the slowest client rank's
pure training time: the sum of train_s over that rank's clients (kind=client rows; a
client's rank from clients.csv). Reported: the medians over rounds 2..R (round 1 carries
one-time warm-up) of the fixed cost, of round_s and of ckpt_s (the checkpoint's share:
with several clients per rank a checkpoint holds only the index of the personal-state
files, which each round writes for the clients it trained), the ratio to the smallest N, the
distinct clients trained (UDEC: those holding personal state), a client rank's peak
RSS and the set-up time (the job's wall time, launch to exit, minus the sum of round_s:
start-up, data split, placement, the final summary). Trials alternate over N and method, so that
machine noise hits every N alike. One table per method (--methods, default full,udec);
FULL keeps the quickstart's EMA, UDEC runs with train.ema_decay=0 (with several clients
per rank it keeps no per-client EMA, and refuses one).

(b) Memory, UDEC. The same jobs with fed.method=udec and a higher participation
(--mem-participation, --mem-rounds) so that most clients hold personal regions (encoder
+ bottleneck, kept on their rank) by the end. Reported: the peak RSS of a client rank
(max of the kind=client rows' rank_max_rss_mb; a row is written after the rank's
training of that round, so it includes the checkpoints of the rounds before), the
personal state per client (fp32 bytes of the personal regions), how many clients hold
one at the end (every client that trained), and the same N = max job with a tiny
fed.client_state_mb (--spill-mb), with a checkpoint every round and with one at the end
only (checkpoint.every=0), to show that the cache bound holds.

    OMP_NUM_THREADS=1 python bench/clients.py             # full: (a) and (b)
    OMP_NUM_THREADS=1 python bench/clients.py --quick     # smoke: N = 10, 100, 2 rounds
    python bench/clients.py --methods full --trials 3 --skip-memory

Tables are printed and written to bench/results/clients.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from fedmpi.config import load_config
from fedmpi.fl.methods import personal_regions
from fedmpi.model.summary import model_region_sizes
from fedmpi.store.runfolder import RunFolder

CONFIG = "configs/quickstart.yaml"
SAMPLED = 10  # clients per round in (a)


def run_job(
    launcher: str, out: Path, n: int, method: str, rounds: int, part: float, extra=()
) -> dict:
    """One federated job; returns its run folder and wall time (s)."""
    if out.exists():
        shutil.rmtree(out)
    args = [
        "-m",
        "fedmpi.train",
        "--config",
        str(C.ROOT / CONFIG),
        "--run-dir",
        str(out),
        f"--fed.method={method}",
        f"--fed.clients={n}",
        f"--fed.participation={part}",
        "--fed.sampling=fixed",
        f"--fed.rounds={rounds}",
        "--fed.local_steps=1",
        "--train.batch_size=1",
        "--data.train_subset=60000",
        "--eval.every=0",
        "--eval.extractor=none",
        "--eval.grid=0",
        "--checkpoint.every=1",
        "--run.progress_every=0",
        f"--run.out_dir={out.parent}",
        # UDEC with several clients per rank keeps no per-client EMA: it must be off
        *(["--train.ema_decay=0"] if method != "full" else []),
        *extra,
    ]
    t0 = time.perf_counter()
    proc = C.run_ranks(launcher, 3, args, timeout=3600, echo=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return {"run": RunFolder(out), "wall": wall}


def analyse(job: dict) -> dict:
    """Per-round fixed cost and round_s (rounds 2..R), set-up time, memory, state holders."""
    run = job["run"]
    rank_of = {int(p["client"]) + 1: int(p["rank"]) for p in run.read_placement()}
    rows = run.read_metrics()
    rounds = {r["round"]: r["round_s"] for r in rows if r.get("kind") == "round"}
    ckpt = {r["round"]: r.get("ckpt_s", 0.0) for r in rows if r.get("kind") == "round"}
    clients = [r for r in rows if r.get("kind") == "client"]
    busy: dict[tuple[int, int], float] = {}  # (round, rank) -> summed train_s
    for r in clients:
        key = (r["round"], rank_of[r["client"]])
        busy[key] = busy.get(key, 0.0) + r["train_s"]
    fixed, round_s, ckpt_s = [], [], []
    for i, s in sorted(rounds.items()):
        slowest = max((t for (j, _), t in busy.items() if j == i), default=0.0)
        if i > 1 or len(rounds) == 1:
            fixed.append(s - slowest)
            round_s.append(s)
            ckpt_s.append(ckpt[i])
    return {
        "fixed": fixed,
        "round_s": round_s,
        "ckpt_s": ckpt_s,
        "setup": job["wall"] - sum(rounds.values()),
        "rss": max((r.get("rank_max_rss_mb", 0.0) for r in clients), default=float("nan")),
        "holders": len({r["client"] for r in clients}),
        "clients": len(rank_of),
    }


def fixed_cost(args, work: Path) -> list[str]:
    """(a): per method, a table of the fixed cost, round_s and set-up time against N."""
    ns, methods = C.int_list(args.clients), args.methods.split(",")
    got = {(m, n): [] for m in methods for n in ns}
    for trial in range(args.trials):
        for n in ns:
            for m in methods:
                part = min(1.0, SAMPLED / n)
                job = run_job(args.launcher, work / f"{m}-N{n}-{trial}", n, m, args.rounds, part)
                res = analyse(job)
                got[(m, n)].append(res)
                print(
                    f"  {m} N={n} trial {trial}: fixed {C.median(res['fixed']):.3f} s/round, "
                    f"set-up {res['setup']:.1f} s, wall {job['wall']:.1f} s",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(work / f"{m}-N{n}-{trial}", ignore_errors=True)
    tables = []
    for m in methods:
        med = {n: _pooled(got[(m, n)]) for n in ns}
        base = med[ns[0]]["fixed"]
        rows = [
            [
                n,
                min(n, SAMPLED),
                f"{med[n]['fixed']:.3f}",
                f"{med[n]['fixed'] / base:.2f}x",
                f"{med[n]['round_s']:.3f}",
                f"{med[n]['ckpt_s']:.3f}",
                med[n]["trained"],
                f"{med[n]['setup']:.1f}",
                f"{med[n]['rss']:.0f}",
            ]
            for n in ns
        ]
        head = ["N", "per round", "fixed (s/round)", f"vs N={ns[0]}", "round_s", "ckpt_s"]
        tables.append(
            f"### {m.upper()}: fixed cost per round, median of rounds 2..{args.rounds} "
            f"over {args.trials} trial(s)\n\n"
            + C.markdown_table([*head, "clients trained", "set-up (s)", "peak RSS (MiB)"], rows)
        )
    return tables


def _pooled(results: list[dict]) -> dict:
    return {
        "fixed": C.median(x for r in results for x in r["fixed"]),
        "round_s": C.median(x for r in results for x in r["round_s"]),
        "ckpt_s": C.median(x for r in results for x in r["ckpt_s"]),
        "trained": max(r["holders"] for r in results),
        "setup": C.median(r["setup"] for r in results),
        "rss": max(r["rss"] for r in results),
    }


def memory(args, work: Path) -> str:
    """(b): UDEC client ranks' peak RSS against N, and with spilling."""
    cfg = load_config(C.ROOT / CONFIG)
    sizes = model_region_sizes(cfg)
    state_bytes = 4 * sum(sizes[r] for r in personal_regions("udec"))
    ns = C.int_list(args.mem_clients)
    runs = [(n, args.mem_rounds, (), "default") for n in ns]
    big = max(ns)
    mb = f"--fed.client_state_mb={args.spill_mb}"
    runs += [
        (big, args.mem_rounds, (mb,), f"{args.spill_mb} MiB, ckpt every round"),
        (big, args.mem_rounds, (mb, "--checkpoint.every=0"), f"{args.spill_mb} MiB, ckpt at end"),
    ]
    rows = []
    for i, (n, rounds, extra, label) in enumerate(runs):
        job = run_job(
            args.launcher, work / f"mem-{i}", n, "udec", rounds, args.mem_participation, extra
        )
        res = analyse(job)
        held = res["holders"] * state_bytes / 2**20
        rows.append(
            [n, label, res["holders"], f"{held:.0f}", f"{res['rss']:.0f}", f"{job['wall']:.0f}"]
        )
        print(f"  memory {rows[-1]}", flush=True)
        if not args.keep:
            shutil.rmtree(work / f"mem-{i}", ignore_errors=True)
    head = [
        "N",
        "fed.client_state_mb",
        "clients holding state",
        "their state (MiB, both ranks)",
        "client rank peak RSS (MiB)",
        "wall (s)",
    ]
    return (
        f"### UDEC memory: participation {args.mem_participation}, {args.mem_rounds} rounds; "
        f"personal state {state_bytes:,} bytes per client ({state_bytes / 2**20:.2f} MiB)\n\n"
        + C.markdown_table(head, rows)
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/clients.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="10,100,1000", help="(a): comma-separated N")
    p.add_argument("--methods", default="full,udec", help="(a): comma-separated fed.method")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--trials", type=int, default=1, help="(a): jobs per (N, method)")
    p.add_argument("--mem-clients", default="10,100,1000", help="(b): comma-separated N")
    p.add_argument("--mem-rounds", type=int, default=3)
    p.add_argument("--mem-participation", type=float, default=0.5)
    p.add_argument("--spill-mb", type=float, default=64.0, help="(b): the tiny client_state_mb")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-fixed", action="store_true")
    p.add_argument("--quick", action="store_true", help="N = 10, 100; 2 rounds")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--launcher", default=C.DEFAULT_LAUNCHER, help=C.LAUNCHER_HELP)
    p.add_argument("--out-dir", default=str(C.RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.clients = args.mem_clients = "10,100"
        args.rounds = args.mem_rounds = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 3 ranks on few cores
    C.print_environment("bench/clients.py", C.environment(3, "mpi", "cpu"))
    work = Path(tempfile.mkdtemp(prefix="fedmpi-clients-"))
    print(f"# run folders under {work}", flush=True)
    sections, t0 = [], time.perf_counter()
    try:
        if not args.skip_fixed:
            sections += fixed_cost(args, work)
        if not args.skip_memory:
            sections.append(memory(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n\n".join(sections)
    print(f"\n{text}\n\n(bench/clients.py took {time.perf_counter() - t0:.0f} s)")
    C.save_result(args.out_dir, "clients.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
