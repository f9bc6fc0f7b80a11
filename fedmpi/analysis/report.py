"""The paper's tables from run folders.

    python -m fedmpi.report SWEEP_DIR | RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each run folder (config.yaml, metrics.jsonl, eval.csv, comm_summary.json) and
writes to DIR (default SWEEP_DIR/report, or ./report for several arguments):

- report.md            one table per setting in the paper's layout: rows K x split,
                       columns the methods, cells the final round's score as mean +- sample
                       std over runs (seeds); for personal models (UDEC, ULATDEC) over all
                       clients of all runs, pooled as the reference does. The paper's
                       published value stands beside a cell when the setting is the
                       paper's (Fashion-MNIST, paper model, R=15, E=5 or the K x E study,
                       B=128, metric fid). Then the parameters exchanged per method and a
                       list of every run with its status.
- table.csv            the same tables as numbers (one row per K x split, columns per method)
- runs.csv             one row per run
- score_vs_params.png  final score against the parameters the run exchanged, one point per
                       run (one PNG per metric when the runs were scored differently)

Runs that did not finish are shown as such ("incomplete (3/15 rounds)"), never dropped.
The metric keeps its name: `fid` (Inception) and `fd_classifier` (offline classifier)
never share a table, and an fd_classifier table says it is not comparable with FID.

This module also owns `run_progress` (how far a run folder got; fedmpi.analysis.sweep skips finished runs with it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmpi.config import Config, ConfigError, load_config
from fedmpi.fl.methods import METHODS, personal_regions
from fedmpi.store.checkpoint import latest_complete
from fedmpi.store.tables import format_table, read_jsonl, write_csv

METRIC_OF_EXTRACTOR = {"inception": "fid", "classifier": "fd_classifier"}
SPLIT_ORDER = ("centralized", "iid", "label_skew", "quantity_skew", "shards")
SPLIT_LABEL = {
    "centralized": "centralized",
    "iid": "IID",
    "label_skew": "label skew",
    "quantity_skew": "quantity skew",
    "shards": "shards",
}

# The paper's published numbers (Inception FID on 1,000 samples, /work/shared/PAPER.md).
PAPER_MAIN = {  # (K, split) -> method -> (mean, std); R = 15, E = 5
    (2, "iid"): {
        "full": (38.5, 1.8),
        "usplit": (37.2, 3.1),
        "udec": (49.0, 16.3),
        "ulatdec": (44.7, 13.4),
    },
    (2, "label_skew"): {
        "full": (32.9, 1.1),
        "usplit": (37.6, 4.0),
        "udec": (49.4, 5.3),
        "ulatdec": (48.6, 4.5),
    },
    (2, "quantity_skew"): {
        "full": (33.2, 3.3),
        "usplit": (54.8, 3.6),
        "udec": (78.5, 47.9),
        "ulatdec": (54.0, 24.3),
    },
    (5, "iid"): {
        "full": (39.4, 4.2),
        "usplit": (40.7, 5.1),
        "udec": (51.1, 14.6),
        "ulatdec": (52.6, 14.9),
    },
    (5, "label_skew"): {
        "full": (42.8, 3.7),
        "usplit": (61.4, 5.2),
        "udec": (74.9, 30.9),
        "ulatdec": (72.0, 30.5),
    },
    (5, "quantity_skew"): {
        "full": (22.8, 4.6),
        "usplit": (38.8, 9.0),
        "udec": (139.0, 135.0),
        "ulatdec": (121.7, 138.2),
    },
    (10, "iid"): {
        "full": (60.5, 1.7),
        "usplit": (62.1, 3.1),
        "udec": (71.5, 20.0),
        "ulatdec": (70.2, 14.2),
    },
    (10, "label_skew"): {
        "full": (64.4, 2.8),
        "usplit": (69.6, 7.6),
        "udec": (98.0, 66.5),
        "ulatdec": (100.8, 83.3),
    },
    (10, "quantity_skew"): {
        "full": (75.7, 11.2),
        "usplit": (86.8, 19.0),
        "udec": (146.2, 119.4),
        "ulatdec": (136.8, 125.2),
    },
}
PAPER_K_BY_E = {  # FULL, IID, R = 15: K -> E -> FID (single values, no std published)
    2: {1: 65.7, 2: 40.8, 3: 35.4, 5: 28.2, 8: 31.8},
    5: {1: 105.3, 2: 56.2, 3: 48.9, 5: 39.0, 8: 32.3},
    10: {1: 147.0, 2: 110.9, 3: 70.9, 5: 58.1, 8: 47.8},
}
PAPER_CENTRALIZED = (42.5, 1.1)  # K = 1, 15 epochs
PAPER_PARAMS_K10_R15 = {"full": 898.9e6, "usplit": 674.2e6, "udec": 237.7e6, "ulatdec": 527.5e6}

# Keys that do not make two runs a different experiment: names, places, logging, the
# repeat dimension (seeds) and the table's own axes (K, split, method).
_NOT_A_SETTING = {
    "run.name",
    "run.out_dir",
    "run.seed",
    "run.device",
    "split.seed",
    "split.kind",
    "split.num_clients",
    "fed.method",
    "fed.backend",
    "data.root",
    "data.download",
    "train.log_every",
    "train.num_workers",
    "eval.every",
    "eval.grid",
    "eval.batch_size",
    "eval.cache_dir",
    "eval.inception_weights",
    "checkpoint.every",
    "checkpoint.keep",
}


class ReportError(ValueError):
    """Arguments that name no run folders, or a run folder that cannot be read."""


# ---------------------------------------------------------------- run folders


@dataclass(frozen=True)
class Progress:
    """How far a run folder got: `done` of `total` rounds (epochs when centralized)."""

    done: int
    total: int
    unit: str  # "rounds" | "epochs"
    finished: bool
    checkpoint: int | None  # newest complete checkpoint (a restart resumes after it)

    def text(self) -> str:
        if self.finished:
            return f"finished ({self.done}/{self.total} {self.unit})"
        return f"incomplete ({self.done}/{self.total} {self.unit})"


def is_centralized(run_dir: Path, cfg: Config, rows: list[dict] | None = None) -> bool:
    """K = 1 (fedmpi.analysis.sweep writes split.num_clients: 1), or a folder written by the
    one-process baseline (epoch rows, checkpoints/round_*/model.pt)."""
    if cfg.split.num_clients is not None:
        return cfg.split.num_clients == 1
    rows = rows if rows is not None else _metrics(run_dir)
    kinds = {r.get("kind") for r in rows}
    if "round" in kinds:
        return False
    return "epoch" in kinds or any(Path(run_dir).glob("checkpoints/round_*/model.pt"))


def _metrics(run_dir: Path) -> list[dict]:
    try:
        return read_jsonl(Path(run_dir) / "metrics.jsonl")
    except ValueError:  # a line cut by a killed job: what it says cannot be trusted
        return []


def run_progress(run_dir: Path, cfg: Config | None = None) -> Progress:
    """A federated run is finished once it wrote comm_summary.json (after its last round)
    and the checkpoint of round fed.rounds is COMPLETE; a centralized one once the
    checkpoint of its last epoch is COMPLETE."""
    run_dir = Path(run_dir)
    cfg = cfg or load_config(run_dir / "config.yaml")
    rows = _metrics(run_dir)
    ckpt = latest_complete(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if is_centralized(run_dir, cfg, rows):
        epochs = [r for r in rows if r.get("kind") == "epoch" and "epoch" in r]
        done = max((int(r["epoch"]) for r in epochs), default=0)
        last_step = max((int(r.get("step", 0)) for r in epochs), default=0)
        total = cfg.train.epochs
        ended = done >= total or (
            cfg.train.max_steps is not None and last_step >= cfg.train.max_steps
        )
        return Progress(done, total, "epochs", ended and done > 0 and ckpt == done, ckpt)
    done = max(
        (int(r["round"]) for r in rows if r.get("kind") == "round" and "round" in r), default=0
    )
    total = cfg.fed.rounds
    finished = (run_dir / "comm_summary.json").is_file() and ckpt == total
    return Progress(done, total, "rounds", finished, ckpt)


@dataclass
class RunResult:
    path: Path
    cfg: Config
    method: str  # full | usplit | udec | ulatdec | centralized
    clients: int | None
    progress: Progress
    metric: str | None  # fid | fd_classifier | None (eval.extractor none)
    scores: list = field(default_factory=list)  # final round: one (global) or one per client
    params: dict | None = None  # comm_summary.json: moved / paper parameters
    note: str = ""  # why a finished run has no score

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def centralized(self) -> bool:
        return self.method == "centralized"

    @property
    def personal(self) -> bool:
        return not self.centralized and bool(personal_regions(self.method))

    @property
    def split(self) -> str:
        return "centralized" if self.centralized else self.cfg.split.kind

    @property
    def column(self) -> str:
        """The method column: the reference's centralized baseline is FULL with K = 1."""
        return "full" if self.centralized else self.method

    @property
    def scored(self) -> bool:
        return self.progress.finished and bool(self.scores)

    @property
    def status(self) -> str:
        if not self.progress.finished:
            return self.progress.text()
        return "complete" if self.scores else self.note


