"""Plots of finished (or running) runs: scores, the score / bytes trade-off, losses, splits.

Owns the figures (`make_plots` writes every one the runs have data for; matplotlib's Agg
backend, no display needed); the runs and their series come from `runs.py`. What each
PNG shows is `python -m fedmpi.plot --help` (fedmpi.cli.plot).
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from fedmpi.analysis.runs import (
    Run,
    RunError,
    cumulative_bytes,
    has_metric,
    num,
    pick_metric,
    score_series,
    split_rows,
)

CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
METRIC_LABEL = {"fid": "FID (Inception)", "fd_classifier": "fd_classifier (classifier FD)"}


# ---------------------------------------------------------------- plotting


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless nodes have no display
    import matplotlib.pyplot as plt

    return plt


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, n: int) -> None:
    if n > 6:
        ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    else:
        ax.legend(fontsize="small")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _x_label(runs: list[Run]) -> str:
    kinds = {run.index_name for run in runs}
    return (
        "round"
        if kinds == {"round"}
        else "epoch"
        if kinds == {"epoch"}
        else "round (federated) / epoch (centralized)"
    )


def _colors(runs: list[Run]) -> dict[str, tuple]:
    cmap = _plt().get_cmap("tab10")
    return {run.name: cmap(i % 10) for i, run in enumerate(runs)}


def plot_score_vs_round(runs: list[Run], metric: str, path: Path) -> Path | None:
    plt = _plt()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run in runs:
        xs, ys, sd = score_series(run, metric)
        if not len(xs):
            continue
        c = colors[run.name]
        label = run.label + (" mean $\\pm$ std over clients" if sd is not None else "")
        ax.plot(xs, ys, marker="o", ms=4, color=c, label=label)
        if sd is not None:
            s = np.nan_to_num(sd)
            ax.fill_between(xs, ys - s, ys + s, color=c, alpha=0.2, lw=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(_x_label(runs))
    ax.set_ylabel(f"{METRIC_LABEL[metric]}  (lower is better)")
    ax.set_title(f"{metric} vs {_x_label(runs)}")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    _legend(ax, drawn)
    return _save(fig, path)


def _byte_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if max_bytes >= scale:
            return scale, unit
    return 1.0, "bytes"


def plot_score_vs_bytes(runs: list[Run], metric: str, path: Path) -> Path | None:
    plt = _plt()
    colors = _colors(runs)
    data = []
    for run in runs:
        cum = cumulative_bytes(run)
        xs, ys, sd = score_series(run, metric)
        if run.centralized or not cum or not len(xs):
            continue
        keep = [i for i, x in enumerate(xs) if int(x) in cum]
        if not keep:
            continue
        b = np.array([cum[int(xs[i])] for i in keep], dtype=float)
        data.append((run, b, ys[keep], None if sd is None else sd[keep], xs[keep]))
    if not data:
        return None
    scale, unit = _byte_unit(max(d[1].max() for d in data))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, b, ys, sd, rounds in data:
        c = colors[run.name]
        label = run.label + (" mean $\\pm$ std" if sd is not None else "")
        ax.plot(b / scale, ys, marker="o", ms=4, color=c, label=label)
        if sd is not None:
            s = np.nan_to_num(sd)
            ax.fill_between(b / scale, ys - s, ys + s, color=c, alpha=0.2, lw=0)
        # name the last point's round: the same round count costs different bytes
        ax.annotate(
            f"r{int(rounds[-1])}",
            (b[-1] / scale, ys[-1]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize="x-small",
            color=c,
        )
    ax.set_xlabel(
        f"cumulative bytes exchanged by all clients, up + down, incl. initial model [{unit}]",
        fontsize="small",
    )
    ax.set_ylabel(f"{METRIC_LABEL[metric]}  (lower is better)")
    ax.set_title(f"{metric} vs communication")
    lo = min(d[1].min() for d in data)
    if lo > 0 and max(d[1].max() for d in data) / lo > 100:
        ax.set_xscale("log")  # runs of very different sizes: keep the small ones visible
        ax.set_xlabel(ax.get_xlabel() + ", log scale", fontsize="small")
    else:
        ax.set_xlim(left=0)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(data))
    return _save(fig, path)


def plot_loss(runs: list[Run], path: Path) -> Path | None:
    plt = _plt()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run in runs:
        pts = [(r["index"], num(r.get("loss")), r.get("client_loss")) for r in run.rows]
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        c = colors[run.name]
        xs = np.array([p[0] for p in pts], dtype=float)
        ax.plot(xs, [p[1] for p in pts], marker="o", ms=4, color=c, label=run.label)
        band = [(x, [num(v) for v in cl]) for x, _, cl in pts if isinstance(cl, list) and cl]
        band = [(x, [v for v in vals if math.isfinite(v)]) for x, vals in band]
        band = [(x, vals) for x, vals in band if vals]
        if band and any(len(v) > 1 for _, v in band):
            ax.fill_between(
                [x for x, _ in band],
                [min(v) for _, v in band],
                [max(v) for _, v in band],
                color=c,
                alpha=0.2,
                lw=0,
            )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(_x_label(runs))
    ax.set_ylabel(
        "training loss (band: min..max over clients)"
        if any(not r.centralized for r in runs)
        else "training loss"
    )
    ax.set_title(f"training loss vs {_x_label(runs)}")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    _legend(ax, drawn)
    return _save(fig, path)


def plot_per_client(run: Run, metric: str, path: Path) -> Path | None:
    per: dict[str, list] = {}
    for r in run.eval_rows:
        client = str(r.get("client", ""))
        if client in ("", "global") or r.get(metric) in (None, ""):
            continue
        per.setdefault(client, []).append((int(r["round"]), num(r[metric])))
    if not per:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10" if len(per) <= 10 else "tab20")
    for i, client in enumerate(sorted(per, key=lambda c: int(c) if c.isdigit() else 10**9)):
        pts = sorted(per[client])
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            ms=3,
            color=cmap(i % cmap.N),
            label=f"client {client}",
        )
    xs, ys, _ = score_series(run, metric)
    if len(xs):
        ax.plot(xs, ys, color="black", ls="--", lw=1.5, label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{METRIC_LABEL[metric]}  (lower is better)")
    ax.set_title(f"per-client {metric}: {run.label}", fontsize="medium")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    _legend(ax, len(per) + 1)
    return _save(fig, path)


def plot_split(run: Run, path: Path) -> Path | None:
    rows, desc = split_rows(run)
    plt = _plt()
    hist = np.array([r["histogram"] for r in rows])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.5 * len(rows) + 3)), 4.0))
    cmap = plt.get_cmap("tab10" if hist.shape[1] <= 10 else "tab20")
    bottom = np.zeros(len(rows))
    names = CLASS_NAMES.get(run.cfg.data.dataset, ())
    for j in range(hist.shape[1]):
        label = f"{j} {names[j]}" if j < len(names) else str(j)
        ax.bar(x, hist[:, j], bottom=bottom, color=cmap(j % cmap.N), label=label)
        bottom += hist[:, j]
    # clients numbered 1..K (their ranks) as in every file of a run
    step = max(1, len(rows) // 25)
    ax.set_xticks(x[::step], [str(r["client"]) for r in rows][::step])
    ax.set_xlabel("client")
    ax.set_ylabel("training images")
    ax.set_title(f"client split: {run.label}\n{desc}", fontsize="medium")
    ax.legend(
        title="class",
        fontsize="small",
        ncol=1 if hist.shape[1] <= 10 else 2,
        bbox_to_anchor=(1.01, 1),
        loc="upper left",
    )
    return _save(fig, path)


# ---------------------------------------------------------------- CLI


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def unique_names(runs: list[Run]) -> None:
    """Distinct run names (used in legends and file names) even for same-named folders."""
    seen = Counter(run.name for run in runs)
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    used: set = set()
    for i, run in enumerate(runs):
        while run.name in used:
            run.name = f"{run.name}#{i + 1}"
        used.add(run.name)


def make_plots(
    runs: list[Run], out: Path, metric: str | None = None, log=print, warn=None
) -> list[Path]:
    """Write every plot the runs have data for; returns the paths written."""
    warn = warn or (lambda msg: print(f"note: {msg}", file=sys.stderr))
    written: list[Path] = []
    metric = pick_metric(runs, metric)
    if metric is None:
        warn("no run has scores (fid or fd_classifier): score plots skipped")
    else:
        settings = {}
        for run in runs:
            if has_metric(run, metric):
                e, d = run.cfg.eval, run.cfg.data
                key = (
                    d.dataset,
                    d.test_subset,
                    e.extractor,
                    e.num_samples,
                    e.sampler,
                    e.ddim_steps if e.sampler == "ddim" else None,
                )
                settings.setdefault(key, []).append(run.name)
        if len(settings) > 1:
            warn(
                "the runs were scored with different settings, their scores are not "
                "directly comparable: "
                + "; ".join(
                    f"{', '.join(names)}: {k[0]} test_subset={k[1]}, {k[2]}, {k[3]} samples, "
                    f"{k[4]}" + (f" {k[5]} steps" if k[5] else "")
                    for k, names in settings.items()
                )
            )
        missing = [run.name for run in runs if not has_metric(run, metric)]
        if missing:
            warn(f"no {metric} scores in {', '.join(missing)}: left out of the score plots")
        for p in (
            plot_score_vs_round(runs, metric, out / "score_vs_round.png"),
            plot_score_vs_bytes(runs, metric, out / "score_vs_bytes.png"),
        ):
            if p:
                written.append(p)
        for run in runs:
            if run.personal:
                p = plot_per_client(run, metric, out / f"per_client_{_slug(run.name)}.png")
                if p:
                    written.append(p)
    p = plot_loss(runs, out / "loss.png")
    if p:
        written.append(p)
    from fedmpi.data import DataError

    for run in runs:
        if run.centralized:
            continue
        try:
            written.append(plot_split(run, out / f"split_{_slug(run.name)}.png"))
        except (RunError, DataError, ValueError) as e:
            warn(f"{run.name}: client split plot skipped: {e}".split("\nTo get them")[0])
    return written
