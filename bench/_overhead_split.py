"""The round-time split of bench/overhead.py: a short real federated run (or an existing
one) and the share of each part of its rounds, read from metrics.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def short_run(args, overrides) -> Path:
    out = Path(args.out_dir) / "overhead_run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    if args.run_args is not None:
        extra = args.run_args.split()
    else:
        extra = [
            "--fed.rounds=3",
            "--fed.local_steps=3",
            "--train.batch_size=16",
            "--data.train_subset=512",
            "--data.test_subset=100",
            "--eval.every=1",
            "--eval.extractor=none",
            "--eval.num_samples=24",
            "--eval.grid=24",
            "--eval.batch_size=24",
            "--eval.ddim_steps=10",
            "--checkpoint.every=1",
        ]
    proc = C.run_ranks(
        args.launcher,
        args.ranks,
        ["-m", "fedmpi.train", "--config", args.config, "--run-dir", str(out), *extra, *overrides],
        log_path=Path(args.out_dir) / "overhead_run.log",
        timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"the federated run failed (exit {proc.returncode}); see "
            f"{Path(args.out_dir) / 'overhead_run.log'}"
        )
    return out


def round_split(run_dir: Path) -> dict:
    from fedmpi.store.tables import read_jsonl

    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r.get("kind") == "round"]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no round rows")
    parts = ("train_s", "agg_s", "eval_s", "ckpt_s")
    names = {
        "train_s": "local training (slowest client)",
        "agg_s": "aggregation",
        "eval_s": "evaluation",
        "ckpt_s": "checkpoint",
        "other_s": "other (waiting, preemption check, stats, ledger, metrics)",
    }
    keys = (*parts, "other_s", "round_s")
    table_rows, totals, steady = [], dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
    first = min(r["round"] for r in rows)
    for r in rows:
        vals = {k: float(r.get(k) or 0.0) for k in parts}
        vals["round_s"] = float(r["round_s"])
        vals["other_s"] = vals["round_s"] - sum(vals[k] for k in parts)
        for k in totals:
            totals[k] += vals[k]
            if r["round"] > first:  # the first round carries one-time warm-up
                steady[k] += vals[k]
        table_rows.append(
            [r["round"], f"{vals['round_s']:.2f}"]
            + [f"{vals[k]:.3f}" for k in (*parts, "other_s")]
            + [f"{(r.get('bytes') or 0) / 1e6:.1f}"]
        )
    print(f"\n## round time split: {run_dir} ({rows[0].get('method')}, {len(rows)} rounds)\n")
    print(
        C.markdown_table(
            ["round", "round s", "train s", "agg s", "eval s", "ckpt s", "other s", "MB"],
            table_rows,
        )
    )
    print()
    has_steady = steady["round_s"] > 0

    def pct(d, k):
        return f"{100 * d[k] / d['round_s']:.1f}%" if d["round_s"] > 0 else "-"

    share = [
        [names[k], f"{totals[k]:.2f}", pct(totals, k)] + ([pct(steady, k)] if has_steady else [])
        for k in (*parts, "other_s")
    ]
    share.append(
        ["round (total)", f"{totals['round_s']:.2f}", "100.0%"] + (["100.0%"] if has_steady else [])
    )
    headers = ["part", "seconds (all rounds)", "share (all rounds)"]
    if has_steady:
        headers.append(f"share (rounds {first + 1}+)")
    print(C.markdown_table(headers, share, align="lrrr"[: len(headers)]))
    return dict(
        run_dir=str(run_dir),
        rounds=len(rows),
        totals=totals,
        steady=steady,
        shares={k: totals[k] / totals["round_s"] for k in (*parts, "other_s")},
    )
