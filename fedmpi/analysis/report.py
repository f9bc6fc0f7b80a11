"""Run folders as the report sees them, and their grouping into the paper's tables.

Owns reading a run for the report (`read_run` -> `RunResult`: its config, how far it got,
its final scores and the parameters it exchanged, all through RunFolder), how far a run
folder got (`run_progress`; fedmpi.analysis.sweep skips finished runs with it), finding
run folders (`find_runs`) and grouping runs into one table per setting (`group_tables`,
`setting`, `describe`). The paper's numbers and the cells are in `paper.py`; the files a
report writes (report.md, table.csv, runs.csv, the PNG) in `report_output.py`.

Runs that did not finish are kept as such ("incomplete (3/15 rounds)"), never dropped.
The metric keeps its name: `fid` (Inception) and `fd_classifier` (offline classifier)
never share a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedmpi.config import Config, ConfigError
from fedmpi.fl.methods import METHODS, personal_regions
from fedmpi.store.runfolder import RunFolder

METRIC_OF_EXTRACTOR = {"inception": "fid", "classifier": "fd_classifier"}
MANIFOLD = ("precision", "recall")  # eval.precision_recall_k: shown beside the metric
SPLIT_ORDER = ("centralized", "iid", "label_skew", "quantity_skew", "shards")
SPLIT_LABEL = {
    "centralized": "centralized",
    "iid": "IID",
    "label_skew": "label skew",
    "quantity_skew": "quantity skew",
    "shards": "shards",
}

# Keys that do not make two runs a different experiment: names, places, logging, the
# repeat dimension (seeds) and the table's own axes (K, split, method).
_NOT_A_SETTING = {
    "run.name",
    "run.out_dir",
    "run.seed",
    "run.repeat",
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
    rows = rows if rows is not None else _metrics(RunFolder(run_dir))
    kinds = {r.get("kind") for r in rows}
    if "round" in kinds:
        return False
    return "epoch" in kinds or RunFolder(run_dir).has_centralized_checkpoint()


def _metrics(run: RunFolder) -> list[dict]:
    try:
        return run.read_metrics()
    except ValueError:  # a line cut by a killed job: what it says cannot be trusted
        return []


def run_progress(run_dir: Path, cfg: Config | None = None) -> Progress:
    """A federated run is finished once it wrote comm_summary.json (after its last round)
    and the checkpoint of round fed.rounds is COMPLETE; a centralized one once the
    checkpoint of its last epoch is COMPLETE."""
    run = RunFolder(run_dir)
    cfg = cfg or run.read_config()
    rows = _metrics(run)
    ckpt = run.latest_complete()
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
    finished = run.has_summary() and ckpt == total
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
    curve: dict = field(default_factory=dict)  # round (epoch) -> mean score of that round
    params: dict | None = None  # comm_summary.json: moved / paper parameters and bytes
    manifold: dict = field(default_factory=dict)  # precision / recall -> final values
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


def _read_summary(run: RunFolder) -> dict:
    """comm_summary.json ({} before a federated run has written it)."""
    try:
        return run.read_summary() or {}
    except ValueError as e:
        raise ReportError(f"{run / run.SUMMARY}: not JSON ({e})") from None


def _scores_by_round(rows: list[dict], res: RunResult, key: str) -> dict[int, list[float]]:
    """eval.csv's (`rows`, RunFolder.last_eval) values of `key` per round (epoch): the
    global model's, or each client's for personal models."""
    out: dict[int, list[float]] = {}
    for r in rows:
        if (r.get("client") != "global") != res.personal or r.get(key) in (None, ""):
            continue
        out.setdefault(int(r["round"]), []).append(float(r[key]))
    return out


def read_run(run_dir: Path) -> RunResult:
    run = RunFolder(run_dir)
    if not run.is_run():
        raise ReportError(f"{run_dir} is not a fedmpi run folder (no config.yaml)")
    try:
        cfg = run.read_config()
    except ConfigError as e:
        raise ReportError(f"{run_dir}: cannot read its config: {e}") from None
    progress = run_progress(run_dir, cfg)
    central = progress.unit == "epochs"
    summary = _read_summary(run)
    clients = 1 if central else (cfg.split.num_clients or summary.get("clients"))
    res = RunResult(
        Path(run_dir),
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
            "paper_bytes": summary["measured"]["paper"]["bytes"],
            "reduction_vs_full": summary["paper"]["reduction_vs_full"],
        }
    if not progress.finished:
        return res
    if res.metric is None:
        res.note = "no score (eval.extractor: none)"
        return res
    rows = run.last_eval()
    by_round = _scores_by_round(rows, res, res.metric)
    res.curve = {i: float(sum(v) / len(v)) for i, v in sorted(by_round.items())}
    res.scores = by_round.get(progress.done, [])
    for key in MANIFOLD:
        final = _scores_by_round(rows, res, key).get(progress.done)
        if final:
            res.manifold[key] = final
    if not res.scores:
        res.note = (
            f"no score ({res.metric} missing for {progress.unit[:-1]} {progress.done} in eval.csv)"
        )
    return res


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders named directly, or the run folders one level inside a sweep folder;
    a folder two sweeps share (fedmpi.analysis.sweep links it) counts once."""
    found: list[Path] = []
    for p in map(Path, paths):
        if RunFolder(p).is_run():
            found.append(p)
        elif p.is_dir():
            inner = sorted(d for d in p.iterdir() if RunFolder(d).is_run())
            if not inner:
                raise ReportError(
                    f"{p} is neither a run folder nor a sweep folder of run "
                    f"folders (no config.yaml in it or its sub-folders)"
                )
            found.extend(inner)
        else:
            raise ReportError(f"{p}: no such folder")
    seen: set = set()
    unique = []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


# ---------------------------------------------------------------- grouping


def setting(run: RunResult) -> dict:
    """The config keys that make an experiment, minus the table's axes and the seeds.
    Centralized runs ignore fed.*, federated runs train.epochs / max_steps, so that a
    baseline and the federated runs of the same setting share a table."""
    flat = run.cfg.dotted()
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

    def cell_runs_any(self, split, method) -> bool:
        return any((r.split, r.column) == (split, method) for r in self.runs)

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