def _last_eval_rows(run_dir: Path) -> list[dict]:
    import csv

    path = run_dir / "eval.csv"
    if not path.is_file():
        return []
    last: dict = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):  # a resumed run re-writes the rounds it replays: last wins
            last[(r.get("round"), r.get("client"))] = r
    return list(last.values())


def read_run(run_dir: Path) -> RunResult:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ReportError(f"{run_dir} is not a fedmpi run folder (no config.yaml)")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise ReportError(f"{run_dir}: cannot read its config: {e}") from None
    progress = run_progress(run_dir, cfg)
    central = progress.unit == "epochs"
    summary = {}
    if (run_dir / "comm_summary.json").is_file():
        try:
            summary = json.loads((run_dir / "comm_summary.json").read_text())
        except ValueError as e:
            raise ReportError(f"{run_dir}/comm_summary.json: not JSON ({e})") from None
    clients = 1 if central else (cfg.split.num_clients or summary.get("clients"))
    res = RunResult(
        run_dir,
        cfg,
        "centralized" if central else cfg.fed.method,
        clients,
        progress,
        METRIC_OF_EXTRACTOR.get(cfg.eval.extractor),
    )
    if central:
        res.params = {"moved": 0, "paper": 0, "reduction_vs_full": None}
    elif summary:
        res.params = {
            "moved": summary["measured"]["moved"]["params"],
            "paper": summary["measured"]["paper"]["params"],
            "reduction_vs_full": summary["paper"]["reduction_vs_full"],
        }
    if not progress.finished:
        return res
    if res.metric is None:
        res.note = "no score (eval.extractor: none)"
        return res
    final = [r for r in _last_eval_rows(run_dir) if str(r.get("round")) == str(progress.done)]
    final = [r for r in final if (r.get("client") != "global") == res.personal]
    res.scores = [float(r[res.metric]) for r in final if r.get(res.metric) not in (None, "")]
    if not res.scores:
        res.note = (
            f"no score ({res.metric} missing for {progress.unit[:-1]} {progress.done} in eval.csv)"
        )
    return res


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders named directly, or the run folders one level inside a sweep folder."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir():
            inner = sorted(d for d in p.iterdir() if (d / "config.yaml").is_file())
            if not inner:
                raise ReportError(
                    f"{p} is neither a run folder nor a sweep folder of run "
                    f"folders (no config.yaml in it or its sub-folders)"
                )
            found.extend(inner)
        else:
            raise ReportError(f"{p}: no such folder")
    return found


