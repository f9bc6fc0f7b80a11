"""The files of a report: report.md, table.csv, runs.csv and score_vs_params.png.

`write_report(runs, out, sources)` writes to `out`:

- report.md            one table per setting in the paper's layout (rows K x split,
                       columns the methods, cells from `paper.Cell`, the paper's value
                       beside a cell where the setting is the paper's), the parameters
                       exchanged per method, then every run with its status;
- table.csv            the same tables as numbers (one row per K x split, columns per method);
- runs.csv             one row per run;
- score_vs_params.png  final score against the parameters the run exchanged, one point per
                       run (one PNG per metric when the runs were scored differently).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmpi.analysis.paper import (
    PAPER_PARAMS_K10_R15,
    Cell,
    fmt_value,
    millions,
    paper_setting,
    paper_value,
)
from fedmpi.analysis.plot import METRIC_LABEL, _plt, _save
from fedmpi.analysis.report import (
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


def _params_rows(table: Table) -> list[tuple]:
    """(K, R, method) -> mean parameters exchanged by the runs that wrote comm_summary.json."""
    out = {}
    for r in table.runs:
        if r.centralized or r.params is None:
            continue
        key = (r.clients, r.cfg.fed.rounds)
        out.setdefault(key, {}).setdefault(r.method, []).append(r)
    return sorted(out.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))


def _params_markdown(table: Table) -> str:
    rows = _params_rows(table)
    if not rows:
        return "No run of this table has finished a federated job yet (no comm_summary.json)."
    methods = [m for m in table.methods() if any(m in by for _, by in rows)]
    body = []
    for (k, rounds), by in rows:
        row = [str(k), str(rounds)]
        for m in methods:
            runs = by.get(m, [])
            if not runs:
                row.append("")
                continue
            paper = float(np.mean([r.params["paper"] for r in runs]))
            red = float(np.mean([r.params["reduction_vs_full"] for r in runs]))
            text = millions(paper) + (f" ({-100 * red:+.1f}%)" if m != "full" else "")
            if (k, rounds) == (10, 15) and paper_setting(table.setting):
                text += f"; paper {millions(PAPER_PARAMS_K10_R15[m])}"
            row.append(text)
        body.append(row)
    return format_table(["K", "R"] + [m.upper() for m in methods], body, markdown=True)


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
                "split_seed": r.cfg.split.seed,
                "status": r.status,
                "done": r.progress.done,
                "total": r.progress.total,
                "unit": r.progress.unit,
                "metric": r.metric or "",
                "score_mean": float(np.mean(vals)) if vals else None,
                "score_std_over_clients": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "scores": " ".join(f"{v:.6g}" for v in vals),
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
            out.append(row)
    return out


INTRO = (
    "Cells: the score of each run's final round (lower is better), mean ± sample "
    "standard deviation over runs (seeds); for UDEC and ULATDEC, whose clients keep "
    "personal models, over every client of every run, pooled as the reference does "
    "(n = runs × clients). Parameters exchanged count the paper's rule (initial model "
    "+ R uploads + R - 1 downloads), from each run's comm_summary.json."
)


def _tables_markdown(tables: list[Table]) -> list[str]:
    """One section per table: its setting, metric note, cells and parameters exchanged."""
    lines = []
    for i, t in enumerate(tables, 1):
        lines += [
            f"## Table {i}" + (f": {t.title}" if t.title else ""),
            "",
            f"Setting: {describe(t)}.",
            "",
            METRIC_NOTE[t.metric],
            "",
            _table_markdown(t),
            "",
            f"Parameters exchanged (table {i}):",
            "",
            _params_markdown(t),
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
    lines += _tables_markdown(tables)
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
    return {
        "markdown": md,
        "table_csv": out / "table.csv",
        "runs_csv": out / "runs.csv",
        "png": pngs,
    }


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
