"""Compression against quality: every method x scheme on the quickstart config.

For each method (FULL, USPLIT, UDEC, ULATDEC) and upload scheme (none, bf16, int8 with
error feedback, top-k with error feedback) one quickstart run (1 federator + 2 clients,
Fashion-MNIST, the small UNet) of the same rounds and seed, scored at the end with
fd_classifier over --samples samples (personal models for UDEC / ULATDEC: the mean over
the clients). Reports the bytes each run handed to MPI (uploads and in all, from its
comm.csv), the final score and its ratio to the same method uncompressed, and plots the
score against cumulative bytes.

    python bench/compress_quality.py                       # 16 runs, 3 rounds each
    python bench/compress_quality.py --methods full --schemes none,int8 --rounds 6
    python bench/compress_quality.py --rounds 1 --samples 128 --quick   # smoke run

Finished runs in --runs are reused (delete a folder to redo it). Writes
compress_quality.{md,json,png} to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common as C

from fedmpi.fl.ledger import read_ledger
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import format_table

SCHEMES = {
    "none": [],
    "bf16": ["--fed.compress=bf16", "--fed.error_feedback=false"],
    "int8+EF": ["--fed.compress=int8", "--fed.error_feedback=true"],
    "topk+EF": ["--fed.compress=topk", "--fed.error_feedback=true"],
}


def run_job(run: Path, method: str, scheme: str, args) -> float:
    """Train one run (unless finished); returns its minutes (0 when reused)."""
    if RunFolder(run).checkpoint_dir(args.rounds).is_dir():
        return 0.0
    if run.exists():
        shutil.rmtree(run)
    overrides = [f"--fed.method={method}", f"--fed.rounds={args.rounds}", "--eval.every=0"]
    overrides += [f"--eval.num_samples={args.samples}", "--checkpoint.every=0"]
    overrides += [f"--fed.topk_fraction={args.topk_fraction}", "--run.progress_every=0"]
    minutes = C.train_quickstart(run, overrides + SCHEMES[scheme]) / 60
    print(f"{run.name}: {minutes:.1f} min", flush=True)
    return minutes


def result(run: RunFolder, method: str, scheme: str, minutes: float) -> dict:
    rows = read_ledger(run.path / "comm.csv")
    up = sum(r["bytes"] for r in rows if r["direction"] == "up")
    total = sum(r["bytes"] for r in rows)
    last = [r for r in run.read_metrics() if r.get("kind") == "round"][-1]
    return {
        "method": method,
        "scheme": scheme,
        "up_MB": up / 1e6,
        "total_MB": total / 1e6,
        "fd_classifier": last.get("fd_classifier", last.get("fd_classifier_mean", float("nan"))),
        "fd_std": last.get("fd_classifier_std"),
        "loss": last["loss"],
        "minutes": minutes,
    }


def plot(results: list[dict], path: Path) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = dict(zip(SCHEMES, "osD^"))
    for method in dict.fromkeys(r["method"] for r in results):
        mine = [r for r in results if r["method"] == method]
        line = ax.plot([r["total_MB"] for r in mine], [r["fd_classifier"] for r in mine], ":")[0]
        for r in mine:
            ax.scatter(
                r["total_MB"],
                r["fd_classifier"],
                color=line.get_color(),
                marker=markers[r["scheme"]],
            )
        line.set_label(method.upper())
    for scheme, m in markers.items():
        ax.scatter([], [], color="gray", marker=m, label=scheme)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes moved in the run (MB, log scale)")
    ax.set_ylabel("final fd_classifier (lower is better, log scale)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="full,usplit,udec,ulatdec")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--topk-fraction", type=float, default=0.01)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "compress_quality")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        sys.exit(f"unknown scheme(s) {sorted(unknown)}; choose from {list(SCHEMES)}")
    results = []
    for method in args.methods.split(","):
        for scheme in schemes:
            run = args.runs / f"{method}_{scheme.replace('+', '_')}"
            minutes = run_job(run, method, scheme, args)
            results.append(result(RunFolder(run), method, scheme, minutes))
    base = {r["method"]: r for r in results if r["scheme"] == "none"}
    head = ["method", "scheme", "upload MB", "x fewer", "all MB", "fd_classifier", "vs none"]
    table = []
    for r in results:
        b = base.get(r["method"])
        fd = f"{r['fd_classifier']:.1f}" + (f" +- {r['fd_std']:.1f}" if r["fd_std"] else "")
        table.append(
            [
                r["method"].upper(),
                r["scheme"],
                f"{r['up_MB']:.2f}",
                f"{b['up_MB'] / r['up_MB']:.2f}" if b else "-",
                f"{r['total_MB']:.2f}",
                fd,
                f"{r['fd_classifier'] / b['fd_classifier']:.3f}" if b else "-",
            ]
        )
    text = format_table(head, table, markdown=True)
    args.out.mkdir(parents=True, exist_ok=True)
    C.save_result(args.out, "compress_quality.md", text + "\n")
    (args.out / "compress_quality.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "compress_quality.png")
    print(text)


if __name__ == "__main__":
    main()
