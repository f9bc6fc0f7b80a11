"""Run folders as the plots see them: one `Run` per folder, its series and its split.

Owns reading a run for plotting (`load_run`, through RunFolder: the config, the rows of
metrics.jsonl per round or epoch, eval.csv's last row per round and client, the ledger's
rows of comm.csv), the series drawn from it (`score_series`, `cumulative_bytes`, the
metric to show, `pick_metric`) and the client split recomputed from its config
(`split_rows`). `plot.py` draws them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmpi.config import Config, ConfigError
from fedmpi.fl.ledger import typed_rows
from fedmpi.store.runfolder import RunFolder

METRICS = ("fid", "fd_classifier")
PERSONAL = ("udec", "ulatdec")


class RunError(ValueError):
    """A folder that cannot be read as a run folder."""


@dataclass
class Run:
    path: Path
    name: str
    cfg: Config | None
    method: str  # full | usplit | udec | ulatdec | centralized
    rows: list[dict]  # metrics rows of kind round (or epoch), one per index, sorted
    eval_rows: list[dict] = field(default_factory=list)  # eval.csv, last row per (round, client)
    comm_rows: list[dict] = field(default_factory=list)  # comm.csv client rows
    num_clients: int | None = None

    @property
    def centralized(self) -> bool:
        return self.method == "centralized"

    @property
    def personal(self) -> bool:
        return self.method in PERSONAL

    @property
    def label(self) -> str:
        return f"{self.method.upper() if not self.centralized else 'centralized'} ({self.name})"

    @property
    def index_name(self) -> str:
        return "epoch" if self.centralized else "round"


# ---------------------------------------------------------------- reading a run


def num(v) -> float:
    """A metrics value as float (None / missing / text -> nan)."""
    try:
        return float(v) if v is not None and v != "" else math.nan
    except (TypeError, ValueError):
        return math.nan


def load_run(path: str | Path) -> Run:
    """Read a run folder; raises RunError when it is not one."""
    path = Path(path)
    folder = RunFolder(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such folder")
    if not folder.is_run():
        raise RunError(
            f"{path} is not a fedmpi run folder (no config.yaml; a run folder "
            f"holds config.yaml, metrics.jsonl, eval.csv, ...)"
        )
    if not (folder / folder.METRICS).is_file():
        raise RunError(
            f"{path} is not a fedmpi run folder with results (no metrics.jsonl; "
            f"did the run reach its first round?)"
        )
    try:
        cfg = folder.read_config()
    except ConfigError as e:
        raise RunError(f"{path}: cannot read its config: {e}") from None
    try:
        metrics = folder.read_metrics()
    except ValueError as e:
        raise RunError(f"{folder / folder.METRICS}: not JSON lines ({e})") from None
    fed = {int(r["round"]): r for r in metrics if r.get("kind") == "round" and "round" in r}
    cen = {int(r["epoch"]): r for r in metrics if r.get("kind") == "epoch" and "epoch" in r}
    centralized = bool(cen) and not fed or (not fed and folder.has_centralized_checkpoint())
    rows = [dict(r, index=i) for i, r in sorted((cen if centralized else fed).items())]
    method = "centralized" if centralized else cfg.fed.method
    if rows and not centralized:
        method = rows[-1].get("method", method)
    run = Run(path=path, name=path.resolve().name, cfg=cfg, method=method, rows=rows)
    run.eval_rows = folder.last_eval()
    try:
        run.comm_rows = typed_rows(folder.read_comm())  # clients 1..K, older layouts converted
    except (KeyError, ValueError) as e:
        raise RunError(f"{folder / folder.COMM}: unexpected content ({e})") from None
    if not centralized:
        run.num_clients = _num_clients(cfg, run)
    return run


def _num_clients(cfg: Config, run: Run) -> int | None:
    """K: the config's, else the ledger's largest client, else the clients' losses."""
    k = cfg.split.num_clients
    if k is None and run.comm_rows:
        k = max(r["client"] for r in run.comm_rows)
    if k is None and run.rows and isinstance(run.rows[0].get("client_loss"), list):
        k = len(run.rows[0]["client_loss"])
    return k