# ---------------------------------------------------------------- grouping


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting(run: RunResult) -> dict:
    """The config keys that make an experiment, minus the table's axes and the seeds.
    Centralized runs ignore fed.*, federated runs train.epochs / max_steps, so that a
    baseline and the federated runs of the same setting share a table."""
    flat = _flat(run.cfg.to_dict())
    skip = set(_NOT_A_SETTING)
    if run.centralized:
        skip |= {k for k in flat if k.startswith("fed.")}
    else:
        skip |= {"train.epochs", "train.max_steps"}
    return {k: v for k, v in flat.items() if k not in skip}


@dataclass
class Table:
    setting: dict
    runs: list[RunResult]
    title: str = ""

    @property
    def metric(self) -> str | None:
        return self.runs[0].metric

    def methods(self) -> list[str]:
        present = {r.column for r in self.runs}
        return [m for m in METHODS if m in present]

    def rows(self) -> list[tuple]:
        keys = {(r.clients, r.split) for r in self.runs}
        return sorted(
            keys,
            key=lambda k: (
                k[0] if k[0] is not None else 10**9,
                SPLIT_ORDER.index(k[1]) if k[1] in SPLIT_ORDER else len(SPLIT_ORDER),
                k[1],
            ),
        )

    def cell_runs(self, clients, split, method) -> list[RunResult]:
        return [r for r in self.runs if (r.clients, r.split, r.column) == (clients, split, method)]


