"""The privacy-utility table: DP-FedAvg with Poisson sampling over 1,000 clients.

Fashion-MNIST split IID over N = 1,000 clients (60 images each), each round a Poisson
sample of rate q = 0.01 (10 clients expected) trains two local epochs (4 steps of batch
32, a fresh Adam at lr 2e-3) of the quickstart UNet, on 3 ranks (1 federator + 2 client
ranks). The same number of rounds, the same seed, three privacy settings: no DP, and
central DP-FedAvg (clip C, fixed denominator q N) with the noise multiplier z that the
RDP accountant gives epsilon about 8 and about 2 at delta = 1e-5 after R rounds (solved
here with the same accountant the job reports). Each run ends with fd_classifier over
--samples samples (of the EMA the job samples from, and of the raw weights) and a grid.

    python bench/privacy_utility.py                     # R = 100, about 30 minutes
    python bench/privacy_utility.py --rounds 5 --quick  # a smoke run of the script

Writes a markdown table (and the grids, copied) to --out (default
docs/privacy_utility/); the run folders go to --runs (default runs/privacy_utility/).
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


def recipe(args) -> list[str]:
    """The overrides of configs/quickstart.yaml every row shares: the population, the
    sampling and the local training of a sampled client. A sampled client starts a fresh
    Adam every round (nobody keeps 1,000 optimizer states), so the quickstart's 8e-3
    with warm-up, made for one Adam kept over 900 steps, is replaced by a rate that a
    fresh Adam's first steps (each about lr on every weight) survive."""
    steps = "null" if args.local_steps is None else args.local_steps
    return [
        f"--fed.clients={N}",
        f"--fed.participation={Q}",
        "--fed.sampling=poisson",
        f"--fed.rounds={args.rounds}",
        f"--fed.local_epochs={args.local_epochs}",
        f"--fed.local_steps={steps}",
        "--fed.reset_optimizer=true",
        f"--train.lr={args.lr}",
        f"--train.lr_min={args.lr / 10}",
        "--train.warmup_steps=0",
        f"--train.ema_decay={args.ema}",
    ]


def run_job(runs: Path, name: str, samples: int, overrides: list[str]) -> Path:
    run = runs / name
    if run.exists():
        shutil.rmtree(run)
    overrides = [*overrides, "--eval.every=0", f"--eval.num_samples={samples}"]
    overrides += ["--checkpoint.every=0", "--run.progress_every=0"]
    print(f"{name}: {C.train_quickstart(run, overrides):.0f} s", flush=True)
    return run


def score_raw(run: RunFolder, index: int, samples: int) -> dict:
    """fd_classifier of the final global model's raw weights (the job samples from the
    EMA of the weights), seeded as the run's own evaluation."""
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
        "--local-epochs", type=int, default=2, help="each sampled client's local epochs"
    )
    ap.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="each sampled client's local steps (default: its epochs of 60 images, 2 steps each)",
    )
    ap.add_argument("--lr", type=float, default=2e-3, help="local Adam's learning rate")
    ap.add_argument("--ema", type=float, default=0.98, help="train.ema_decay (0: off)")
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
        run = RunFolder(args.runs / name)
        if not (args.score_only and run.checkpoint_dir(args.rounds).is_dir()):
            run = RunFolder(run_job(args.runs, name, samples, recipe(args) + extra))
        rounds = [r for r in run.read_metrics() if r.get("kind") == "round"]
        minutes = sum(r["round_s"] for r in rounds) / 60  # the rounds, without the set-up
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
                "local steps": args.local_steps or 2 * args.local_epochs,
                "clients/round": f"{sum(r['participants'] for r in rounds) / len(rounds):.1f}",
                "loss": f"{last['loss']:.4f}",
                "fd_classifier (EMA)": f"{last.get('fd_classifier', float('nan')):.1f}",
                "fd_classifier (raw)": f"{raw.get('fd_classifier', float('nan')):.1f}",
                "precision / recall (raw)": (
                    f"{raw['precision']:.2f} / {raw['recall']:.2f}" if "recall" in raw else "-"
                ),
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