def score_series(run: Run, metric: str):
    """(index, mean, std or None) of `metric` per round (epoch); empty arrays if absent."""
    xs, ys, sd = [], [], []
    for r in run.rows:
        if metric in r:
            xs.append(r["index"]), ys.append(num(r[metric])), sd.append(math.nan)
        elif f"{metric}_mean" in r:
            xs.append(r["index"]), ys.append(num(r[f"{metric}_mean"]))
            sd.append(num(r.get(f"{metric}_std")))
    if not xs:  # e.g. metrics.jsonl without scores: fall back to eval.csv
        by_round: dict = {}
        for r in run.eval_rows:
            if metric in r and r[metric] not in ("", None):
                by_round.setdefault(int(r["round"]), []).append(num(r[metric]))
        for i, vals in sorted(by_round.items()):
            xs.append(i), ys.append(float(np.mean(vals)))
            sd.append(float(np.std(vals, ddof=1)) if run.personal and len(vals) > 1 else math.nan)
    xs, ys, sd = np.array(xs, dtype=float), np.array(ys, dtype=float), np.array(sd, dtype=float)
    ok = np.isfinite(ys)
    xs, ys, sd = xs[ok], ys[ok], sd[ok]
    return xs, ys, (sd if run.personal and np.isfinite(sd).any() else None)


def has_metric(run: Run, metric: str) -> bool:
    return len(score_series(run, metric)[0]) > 0


def cumulative_bytes(run: Run) -> dict[int, int]:
    """round -> bytes all clients sent and received in rounds 0..round (comm.csv)."""
    per_round: dict[int, int] = {}
    for r in run.comm_rows:
        per_round[r["round"]] = per_round.get(r["round"], 0) + r["bytes"]
    out, total = {}, 0
    for rnd in sorted(per_round):
        total += per_round[rnd]
        out[rnd] = total
    return out


def pick_metric(runs: list[Run], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    counts = Counter(m for run in runs for m in METRICS if has_metric(run, m))
    if not counts:
        return None
    return max(METRICS, key=lambda m: (counts[m], m == "fid"))


def split_rows(run: Run) -> tuple[list[dict], str]:
    """The run's client table (client_table rows) and a one-line description.

    Raises RunError / DataError when the labels are not available here."""
    from fedmpi.data import (
        DataError,
        compute_split,
        dataset_info,
        load_arrays,
        read_shard,
        shards_info,
    )
    from fedmpi.data.partition import client_table

    cfg, k = run.cfg, run.num_clients
    if k is None:
        raise RunError(
            "the number of clients is unknown (no split.num_clients, comm.csv or client losses)"
        )
    num_classes = dataset_info(cfg.data.dataset)[2]
    s = cfg.split
    if cfg.data.shards and Path(cfg.data.shards).is_file():
        info = shards_info(cfg.data.shards)
        parts, labels, start = [], [], 0
        for c in range(info["num_clients"]):
            lab = read_shard(cfg.data.shards, c)[1]
            labels.append(lab)
            parts.append(np.arange(start, start + len(lab)))
            start += len(lab)
        labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        source = f"shards file {cfg.data.shards}"
    else:
        try:
            _, labels = load_arrays(cfg.data, "train")
        except DataError:
            if cfg.data.root is None:
                raise
            # data.root is often relative to where the run was launched: look in the
            # usual places (the labels of a dataset are the same everywhere)
            _, labels = load_arrays(
                dataclasses.replace(cfg.data, root=None, download=False), "train"
            )
        parts = compute_split(cfg, labels, k)
        source = f"{s.kind}" + (
            f", beta={s.beta}"
            if s.kind in ("label_skew", "quantity_skew")
            else f", {s.classes_per_client} classes/client"
            if s.kind == "shards"
            else ""
        )
    rows = client_table(labels, parts, num_classes)
    desc = f"{cfg.data.dataset}, {len(labels)} images, {len(rows)} clients, split {source}"
    return rows, desc
