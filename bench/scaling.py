"""Weak scaling of fedmpi: time and bytes per round as the number of clients grows.

For each world size W in --worlds (W = 1 federator + K clients) it launches a real job,
`<launcher> -n W python -m fedmpi.train --config C --run-dir D --fed.local_steps=S ...`,
with fixed work per client (S local steps of the configured batch size, and
--images-per-client images each, so data.train_subset = K * that), then reads the run's
metrics.jsonl (round_s, train_s = slowest client's training, agg_s, eval_s, ckpt_s) and
comm.csv (bytes actually moved per round, client side). The first --skip rounds are
dropped as warm-up and the medians of the rest are reported:

    W, K, round s, train s, agg s, other s, MB/round, MB/client/round, efficiency

with efficiency = (round - checkpoint - evaluation) time at the smallest W over the same at
W (1.0 = perfect weak scaling; the last round always writes a checkpoint, shown apart).
On one small machine the ranks share the cores, so the time columns show contention,
not the method; the byte columns are exact anywhere. Writes scaling_<method>.csv / .png.

Laptop (more ranks than cores needs Open MPI's --oversubscribe, in the default launcher):
    python bench/scaling.py --quick
    python bench/scaling.py --worlds 3,5,9 --local-steps 20 --methods full,udec
Slurm (from a job script of, e.g., --ntasks=17; one job step per world size):
    python bench/scaling.py --worlds 3,5,9,17 --launcher "srun --mpi=pmix -n {n}" \\
        --local-steps 50 --images-per-client 6000 --run.device=cuda
Trailing --section.key=value arguments are passed to every run (fedmpi overrides).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from fedmpi.store import tables

DEFAULT_CONFIG = "configs/paper/fmnist_full.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/scaling.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--worlds", default=None, help="world sizes W = K + 1 (default 3,5,9; quick 3,5,9)"
    )
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--methods", default="full", help="comma list of fedmpi methods")
    p.add_argument(
        "--backend", default=None, help="mpi | torch (default: the config's fed.backend)"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 4; quick 3)")
    p.add_argument("--skip", type=int, default=1, help="warm-up rounds left out of the medians")
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="local steps per client per round (default 10; quick 1)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: the config's train.batch_size (quick: 8)",
    )
    p.add_argument(
        "--images-per-client",
        type=int,
        default=None,
        help="training images per client (default 1024; quick 64)",
    )
    p.add_argument(
        "--launcher", "--mpirun", dest="launcher", default=C.DEFAULT_LAUNCHER, help=C.LAUNCHER_HELP
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--out-dir", default=str(C.RESULTS))
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders")
    p.add_argument(
        "--quick", action="store_true", help="small sizes (about 1-2 minutes on 2 cores)"
    )
    args, overrides = p.parse_known_args(argv)
    q = args.quick
    args.worlds = C.int_list(args.worlds or "3,5,9")
    if min(args.worlds) < 2:
        p.error("every world size needs >= 2 ranks (1 federator + clients)")
    args.rounds = args.rounds or (3 if q else 4)
    if args.rounds <= args.skip:
        p.error("--rounds must exceed --skip")
    args.local_steps = args.local_steps or (1 if q else 10)
    args.images_per_client = args.images_per_client or (64 if q else 1024)
    if q and args.batch_size is None:
        args.batch_size = 8
    args.methods = [m for m in args.methods.split(",") if m]
    for o in overrides:
        if not o.startswith("--") or "." not in o.split("=")[0]:
            p.error(f"unrecognized argument {o!r} (config overrides look like --model.dim=64)")
    return args, overrides


def _settings(args, method: str, K: int) -> list[str]:
    """The fedmpi overrides of one run: fixed work per client, no evaluation."""
    settings = [
        f"--fed.method={method}",
        f"--fed.rounds={args.rounds}",
        f"--fed.local_steps={args.local_steps}",
        f"--data.train_subset={K * args.images_per_client}",
        "--eval.extractor=none",
        "--eval.grid=0",
        "--eval.every=0",
        "--checkpoint.every=0",
        "--split.kind=iid",
    ]
    if args.batch_size:
        settings.append(f"--train.batch_size={args.batch_size}")
    if args.backend:
        settings.append(f"--fed.backend={args.backend}")
    return settings


def _medians(args, run_dir: Path, method: str, W: int) -> dict:
    """The row of one finished run: medians of the rounds after --skip, from its
    metrics.jsonl and comm.csv."""
    from fedmpi.fl.ledger import read_ledger
    from fedmpi.store.tables import read_jsonl

    K = W - 1
    rounds = [
        r
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r.get("kind") == "round" and r["round"] > args.skip
    ]
    ledger = [r for r in read_ledger(run_dir / "comm.csv") if r["client"] >= 0]
    per_round = {}
    for r in ledger:
        if r["round"] > args.skip:
            per_round[r["round"]] = per_round.get(r["round"], 0) + r["bytes"]
    med = {
        k: C.median(float(r.get(k) or 0.0) for r in rounds)
        for k in ("round_s", "train_s", "agg_s", "eval_s", "ckpt_s")
    }
    other = C.median(
        float(r["round_s"])
        - sum(float(r.get(k) or 0.0) for k in ("train_s", "agg_s", "eval_s", "ckpt_s"))
        for r in rounds
    )
    work = C.median(
        float(r["round_s"]) - float(r.get("ckpt_s") or 0.0) - float(r.get("eval_s") or 0.0)
        for r in rounds
    )
    ips = [v for r in rounds for v in (r.get("images_per_s") or []) if v]
    return dict(
        method=method,
        W=W,
        K=K,
        rounds=len(rounds),
        local_steps=args.local_steps,
        batch_size=args.batch_size or "",
        **med,
        other_s=other,
        round_excl_ckpt_s=work,
        bytes_per_round=C.median(per_round.values()),
        bytes_per_client_round=C.median(per_round.values()) / K,
        client_images_per_s=C.median(ips),
    )


def one_run(args, overrides, method: str, W: int) -> dict:
    K = W - 1
    run_dir = Path(args.out_dir) / "scaling" / f"{method}_W{W}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    proc = C.run_ranks(
        args.launcher,
        W,
        [
            "-m",
            "fedmpi.train",
            "--config",
            args.config,
            "--run-dir",
            str(run_dir),
            *_settings(args, method, K),
            *overrides,
        ],
        log_path=run_dir.with_suffix(".log"),
        timeout=args.timeout,
        echo=False,
    )
    tail = "\n".join(proc.stdout.splitlines()[-6:])
    if proc.returncode != 0:
        raise SystemExit(f"run W={W} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    print(tail, flush=True)
    out = _medians(args, run_dir, method, W)
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def table(rows: list[dict]) -> str:
    headers = [
        "method",
        "W",
        "K",
        "round s",
        "train s",
        "agg s",
        "ckpt s",
        "other s",
        "MB/round",
        "MB/client/round",
        "client img/s",
        "efficiency",
    ]
    body = []
    for r in rows:
        base = next(x for x in rows if x["method"] == r["method"])
        body.append(
            [
                r["method"],
                r["W"],
                r["K"],
                f"{r['round_s']:.2f}",
                f"{r['train_s']:.2f}",
                f"{r['agg_s']:.3f}",
                f"{r['ckpt_s']:.3f}",
                f"{r['other_s']:.2f}",
                f"{r['bytes_per_round'] / 1e6:.1f}",
                f"{r['bytes_per_client_round'] / 1e6:.2f}",
                f"{r['client_images_per_s']:.1f}",
                f"{base['round_excl_ckpt_s'] / r['round_excl_ckpt_s']:.2f}",
            ]
        )
    return C.markdown_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = C.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ws = [r["W"] for r in mine]
        ax1.plot(ws, [r["round_s"] for r in mine], "o-", label=f"{method}: round")
        ax1.plot(ws, [r["train_s"] for r in mine], "s--", label=f"{method}: local training")
        ax1.plot(ws, [r["agg_s"] for r in mine], "^:", label=f"{method}: aggregation")
        ax2.plot(ws, [r["bytes_per_round"] / 1e6 for r in mine], "o-", label=method)
    ax1.set_ylabel("seconds per round (median)")
    ax2.set_ylabel("MB moved per round (all clients)")
    for ax in (ax1, ax2):
        ax.set_xlabel("world size W = K + 1")
        ax.set_xticks(sorted({r["W"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from fedmpi.config import load_config

    cfg = load_config(args.config, overrides)
    C.print_environment(
        "bench/scaling.py",
        C.environment(
            ",".join(map(str, args.worlds)),
            args.backend or cfg.fed.backend,
            None if cfg.run.device == "auto" else cfg.run.device,
        ),
    )
    print(
        f"# launcher '{args.launcher}' | config {args.config} {' '.join(overrides)} | "
        f"{args.rounds} rounds ({args.skip} warm-up) x {args.local_steps} local steps, batch "
        f"{args.batch_size or cfg.train.batch_size}, {args.images_per_client} images per client",
        flush=True,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        for W in args.worlds:
            rows.append(one_run(args, overrides, method, W))
    tag = "_".join(args.methods)
    print(
        f"\n## weak scaling ({args.local_steps} local steps per client per round, median of "
        f"rounds {args.skip + 1}..{args.rounds})\n"
    )
    print(table(rows))
    tables.write_csv(out / f"scaling_{tag}.csv", rows)
    plot(
        rows,
        out / f"scaling_{tag}.png",
        f"fedmpi weak scaling: {args.config}, {args.local_steps} steps/client/round",
    )
    print(f"\nwrote {out / f'scaling_{tag}.csv'}, {out / f'scaling_{tag}.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
