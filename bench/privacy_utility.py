"""The privacy-utility table: DP-FedAvg with Poisson sampling over 1,000 clients.

Fashion-MNIST split IID over N = 1,000 clients (60 images each), each round a Poisson
sample of rate q = 0.01 (10 clients expected) trains one local epoch (2 steps of batch
32) of the quickstart UNet, on 3 ranks (1 federator + 2 client ranks). The same number
of rounds, the same seed, three privacy settings: no DP, and central DP-FedAvg (clip C,
fixed denominator q N) with the noise multiplier z that the RDP accountant gives
epsilon about 8 and about 2 at delta = 1e-5 after R rounds (solved here with the same
accountant the job reports). Each run ends with fd_classifier over eval.num_samples
samples and a sample grid.

    python bench/privacy_utility.py                     # R = 100
    python bench/privacy_utility.py --rounds 5 --quick  # a smoke run of the script

Writes a markdown table (and the grids, copied) to --out (default
docs/privacy_utility/); the run folders go to --runs (default runs/privacy_utility/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common as C

from fedmpi.fl.privacy import epsilon
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import format_table

N, Q, DELTA = 1000, 0.01, 1e-5


def noise_for(target: float, rounds: int) -> float:
    """The noise multiplier z with epsilon(z, rounds, DELTA, Q) = target (bisection)."""
    lo, hi = 0.2, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon(mid, rounds, DELTA, Q) < target else (mid, hi)
    return hi


def run_job(
    runs: Path, name: str, rounds: int, samples: int, extra: list[str], local_steps=None
) -> Path:
    run = runs / name
    if run.exists():
        shutil.rmtree(run)
    overrides = [f"--fed.clients={N}", f"--fed.participation={Q}", "--fed.sampling=poisson"]
    steps = "null" if local_steps is None else local_steps
    overrides += [f"--fed.rounds={rounds}", "--fed.local_epochs=1", f"--fed.local_steps={steps}"]
    overrides += ["--fed.reset_optimizer=true", "--train.warmup_steps=0", "--eval.every=0"]
    overrides += [f"--eval.num_samples={samples}", "--checkpoint.every=0"]
    overrides += ["--run.progress_every=0", *extra]
    print(f"{name}: {C.train_quickstart(run, overrides):.0f} s", flush=True)
    return run


def score_raw(run: RunFolder, index: int, samples: int) -> dict:
    """fd_classifier of the final global model's raw weights (the quickstart recipe
    samples from the EMA of the weights, which after few rounds of few local steps still
    leans on the initial model), seeded as the run's own evaluation."""
    import torch

    from fedmpi.eval.evaluate import Evaluator
    from fedmpi.model.summary import model_shape
    from fedmpi.model.unet import build_unet
    from fedmpi.store.checkpoint import load_checkpoint

    cfg = run.read_config([f"--eval.num_samples={samples}"])
    model = build_unet(cfg.model, *model_shape(cfg))
    model.load_state_dict(load_checkpoint(run.checkpoint_dir(index) / "federator.pt")["model"])
    model.channels_last = cfg.train.channels_last
    evaluator = Evaluator(cfg, None, run.path, torch.device("cpu"))
    return evaluator.score_model(model, index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="each sampled client's local steps (default: one epoch of its 60 images, 2 steps)",
    )
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "privacy_utility")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "privacy_utility")
    ap.add_argument("--quick", action="store_true", help="128 samples (a smoke run)")
    ap.add_argument(
        "--score-only", action="store_true", help="reuse finished runs in --runs; only score"
    )
    args = ap.parse_args()
    samples = 128 if args.quick else args.samples
    args.out.mkdir(parents=True, exist_ok=True)
    settings = [("no DP", None)] + [(f"eps ~{t:g}", noise_for(t, args.rounds)) for t in (8, 2)]
    rows = []
    for label, z in settings:
        name = "nodp" if z is None else f"eps{label.split('~')[1]}"
        extra = []
        if z is not None:
            extra = ["--privacy.dp=true", f"--privacy.noise_multiplier={z:.4f}"]
            extra += [f"--privacy.clip={args.clip}", f"--privacy.delta={DELTA}"]
        t0 = time.perf_counter()
        run = RunFolder(args.runs / name)
        if not (args.score_only and run.checkpoint_dir(args.rounds).is_dir()):
            run = RunFolder(run_job(args.runs, name, args.rounds, samples, extra, args.local_steps))
        minutes = (time.perf_counter() - t0) / 60
        rounds = [r for r in run.read_metrics() if r.get("kind") == "round"]
        last = rounds[-1]
        raw = score_raw(run, args.rounds, samples)
        grid = run.grids(args.rounds)
        if grid:
            shutil.copy(grid[0], args.out / f"{name}.png")
        rows.append(
            {
                "setting": label,
                "z": "-" if z is None else f"{z:.3f}",
                "epsilon": "inf" if z is None else f"{last['epsilon']:.2f}",
                "rounds": args.rounds,
                "local steps": args.local_steps or 2,
                "clients/round": f"{sum(r['participants'] for r in rounds) / len(rounds):.1f}",
                "loss": f"{last['loss']:.4f}",
                "fd_classifier (EMA)": f"{last.get('fd_classifier', float('nan')):.1f}",
                "fd_classifier (raw)": f"{raw.get('fd_classifier', float('nan')):.1f}",
                "classes (raw)": raw.get("classes_present", "-"),
                "minutes": f"{minutes:.1f}",
                "grid": f"{name}.png",
            }
        )
    head = list(rows[0])
    table = format_table(head, [[r[k] for k in head] for r in rows], markdown=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
