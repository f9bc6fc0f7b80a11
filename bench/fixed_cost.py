"""A federated round's fixed cost (everything but local training), this checkout against
a baseline commit, measured side by side on the same machine in the same run.

Each job is a real `mpirun -n K+1 python -m fedmpi.train` on the given config (default:
the paper model, 2,996,315 parameters) with local training reduced to one step of
batch 1, checkpointing every round as configured, no evaluation. Per round the fixed
cost is `round_s - train_s` from metrics.jsonl (snapshot / optimizer reset, waiting,
the flag collective, aggregation, checkpoint, gathering stats and ledger, metrics);
the median over rounds 2..R (round 1 carries one-time warm-up) is reported. Baseline
and current jobs alternate (--trials each) so that machine noise hits both alike; the
table gives the medians and the ratio current / baseline.

    python bench/fixed_cost.py                       # K = 2 and 10 vs the session's base commit
    python bench/fixed_cost.py --clients 2,5 --baseline HEAD~3 --trials 3

The baseline is exported with `git archive` into a temporary folder and run from there
(same venv); it must accept the same command line.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "a45e1b2"  # main before the trust / speed work of issues 9 and 11


def export(ref: str, dest: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def one_job(
    code: Path, launcher: str, k: int, config: str, rounds: int, out: Path, overrides: list[str]
) -> list[float]:
    """Fixed cost of rounds 2..R of one job (seconds)."""
    from fedmpi.store.tables import read_jsonl

    if out.exists():
        shutil.rmtree(out)
    # each code with its own copy of the config (the baseline's schema is older)
    args = [
        "-m",
        "fedmpi.train",
        "--config",
        str(code / config),
        "--run-dir",
        str(out),
        f"--fed.rounds={rounds}",
        "--fed.local_steps=1",
        "--train.batch_size=1",
        "--data.train_subset=2000",
        "--eval.extractor=none",
        "--eval.grid=0",
        f"--run.out_dir={out.parent}",
        *overrides,
    ]
    proc = C.run_ranks(launcher, k + 1, args, timeout=1800, cwd=code, code=code, echo=False)
    if proc.returncode != 0:
        raise SystemExit(f"job failed (exit {proc.returncode}) in {code}:\n{proc.stdout[-2000:]}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "round"]
    return [r["round_s"] - r["train_s"] for r in rows if r["round"] > 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/fixed_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/paper/fmnist_full.yaml")
    p.add_argument("--clients", default="2,10", help="comma-separated K values")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trials", type=int, default=2, help="jobs per (code, K), alternating")
    p.add_argument("--baseline", default=BASELINE, help="git ref to compare against")
    p.add_argument("--launcher", default=C.DEFAULT_LAUNCHER)
    p.add_argument("--out-dir", default=str(C.RESULTS))
    args, overrides = p.parse_known_args(argv)
    ks = C.int_list(args.clients)
    work = Path(tempfile.mkdtemp(prefix="fedmpi-fixed-"))
    codes = {"baseline": export(args.baseline, work / "baseline"), "current": ROOT}
    C.print_environment(
        "bench/fixed_cost.py", C.environment(",".join(str(k + 1) for k in ks), "mpi", "cpu")
    )
    print(
        f"# baseline {args.baseline} vs this checkout | config {args.config} | "
        f"{args.rounds} rounds, fixed cost of rounds 2..R | {args.trials} trials each",
        flush=True,
    )
    results = {}
    try:
        for k in ks:
            samples = {name: [] for name in codes}
            for trial in range(args.trials):
                for name, code in codes.items():
                    samples[name] += one_job(
                        code,
                        args.launcher,
                        k,
                        args.config,
                        args.rounds,
                        work / f"{name}-K{k}-{trial}",
                        overrides,
                    )
            results[k] = {name: statistics.median(v) for name, v in samples.items()}
            print(
                f"K={k}: baseline {results[k]['baseline']:.3f} s, current "
                f"{results[k]['current']:.3f} s per round",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        [k, f"{r['baseline']:.3f}", f"{r['current']:.3f}", f"{r['current'] / r['baseline']:.2f}x"]
        for k, r in results.items()
    ]
    table = C.markdown_table(
        ["K", f"baseline {args.baseline} (s/round)", "current (s/round)", "current / baseline"],
        rows,
    )
    print("\n" + table)
    C.save_result(args.out_dir, "fixed_cost.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
