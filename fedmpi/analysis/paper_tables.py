"""The paper's tables beyond the cells: the communication table, Welch's t-tests between
methods, the method order against the paper's, whether the paper's values apply, the
K x E matrix, precision and recall beside the metric, and the LaTeX of every table.
report_output.py puts them into report.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from fedmpi.analysis.paper import (
    PAPER_MAIN,
    PAPER_PARAMS_K10_R15,
    Cell,
    fmt_value,
    millions,
    paper_differences,
    paper_k_by_e,
    paper_setting,
    paper_value,
    welch,
)
from fedmpi.analysis.report import MANIFOLD, SPLIT_LABEL, Table, describe
from fedmpi.store.tables import format_table


def params_rows(table: Table) -> list[tuple]:
    """(K, R, method) -> mean parameters exchanged by the runs that wrote comm_summary.json."""
    out = {}
    for r in table.runs:
        if r.centralized or r.params is None:
            continue
        key = (r.clients, r.cfg.fed.rounds)
        out.setdefault(key, {}).setdefault(r.method, []).append(r)
    return sorted(out.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))


def comm_markdown(table: Table) -> str:
    """The communication table: per K, R and method, what all clients exchanged over the
    run by the paper's rule (parameters, MB as float32, % less than FULL) and the same
    per client per round; the paper's count beside K = 10, R = 15 at its model."""
    rows = params_rows(table)
    if not rows:
        return "No run of this table has finished a federated job yet (no comm_summary.json)."
    body = []
    for (k, rounds), by in rows:
        for m in [m for m in table.methods() if m in by]:
            runs = by[m]
            params = float(np.mean([r.params["paper"] for r in runs]))
            mb = float(np.mean([r.params["paper_bytes"] for r in runs])) / 1e6
            red = float(np.mean([r.params["reduction_vs_full"] for r in runs]))
            paper = ""
            if (k, rounds) == (10, 15) and paper_setting(table.setting):
                paper = millions(PAPER_PARAMS_K10_R15[m])
            per = max(1, (k or 1) * (rounds or 1))
            body.append(
                [
                    str(k),
                    str(rounds),
                    m.upper(),
                    millions(params),
                    f"{mb:,.1f}",
                    "-" if m == "full" else f"{-100 * red:+.1f}%",
                    millions(params / per),
                    f"{mb / per:,.2f}",
                    paper,
                ]
            )
    head = ["K", "R", "method", "parameters", "MB", "vs FULL", "per client-round", "MB", "paper"]
    return format_table(head, body, markdown=True, align="rrlrrrrrr")


def welch_markdown(table: Table) -> str:
    """Per row, Welch's t-test between every two methods: the two-sided p (* below 0.05)."""
    methods = table.methods()
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
    body = []
    for clients, split in table.rows():
        if split == "centralized" or not pairs:
            continue
        row = [str(clients), SPLIT_LABEL.get(split, split)]
        for a, b in pairs:
            res = welch(
                Cell(table.cell_runs(clients, split, a)), Cell(table.cell_runs(clients, split, b))
            )
            row.append("n/a" if res is None else f"{res[1]:.3g}" + ("*" if res[1] < 0.05 else ""))
        if any(c != "n/a" for c in row[2:]):
            body.append(row)
    if not body:
        return ""
    head = ["K", "split"] + [f"{a.upper()} vs {b.upper()}" for a, b in pairs]
    return format_table(head, body, markdown=True, align="rl" + "r" * len(pairs))


def manifold_values(runs, key: str) -> list[float]:
    """The final `key` (precision / recall) values of finished runs, pooled as the cells
    pool the metric (one per run, or one per client for personal models)."""
    return [v for r in runs if r.scored for v in r.manifold.get(key, [])]


def manifold_markdown(table: Table) -> str:
    """Precision / recall per cell (mean ± std; '' when no run of the table has them)."""
    if not any(r.manifold for r in table.runs):
        return ""
    methods = table.methods()
    body = []
    for clients, split in table.rows():
        row = [str(clients if clients is not None else "?"), SPLIT_LABEL.get(split, split)]
        for m in methods:
            parts = []
            for key in MANIFOLD:
                v = manifold_values(table.cell_runs(clients, split, m), key)
                sd = f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""
                parts.append(f"{np.mean(v):.2f}{sd}" if v else "-")
            row.append(" / ".join(parts) if any(p != "-" for p in parts) else "")
        body.append(row)
    head = ["K", "split"] + [m.upper() for m in methods]
    return format_table(head, body, markdown=True, align="rl" + "l" * len(methods))


def ranks_markdown(table: Table) -> str:
    """Per row that the paper's main table has: the methods ordered by this table's mean
    score and by the paper's FID (best first), and Kendall's tau between the two orders
    (1: the same order, -1: reversed). An ordering, so it compares any metric."""
    from scipy import stats

    body = []
    for clients, split in table.rows():
        paper = PAPER_MAIN.get((clients, split))
        if not paper:
            continue
        ours = {m: Cell(table.cell_runs(clients, split, m)).mean for m in table.methods()}
        ours = {m: v for m, v in ours.items() if v is not None and m in paper}
        if len(ours) < 2:
            continue
        ms = sorted(ours, key=ours.get)
        theirs = sorted(ms, key=lambda m: paper[m][0])
        tau = stats.kendalltau([ours[m] for m in ms], [paper[m][0] for m in ms]).statistic
        body.append(
            [
                str(clients),
                SPLIT_LABEL.get(split, split),
                " < ".join(m.upper() for m in ms),
                " < ".join(m.upper() for m in theirs),
                f"{tau:+.2f}",
                "yes" if ms[0] == theirs[0] else "no",
            ]
        )
    if not body:
        return ""
    head = ["K", "split", "this table (best first)", "paper", "Kendall tau", "same best"]
    return format_table(head, body, markdown=True, align="rlllrl")


