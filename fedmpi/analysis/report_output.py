"""The files of a report: report.md, table.csv, table.tex, runs.csv and the PNGs.

`write_report(runs, out, sources)` writes to `out`:

- report.md            one table per setting in the paper's layout (rows K x split,
                       columns the methods, cells from `paper.Cell`: mean ± std [95% CI]
                       (n); the paper's value beside a cell only where the settings are the
                       paper's on every item of paper.PAPER_SETTING, else the settings that
                       differ), Welch's t-test between the methods per row, the
                       communication table (parameters, MB, % less than FULL, in all and
                       per client per round), the K x E matrix (tables that differ only in
                       E), then every run with its status;
- table.csv            the tables as numbers (one row per K x split, columns per method);
- table.tex            the same tables as LaTeX;
- runs.csv             one row per run;
- curves_tableN.png    per-round scores per cell (mean and ±1 std over runs per method);
- score_vs_params.png  final score against the parameters the run exchanged, one point per
                       run (one PNG per metric when the runs were scored differently).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmpi.analysis.paper import (
    Cell,
    fmt_value,
    paper_value,
)
from fedmpi.analysis.paper_tables import (
    KByE,
    comm_markdown,
    k_by_e,
    k_by_e_markdown,
    latex,
    manifold_markdown,
    manifold_values,
    paper_line,
    ranks_markdown,
    welch_markdown,
)
from fedmpi.analysis.plot import METRIC_LABEL, _plt, _save
from fedmpi.analysis.report import (
    MANIFOLD,
    SPLIT_LABEL,
    SPLIT_ORDER,
    RunResult,
    Table,
    describe,
    group_tables,
)
from fedmpi.fl.methods import METHODS
from fedmpi.store.tables import format_table, write_csv

# ---------------------------------------------------------------- report

METRIC_NOTE = {
    "fid": (
        "**Metric: FID** (Inception features, pytorch-fid). The paper's published FID "
        "stands beside a cell where the setting is the paper's."
    ),
    "fd_classifier": (
        "**Metric: fd_classifier** (Frechet distance in the offline "
        "classifier's features), not FID: it is not comparable with the "
        "paper's Inception FID, so no paper values are shown."
    ),
    None: (
        "**No score**: these runs were trained with `eval.extractor: none`; the table "
        "shows their status only (score them with `python -m fedmpi.evaluate RUN_DIR "
        "--extractor classifier`)."
    ),
}


def _table_markdown(table: Table) -> str:
    methods = table.methods()
    head = ["K", "split"] + [m.upper() for m in methods]
    body = []
    for clients, split in table.rows():
        row = [str(clients if clients is not None else "?"), SPLIT_LABEL.get(split, split)]
        for m in methods:
            row.append(
                Cell(table.cell_runs(clients, split, m)).text(paper_value(table, clients, split, m))
            )
        body.append(row)
    return format_table(head, body, markdown=True, align="rl" + "l" * len(methods))


def _runs_rows(runs: list[RunResult]) -> list[dict]:
    out = []
    for r in runs:
        vals = r.scores if r.scored else []
        out.append(
            {
                "run": r.name,
                "path": str(r.path),
                "method": r.method,
                "K": r.clients,
                "split": r.split,
                "seed": r.cfg.run.seed,
                "repeat": r.cfg.run.repeat,
                "split_seed": r.cfg.split.seed,
                "status": r.status,
                "done": r.progress.done,
                "total": r.progress.total,
                "unit": r.progress.unit,
                "metric": r.metric or "",
                "score_mean": float(np.mean(vals)) if vals else None,
                "score_std_over_clients": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "scores": " ".join(f"{v:.6g}" for v in vals),
                **{
                    f"{k}_mean": float(np.mean(r.manifold[k])) if r.manifold.get(k) else None
                    for k in MANIFOLD
                },
                "params_moved": r.params["moved"] if r.params else None,
                "params_paper_rule": r.params["paper"] if r.params else None,
            }
        )
    return out


def _table_csv_rows(tables: list[Table]) -> list[dict]:
    out = []
    for i, t in enumerate(tables, 1):
        for clients, split in t.rows():
            row = {
                "table": i,
                "setting": t.title or describe(t),
                "metric": t.metric or "",
                "K": clients,
                "split": split,
            }
            for m in METHODS:
                cell = Cell(t.cell_runs(clients, split, m))
                paper = paper_value(t, clients, split, m)
                params = [r.params["paper"] for r in cell.runs if r.params and not r.centralized]
                row.update(
                    {
                        f"{m}_mean": cell.mean,
                        f"{m}_std": cell.std,
                        f"{m}_n": len(cell.values),
                        f"{m}_runs": len(cell.runs),
                        f"{m}_incomplete": len(cell.incomplete()),
                        f"{m}_paper_fid_mean": paper[0] if paper else None,
                        f"{m}_paper_fid_std": paper[1] if paper else None,
                        f"{m}_params_paper_rule": float(np.mean(params)) if params else None,
                    }
                )
                for key in MANIFOLD:
                    v = manifold_values(cell.runs, key)
                    row[f"{m}_{key}_mean"] = float(np.mean(v)) if v else None
            out.append(row)
    return out


INTRO = (
    "Cells: the score of each run's final round (lower is better), mean ± sample "
    "standard deviation [95% confidence interval of the mean, Student's t] over runs "
    "(repeats); for UDEC and ULATDEC, whose clients keep personal models, over every "
    "client of every run, pooled as the reference does (n = runs × clients). Parameters "
    "exchanged count the paper's rule (initial model + R uploads + R - 1 downloads), "
    "from each run's comm_summary.json."
)


def _tables_markdown(
    tables: list[Table], matrices: list[KByE], covered: set, curves: dict
) -> list[str]:
    """One section per table not `covered` by a K x E matrix (its setting, metric note,
    paper values, cells, the pairwise tests, the communication table, the curves), then
    the K x E matrices."""
    lines = []
    for i, t in enumerate(tables, 1):
        if id(t) in covered:
            continue
        paper = paper_line(t)
        welch_md = welch_markdown(t)
        lines += [
            f"## Table {i}" + (f": {t.title}" if t.title else ""),
            "",
            f"Setting: {describe(t)}.",
            "",
            METRIC_NOTE[t.metric],
            "",
        ]
        lines += [paper, ""] if paper else []
        lines += [_table_markdown(t), ""]
        manifold = manifold_markdown(t)
        if manifold:
            k = t.runs[0].cfg.eval.precision_recall_k
            lines += [
                f"Precision / recall (table {i}; Kynkäänniemi et al. 2019, k = {k}, on the "
                "same features, higher is better: is a sample realistic / is the data "
                "covered; a model that drops classes keeps its precision and loses recall), "
                "mean ± std pooled as the cells above:",
                "",
                manifold,
                "",
            ]
        if welch_md:
            lines += [
                f"Do two methods differ (table {i})? Welch's t-test per row on the values "
                "pooled in each cell, two-sided p (* p < 0.05; n/a: fewer than two values):",
                "",
                welch_md,
                "",
            ]
        ranks = ranks_markdown(t)
        if ranks:
            lines += [
                f"Method order against the paper's (table {i}; the paper's Inception FID "
                "at K x split, whatever this table's metric and setting):",
                "",
                ranks,
                "",
            ]
        lines += [
            f"Communication (table {i}), the paper's rule (initial model + R uploads + R - 1 "
            "downloads, float32), all clients over the run and per client per round:",
            "",
            comm_markdown(t),
            "",
        ]
        if id(t) in curves:
            lines += [f"![per-round scores, table {i}]({curves[id(t)].name})", ""]
    for j, m in enumerate(matrices, 1):
        first = next(iter(m.tables.values()))
        lines += [
            f"## K x E{f' {j}' if len(matrices) > 1 else ''}: FULL, IID",
            "",
            f"Setting: {describe(first)} (E varies).",
            "",
            METRIC_NOTE[first.metric],
            "",
            k_by_e_markdown(m),
            "",
        ]
    return lines


def _runs_markdown(runs: list[RunResult]) -> str:
    """Every run with its status, score and the parameters it moved."""
    body = []
    for r in _runs_rows(runs):
        score = ""
        if r["score_mean"] is not None:
            score = f"{r['metric']} {fmt_value(r['score_mean'])}"
            if r["score_std_over_clients"]:
                score += f" ± {fmt_value(r['score_std_over_clients'])}"
        moved = "" if r["params_moved"] is None else f"{r['params_moved']:,} (moved)"
        split = SPLIT_LABEL.get(r["split"], r["split"])
        body.append([r["run"], r["method"], r["K"], split, r["seed"], r["status"], score, moved])
    head = ["run", "method", "K", "split", "seed", "status", "score", "parameters exchanged"]
    return format_table(head, body, markdown=True, align="llrllllr")


def write_report(runs: list[RunResult], out: Path, sources: list[str]) -> dict:
    """Write report.md, table.csv, runs.csv and the PNG(s) into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    tables = group_tables(runs)
    n_done = sum(r.progress.finished for r in runs)
    lines = [
        "# fedmpi report",
        "",
        f"{len(runs)} runs from {', '.join(sources)}: {n_done} finished, "
        f"{len(runs) - n_done} incomplete.",
        "",
        INTRO,
        "",
    ]
    matrices = k_by_e(tables)
    covered = {id(t) for m in matrices for t in m.covered}
    curves = {}
    for i, t in enumerate(tables, 1):
        if id(t) not in covered and any(len(r.curve) > 1 for r in t.runs):
            curves[id(t)] = plot_curves(t, out / f"curves_table{i}.png")
    lines += _tables_markdown(tables, matrices, covered, curves)
    pngs = []
    for metric in dict.fromkeys(r.metric for r in runs if r.scored):
        name = "score_vs_params.png" if len(pngs) == 0 else f"score_vs_params_{metric}.png"
        path = plot_score_vs_params([r for r in runs if r.metric == metric], metric, out / name)
        pngs.append(path)
        lines += [f"![{metric} vs parameters exchanged]({path.name})", ""]
    if not pngs:
        lines += ["No PNG: no finished run has a score.", ""]
    lines += ["## Runs", "", _runs_markdown(runs), ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    write_csv(out / "table.csv", _table_csv_rows(tables))
    write_csv(out / "runs.csv", _runs_rows(runs))
    (out / "table.tex").write_text(latex(tables, matrices, covered))
    return {
        "markdown": md,
        "table_csv": out / "table.csv",
        "runs_csv": out / "runs.csv",
        "latex": out / "table.tex",
        "png": pngs + list(curves.values()),
    }


# ---------------------------------------------------------------- per-round curves


def plot_curves(table: Table, path: Path) -> Path:
    """One panel per row of the table (K x split): each method's score after every scored
    round, the mean over its runs with a band of +-1 std over runs (a centralized run's
    epochs on the same axis)."""
    plt = _plt()
    rows = table.rows()
    cols = min(3, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (clients, split) in zip(axes.flat, rows):
        for i, m in enumerate(METHODS):
            runs = [r for r in table.cell_runs(clients, split, m) if len(r.curve) > 1]
            if not runs:
                continue
            xs = sorted(set.intersection(*(set(r.curve) for r in runs)))
            ys = np.array([[r.curve[x] for x in xs] for r in runs])
            mean = ys.mean(axis=0)
            label = "centralized" if split == "centralized" else m.upper()
            ax.plot(xs, mean, marker="o", ms=3, color=cmap(i), label=f"{label} ({len(runs)})")
            if len(runs) > 1:
                sd = ys.std(axis=0, ddof=1)
                ax.fill_between(xs, mean - sd, mean + sd, color=cmap(i), alpha=0.15)
        ax.set_title(f"K={clients}, {SPLIT_LABEL.get(split, split)}", fontsize="medium")
        ax.set_xlabel("epoch" if split == "centralized" else "round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"{table.metric} (lower is better)", fontsize="small")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- the plot

MARKERS = {"iid": "o", "label_skew": "s", "quantity_skew": "^", "shards": "D"}


def _draw_runs(ax, fed: list[RunResult], colors: dict) -> None:
    """One point (with a +-1 std bar over clients for personal models) per federated run."""
    labelled = set()
    # runs of one method and K move the same parameters whatever the split: set the
    # splits slightly apart so that their points and bars stay visible
    splits = sorted({r.split for r in fed}, key=lambda s: (SPLIT_ORDER + (s,)).index(s))
    for r in fed:
        y = float(np.mean(r.scores))
        yerr = float(np.std(r.scores, ddof=1)) if r.personal and len(r.scores) > 1 else None
        key = (r.method, r.split)
        x = r.params["moved"] / 1e6 * (1 + 0.02 * (splits.index(r.split) - (len(splits) - 1) / 2))
        ax.errorbar(
            x,
            y,
            yerr=yerr,
            fmt=MARKERS.get(r.split, "P"),
            color=colors[r.method],
            ms=7,
            capsize=3,
            alpha=0.85,
            label=None
            if key in labelled
            else f"{r.method.upper()}, {SPLIT_LABEL.get(r.split, r.split)}",
        )
        labelled.add(key)
        ax.annotate(
            f"K{r.clients}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize="x-small",
            color=colors[r.method],
        )


def plot_score_vs_params(runs: list[RunResult], metric: str, path: Path) -> Path:
    """One point per finished, scored run: final score against the parameters it
    exchanged (measured, what the run moved); personal models with a +-1 std bar over
    clients. Centralized runs move nothing: a dashed line at their mean."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i) for i, m in enumerate(METHODS)}
    done = [r for r in runs if r.scored]
    fed = [r for r in done if not r.centralized and r.params]
    _draw_runs(ax, fed, colors)
    central = [float(np.mean(r.scores)) for r in done if r.centralized]
    if central:
        ax.axhline(
            float(np.mean(central)),
            color="black",
            ls="--",
            lw=1,
            label=f"centralized (mean of {len(central)})",
        )
    xs = [r.params["moved"] for r in fed]
    span = max(xs, default=0) / 1e6
    if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
        ax.set_xscale("log")  # runs of very different sizes: keep the small ones visible
    else:
        ax.set_xlim(0, 1.08 * span if span else None)
    ax.set_xlabel("parameters exchanged by all clients, up + down, incl. initial model [millions]")
    ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)}, final round  (lower is better)")
    left_out = len(runs) - len(done)
    ax.set_title(
        f"{metric} vs communication: {len(done)} runs"
        + (f" ({left_out} unfinished / unscored not shown)" if left_out else ""),
        fontsize="medium",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(
        fontsize="small",
        bbox_to_anchor=(1.01, 1),
        loc="upper left",
        title="bars: ±1 std over clients" if any(r.personal for r in fed) else None,
        title_fontsize="x-small",
    )
    return _save(fig, path)
