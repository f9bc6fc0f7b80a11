"""The report's paper tables (fedmpi.analysis.report_output) on run folders written here.

Each folder is what a finished federated run leaves for the report: config.yaml, the
round rows of metrics.jsonl, eval.csv (a score after every round), comm_summary.json
and the COMPLETE marker of its last checkpoint, with scores chosen by the test so that
every number of the report can be checked against a value computed here. The end-to-end
report of real runs is tests/analysis/test_sweep.py's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from mpihelp import ROOT
from scipy import stats

from fedmpi.analysis.report import find_runs, read_run
from fedmpi.analysis.report_output import write_report
from fedmpi.config import load_config
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import write_csv

PAPER = ROOT / "configs/paper/fmnist_full.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, scores: list[list[float]], extra=None, **overrides) -> Path:
    """A finished run of the paper's config (+ overrides): `scores[r - 1]` are round r's
    scores (one for a global model, one per client for a personal one); `extra`: other
    eval.csv columns shaped as `scores` (precision, recall)."""
    cfg = load_config(PAPER, {**overrides, "run.name": path.name})
    run = RunFolder(path)
    path.mkdir(parents=True)
    run.write_config(cfg)
    rounds = len(scores)
    kind = "epoch" if cfg.split.num_clients == 1 else "round"  # K = 1: the baseline
    (path / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": kind, kind: r}) + "\n" for r in range(1, rounds + 1))
    )
    personal = cfg.fed.method in ("udec", "ulatdec")
    metric = "fid" if cfg.eval.extractor == "inception" else "fd_classifier"
    rows = [
        {
            "round": r,
            "client": (c + 1) if personal else "global",
            metric: v,
            **{key: table[r - 1][c] for key, table in (extra or {}).items()},
        }
        for r, vals in enumerate(scores, 1)
        for c, v in enumerate(vals)
    ]
    write_csv(path / "eval.csv", rows)
    k, full = cfg.split.num_clients, 1_000_000
    if k == 1:
        run.mark_complete(rounds, keep=0)
        return path
    share = {"full": 1.0, "usplit": 0.75, "udec": 0.25, "ulatdec": 0.6}[cfg.fed.method]
    paper = int(full * (1 + k * rounds * share + k * (rounds - 1) * share))
    run.write_summary(
        {
            "method": cfg.fed.method,
            "clients": k,
            "rounds": rounds,
            "paper": {"reduction_vs_full": 1 - share},
            "measured": {
                "moved": {"params": paper, "bytes": 4 * paper},
                "paper": {"params": paper, "bytes": 4 * paper},
            },
        }
    )
    run.mark_complete(rounds, keep=0)
    return path


def test_main_table_ci_welch_ranks_comm_and_latex(tmp_path):
    sweep = tmp_path / "main"
    full = [30.0, 32.0, 31.0]
    usplit = [40.0, 44.0, 41.0]
    udec = [[50.0, 60.0], [55.0, 65.0], [52.0, 58.0]]  # per run, per client
    for i in range(3):
        common = {"split.num_clients": 2, "split.kind": "iid", "fed.rounds": 15}
        common["run.repeat"] = i
        fake_run(sweep / f"full-r{i}", [[90.0]] * 14 + [[full[i]]], **common)
        fake_run(
            sweep / f"usplit-r{i}",
            [[95.0]] * 14 + [[usplit[i]]],
            **{**common, "fed.method": "usplit"},
        )
        fake_run(
            sweep / f"udec-r{i}",
            [[99.0, 99.0]] * 14 + [udec[i]],
            **{**common, "fed.method": "udec"},
        )
    runs = [read_run(p) for p in find_runs([sweep])]
    out = write_report(runs, tmp_path / "report", [str(sweep)])
    md = out["markdown"].read_text()

    # the paper's value stands beside the cells: every checked setting is the paper's
    assert "Paper values: beside every cell" in md
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(full), scale=stats.sem(full))
    cell = f"31.0 ± 1 [{lo:.1f}, {hi:.1f}] (3 runs); paper 38.5 ± 1.8"
    assert f"| 2 | IID | {cell} |" in md, md
    pooled = [v for r in udec for v in r]
    assert f"{np.mean(pooled):.1f} ± {np.std(pooled, ddof=1):.1f}" in md
    assert "(3 runs, n=6); paper 49.0 ± 16.3" in md
    # Welch's t between methods, per row
    p = stats.ttest_ind(full, usplit, equal_var=False).pvalue
    assert "| FULL vs USPLIT |" in md and f"{p:.3g}*" in md
    # method order against the paper's (K = 2, IID: the paper has USPLIT 37.2 before FULL 38.5)
    assert "| 2 | IID | FULL < USPLIT < UDEC | USPLIT < FULL < UDEC | +0.33 | no |" in md, md
    # communication: parameters, MB, % less than FULL, per client per round
    k, r, params = 2, 15, 1e6 * (1 + 2 * 15 * 0.25 + 2 * 14 * 0.25)  # fake_run's count
    per = params / (k * r)
    row = f"| 2 | 15 | UDEC | {params / 1e6:.3g}M | {4 * params / 1e6:.1f} | -75.0% | "
    assert row + f"{per / 1e6:.3g}M | {4 * per / 1e6:.2f} |" in md, md
    # the per-round curves and LaTeX
    png = tmp_path / "report" / "curves_table1.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and "curves_table1.png" in md
    tex = out["latex"].read_text()
    assert r"2 & IID & $31.0 \pm 1$ (38.5) & $41.7 \pm 2.08$ (37.2)" in tex, tex
    assert r"\begin{tabular}{rrrrr}" in tex and r"fashion\_mnist" in tex


def test_paper_values_withheld_naming_what_differs(tmp_path):
    sweep = tmp_path / "main"
    for i in range(2):
        fake_run(
            sweep / f"r{i}",
            [[40.0 + i]],
            **{"split.num_clients": 2, "fed.rounds": 1, "eval.sampler": "ddim", "run.repeat": i},
        )
    md = write_report([read_run(p) for p in find_runs([sweep])], tmp_path / "rep", ["x"])[
        "markdown"
    ].read_text()
    assert "; paper " not in md
    assert "Paper values not shown; settings that differ from the paper's:" in md
    assert "eval.sampler = ddim (paper: ddpm)" in md and "fed.rounds = 1 (paper: 15)" in md


@pytest.mark.parametrize("paper_rounds", [True, False])
def test_k_by_e_matrix_from_tables_that_differ_in_e(tmp_path, paper_rounds):
    sweep = tmp_path / "ke"
    at = {"fed.rounds": 15} if paper_rounds else {"fed.rounds": 1}
    rounds = 15 if paper_rounds else 1
    for k in (2, 5):
        for e in (1, 5):
            for i in range(2):
                fake_run(
                    sweep / f"K{k}-E{e}-r{i}",
                    [[100.0 / e + k + i]] * rounds,
                    **{"split.num_clients": k, "fed.local_epochs": e, "run.repeat": i, **at},
                )
    # the centralized baseline joins the tables, but is no row of the K x E matrix
    fake_run(sweep / "central", [[50.0]], **{"split.num_clients": 1, "train.epochs": 1, **at})
    runs = [read_run(p) for p in find_runs([sweep])]
    assert [r.method for r in runs if r.scored].count("centralized") == 1
    md = write_report(runs, tmp_path / "rep", ["x"])["markdown"].read_text()
    assert "## K x E: FULL, IID" in md and "| K | E=1 | E=5 |" in md
    assert "| 1 |" not in md.split("## K x E")[1].split("## Runs")[0]
    assert "## Table" not in md  # every run is in the matrix: no single-E tables
    # K = 5, E = 1: 105, 106 -> 105.5 ± 0.707; beside it the paper's K x E value (its own
    # study: at E = 5 that is 39.0 for K = 5, not the main table's 39.4), only at R = 15
    assert "| 5 | 105.5 ± 0.707" in md, md
    if paper_rounds:
        assert "(2 runs); paper 105.3 |" in md and "(2 runs); paper 39.0 |" in md, md
    else:
        assert "; paper " not in md
    rows = list(csv.DictReader((tmp_path / "rep" / "table.csv").open()))
    assert len(rows) == 6  # the tables stay in table.csv: K = 1, 2, 5 per E


@pytest.mark.parametrize("method", ["udec"])
def test_personal_scoring_point_withholds_only_personal_paper_values(tmp_path, method):
    sweep = tmp_path / "m"
    common = {"split.num_clients": 2, "fed.rounds": 15, "eval.personal": "aggregated"}
    fake_run(sweep / "full", [[1.0]] * 15, **common)
    fake_run(sweep / "udec", [[1.0, 2.0]] * 15, **{**common, "fed.method": method})
    md = write_report([read_run(p) for p in find_runs([sweep])], tmp_path / "rep", ["x"])[
        "markdown"
    ].read_text()
    assert "Paper values not shown for UDEC / ULATDEC" in md
    assert "eval.personal = aggregated (paper: local)" in md
    assert "(1 run); paper 38.5 ± 1.8" in md  # FULL's cell keeps its paper value
    assert "n=2); paper" not in md


def test_precision_recall_beside_the_cells(tmp_path):
    """eval.csv's precision and recall of the final round, pooled per cell as the metric
    is (per run, per client for personal models), in report.md, table.csv and runs.csv;
    a table whose runs have none gets no such section."""
    sweep = tmp_path / "main"
    common = {"split.num_clients": 2, "split.kind": "iid", "fed.rounds": 2}
    precision, recall = [0.8, 0.6], [0.5, 0.3]
    for i in range(2):
        fake_run(
            sweep / f"full-r{i}",
            [[90.0], [30.0 + i]],
            {"precision": [[0.1], [precision[i]]], "recall": [[0.1], [recall[i]]]},
            **{**common, "run.repeat": i},
        )
    fake_run(
        sweep / "udec-r0",
        [[99.0, 99.0], [50.0, 60.0]],
        {"precision": [[0.1, 0.1], [0.9, 0.7]], "recall": [[0.1, 0.1], [0.2, 0.4]]},
        **{**common, "fed.method": "udec"},
    )
    runs = [read_run(p) for p in find_runs([sweep])]
    out = write_report(runs, tmp_path / "report", [str(sweep)])
    md = out["markdown"].read_text()
    assert "Precision / recall (table 1; Kynkäänniemi et al. 2019, k = 3" in md, md
    full = f"0.70 ± {np.std(precision, ddof=1):.2f} / 0.40 ± {np.std(recall, ddof=1):.2f}"
    udec = f"0.80 ± {np.std([0.9, 0.7], ddof=1):.2f} / 0.30 ± {np.std([0.2, 0.4], ddof=1):.2f}"
    assert f"| 2 | IID | {full} | {udec} |" in md, md
    with (tmp_path / "report" / "table.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["full_recall_mean"]) == pytest.approx(0.4)
    assert float(row["udec_precision_mean"]) == pytest.approx(0.8)
    with (tmp_path / "report" / "runs.csv").open() as f:
        by_run = {r["run"]: r for r in csv.DictReader(f)}
    assert float(by_run["full-r1"]["precision_mean"]) == pytest.approx(0.6)

    bare = tmp_path / "bare"
    fake_run(bare / "full-r0", [[90.0], [30.0]], **common)
    md = write_report([read_run(bare / "full-r0")], tmp_path / "r2", [str(bare)])["markdown"]
    assert "Precision / recall" not in md.read_text()