def group_tables(runs: list[RunResult]) -> list[Table]:
    """One table per setting. Centralized runs also join every federated table whose
    setting agrees with theirs on the keys both have (the baseline row of that table)."""

    def group(members):
        tables: list[Table] = []
        for run in members:
            s = setting(run)
            match = next((t for t in tables if t.setting == s), None)
            if match:
                match.runs.append(run)
            else:
                tables.append(Table(s, [run]))
        return tables

    tables = group([r for r in runs if not r.centralized])
    for ct in group([r for r in runs if r.centralized]):
        hosts = [
            t
            for t in tables
            if all(t.setting[k] == v for k, v in ct.setting.items() if k in t.setting)
        ]
        for t in hosts:
            t.runs.extend(ct.runs)
        if not hosts:
            tables.append(ct)
    if len(tables) > 1:  # name each table by what sets it apart from the others
        differ = [
            k
            for k in sorted(set().union(*(t.setting for t in tables)))
            if len({json.dumps(t.setting.get(k)) for t in tables}) > 1
        ]
        for t in tables:
            t.title = ", ".join(f"{k}={_value(t.setting[k])}" for k in differ if k in t.setting)
    return tables


def _value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def describe(table: Table) -> str:
    """One line with the setting as the paper states it."""
    s = table.setting
    parts = [
        f"{s['data.dataset']}"
        + (
            f" (first {s['data.train_subset']} training images)"
            if s.get("data.train_subset")
            else ""
        )
    ]
    mults = "-".join(map(str, s["model.dim_mults"]))
    parts.append(f"UNet dim {s['model.dim']} x({mults})")
    if any(not r.centralized for r in table.runs):
        local = (
            f"{s['fed.local_steps']} local steps"
            if s.get("fed.local_steps")
            else f"E={s['fed.local_epochs']}"
        )
        parts.append(f"R={s['fed.rounds']}, {local}")
    central = [r for r in table.runs if r.centralized]
    if central:
        parts.append(f"centralized: {central[0].cfg.train.epochs} epochs")
    parts.append(f"B={s['train.batch_size']}, lr {s['train.lr']:g}")
    sampler = (
        f"DDIM-{s['eval.ddim_steps']}"
        if s["eval.sampler"] == "ddim"
        else f"DDPM-{s['diffusion.timesteps']}"
    )
    parts.append(f"{s['eval.num_samples']} samples ({sampler}), {s['eval.extractor']} features")
    return "; ".join(parts)


# ---------------------------------------------------------------- the paper's numbers


def _paper_setting(s: dict) -> bool:
    return (
        s["data.dataset"] == "fashion_mnist"
        and not s.get("data.train_subset")
        and s["model.dim"] == 28
        and list(s["model.dim_mults"]) == [1, 2, 4]
        and s["train.batch_size"] == 128
        and s["diffusion.timesteps"] == 1000
    )


def paper_value(table: Table, clients, split: str, method: str) -> tuple | None:
    """(mean, std or None) the paper published for this cell, if the setting is the paper's."""
    s = table.setting
    if table.metric != "fid" or not _paper_setting(s):
        return None
    if split == "centralized":
        runs = list(table.cell_runs(clients, split, method))
        return PAPER_CENTRALIZED if runs and runs[0].cfg.train.epochs == 15 else None
    if s.get("fed.rounds") != 15 or s.get("fed.local_steps"):
        return None
    e = s.get("fed.local_epochs")
    if e == 5 and (clients, split) in PAPER_MAIN:
        return PAPER_MAIN[(clients, split)].get(method)
    if method == "full" and split == "iid" and e in PAPER_K_BY_E.get(clients, {}):
        return PAPER_K_BY_E[clients][e], None
    return None


# ---------------------------------------------------------------- cells


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def _millions(p: float) -> str:
    return f"{p / 1e6:,.1f}M" if p >= 1e7 else f"{p / 1e6:.3g}M"