def paper_line(table: Table) -> str:
    """Whether the paper's values stand beside the cells, and if not, which settings differ."""
    if table.metric != "fid":
        return ""
    common = paper_differences(table)
    personal = [
        d
        for m in ("udec", "ulatdec")
        if m in table.methods()
        for d in paper_differences(table, m)
        if d not in common
    ]
    if not common and not personal:
        return (
            "Paper values: beside every cell (the settings are the paper's on every item checked)."
        )
    if common:
        return (
            "Paper values not shown; settings that differ from the paper's: "
            + "; ".join(common)
            + "."
        )
    return "Paper values not shown for UDEC / ULATDEC: " + "; ".join(dict.fromkeys(personal)) + "."


@dataclass
class KByE:
    """The K x E study: FULL, IID runs of tables whose settings differ only in the local
    epochs, as one matrix (rows K, columns E). `tables`: E -> the table of that E."""

    tables: dict
    covered: list  # tables with no run outside the matrix (not printed on their own)

    def cell(self, clients, e) -> Cell:
        t = self.tables.get(e)
        return Cell(t.cell_runs(clients, "iid", "full") if t else [])

    def rows(self) -> list:
        return sorted(
            {
                r.clients
                for t in self.tables.values()
                for r in t.runs
                if r.method == "full" and r.split == "iid"
            }
        )

    def paper(self, clients, e):
        return paper_k_by_e(self.tables[e], clients, e)


def k_by_e(tables: list[Table]) -> list[KByE]:
    """One matrix per group of tables that differ only in fed.local_epochs (2+ values)."""
    groups: dict = {}
    for t in tables:
        e = t.setting.get("fed.local_epochs")
        if e is None or t.setting.get("fed.local_steps"):
            continue
        key = json.dumps(
            {k: v for k, v in t.setting.items() if k != "fed.local_epochs"}, default=str
        )
        groups.setdefault(key, {})[e] = t
    out = []
    for by_e in groups.values():
        has = {e: t for e, t in sorted(by_e.items()) if t.cell_runs_any("iid", "full")}
        if len(has) < 2:
            continue
        covered = [
            t
            for t in has.values()
            if all(r.centralized or (r.column, r.split) == ("full", "iid") for r in t.runs)
        ]
        out.append(KByE(has, covered))
    return out


def k_by_e_markdown(m: KByE) -> str:
    es = list(m.tables)
    body = []
    for k in m.rows():
        row = [str(k)]
        for e in es:
            cell = m.cell(k, e)
            row.append(cell.text(m.paper(k, e)) if cell.runs else "")
        body.append(row)
    return format_table(
        ["K"] + [f"E={e}" for e in es], body, markdown=True, align="r" + "l" * len(es)
    )


# ---------------------------------------------------------------- LaTeX

_TEX_SPECIAL = {"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$"}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(text))


def _tex_cell(cell: Cell, paper) -> str:
    if cell.mean is None:
        return "--"
    text = f"${fmt_value(cell.mean)}"
    text += rf" \pm {fmt_value(cell.std)}$" if cell.std is not None else "$"
    if paper:
        text += f" ({fmt_value(paper[0])})"
    return text


def _tabular(head: list[str], rows: list[list[str]], caption: str) -> str:
    cols = "r" * len(head)
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex(caption)}}}",
            rf"\begin{{tabular}}{{{cols}}}",
            r"\hline",
            " & ".join(head) + r" \\",
            r"\hline",
            *[" & ".join(r) + r" \\" for r in rows],
            r"\hline",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def latex(tables: list[Table], matrices: list[KByE], covered: set) -> str:
    """The tables as LaTeX (tabular, mean +- std, the paper's value in
    parentheses where it applies)."""
    parts = [
        "% fedmpi report: mean \\pm sample std over runs (clients pooled for personal models)",
        "",
    ]
    for i, t in enumerate(tables, 1):
        if id(t) in covered:
            continue
        methods = t.methods()
        rows = [
            [str(k), _tex(SPLIT_LABEL.get(sp, sp))]
            + [_tex_cell(Cell(t.cell_runs(k, sp, m)), paper_value(t, k, sp, m)) for m in methods]
            for k, sp in t.rows()
        ]
        caption = f"Table {i}: {t.metric or 'no score'}; {describe(t)}"
        parts.append(_tabular(["K", "split"] + [m.upper() for m in methods], rows, caption))
    for m in matrices:
        es = list(m.tables)
        rows = [[str(k)] + [_tex_cell(m.cell(k, e), m.paper(k, e)) for e in es] for k in m.rows()]
        first = next(iter(m.tables.values()))
        caption = f"K x E, FULL, IID: {first.metric}; {describe(first)}"
        parts.append(_tabular(["K"] + [f"E={e}" for e in es], rows, caption))
    return "\n".join(parts)