@dataclass
class Cell:
    runs: list[RunResult]

    @property
    def values(self) -> list[float]:
        return [v for r in self.runs if r.scored for v in r.scores]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:  # sample std (ddof 1), as the reference reports
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    def incomplete(self) -> list[RunResult]:
        return [r for r in self.runs if not r.progress.finished]

    def unscored(self) -> list[RunResult]:
        return [r for r in self.runs if r.progress.finished and not r.scores]

    def text(self, paper: tuple | None) -> str:
        if not self.runs:
            return ""
        parts = []
        scored = [r for r in self.runs if r.scored]
        if scored:
            n = f"{len(scored)} run{'s' if len(scored) > 1 else ''}"
            if any(r.personal for r in scored):
                n += f", n={len(self.values)}"
            sd = f" ± {_fmt(self.std)}" if self.std is not None else ""
            parts.append(f"{_fmt(self.mean)}{sd} ({n})")
        if paper:
            parts.append(f"paper {_fmt(paper[0])}" + (f" ± {_fmt(paper[1])}" if paper[1] else ""))
        inc = self.incomplete()
        if inc:
            prog = ", ".join(f"{r.progress.done}/{r.progress.total}" for r in inc)
            unit = inc[0].progress.unit
            count = f"{len(inc)} " if scored or len(inc) > 1 else ""
            parts.append(f"{count}incomplete ({prog} {unit})")
        for note in sorted({r.note for r in self.unscored()}):
            parts.append(note)
        return "; ".join(parts)


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
            text = _millions(paper) + (f" ({-100 * red:+.1f}%)" if m != "full" else "")
            if (k, rounds) == (10, 15) and _paper_setting(table.setting):
                text += f"; paper {_millions(PAPER_PARAMS_K10_R15[m])}"
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
        "Cells: the score of each run's final round (lower is better), mean ± sample "
        "standard deviation over runs (seeds); for UDEC and ULATDEC, whose clients keep "
        "personal models, over every client of every run, pooled as the reference does "
        "(n = runs × clients). Parameters exchanged count the paper's rule (initial model "
        "+ R uploads + R - 1 downloads), from each run's comm_summary.json.",
        "",
    ]
    pngs = []
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
    for metric in dict.fromkeys(r.metric for r in runs if r.scored):
        name = "score_vs_params.png" if len(pngs) == 0 else f"score_vs_params_{metric}.png"
        path = plot_score_vs_params([r for r in runs if r.metric == metric], metric, out / name)
        pngs.append(path)
        lines += [f"![{metric} vs parameters exchanged]({path.name})", ""]
    if not pngs:
        lines += ["No PNG: no finished run has a score.", ""]
    lines += [
        "## Runs",
        "",
        format_table(
            ["run", "method", "K", "split", "seed", "status", "score", "parameters exchanged"],
            [
                [
                    r["run"],
                    r["method"],
                    r["K"],
                    SPLIT_LABEL.get(r["split"], r["split"]),
                    r["seed"],
                    r["status"],
                    ""
                    if r["score_mean"] is None
                    else f"{r['metric']} {_fmt(r['score_mean'])}"
                    + (
                        f" ± {_fmt(r['score_std_over_clients'])}"
                        if r["score_std_over_clients"]
                        else ""
                    ),
                    "" if r["params_moved"] is None else f"{r['params_moved']:,} (moved)",
                ]
                for r in _runs_rows(runs)
            ],
            markdown=True,
            align="llrllllr",
        ),
        "",
    ]
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


def plot_score_vs_params(runs: list[RunResult], metric: str, path: Path) -> Path:
    """One point per finished, scored run: final score against the parameters it
    exchanged (measured, what the run moved); personal models with a +-1 std bar over
    clients. Centralized runs move nothing: a dashed line at their mean."""
    from fedmpi.analysis.plot import METRIC_LABEL, _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i) for i, m in enumerate(METHODS)}
    done = [r for r in runs if r.scored]
    fed = [r for r in done if not r.centralized and r.params]
    labelled = set()
    # runs of one method and K move the same parameters whatever the split: set the
    # splits slightly apart so that their points and bars stay visible
    splits = sorted({r.split for r in fed}, key=lambda s: (SPLIT_ORDER + (s,)).index(s))
    span = max((r.params["moved"] for r in fed), default=0) / 1e6
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


# ---------------------------------------------------------------- CLI
