"""`RunFolder`: the one reader and writer of a run folder.

Layout::

    RUN_DIR/config.yaml                 the resolved config
    RUN_DIR/metrics.jsonl               one row per round (or epoch), client and logged step
    RUN_DIR/eval.csv                    one row per scored model (global, or each client's)
    RUN_DIR/comm.csv                    the byte ledger: one row per transfer
    RUN_DIR/comm_summary.json           its totals against the analytical table
    RUN_DIR/samples/round_NNNN*.png     sample grids
    RUN_DIR/checkpoints/round_NNNNNN/   federator.pt, client_001.pt, ..., COMPLETE
    RUN_DIR/LOCK                        held by the job writing the folder (lock.py)

Everything that reads or writes these files (the round loop, evaluate, plot, report,
sweep) goes through this class, so the layout and the file formats live in one place.
Checkpoint files themselves are serialised by `checkpoint.py`; tables by `tables.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from fedmpi.config import Config, dump_config, load_config
from fedmpi.errors import DiskError
from fedmpi.store.atomic import atomic_write, sha256_file
from fedmpi.store.lock import RunLock
from fedmpi.store.tables import (
    JsonlWriter,
    append_csv,
    read_csv,
    read_jsonl,
    write_csv,
    write_jsonl,
)

MARKER = "COMPLETE"
STOP_FILE = "PREEMPT"  # created by slurm/run.sh (or a user) to ask a job to checkpoint and stop
FEDERATOR_FILE = "federator.pt"  # a federated checkpoint: the federator's (global) model
MODEL_FILE = "model.pt"  # a centralized checkpoint: the one model


def client_file(client: int) -> str:
    """A federated checkpoint's file of client `client` (1..K): client_001.pt, ..."""
    return f"client_{client:03d}.pt"


class RunFolder:
    """One run's folder. Cheap to construct: nothing is read until asked for."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    EVAL = "eval.csv"
    COMM = "comm.csv"
    SUMMARY = "comm_summary.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- creation and config ------------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config, name: str | None = None) -> RunFolder:
        """A fresh folder under run.out_dir, <name>-<YYYYmmdd-HHMMSS>[-n], with config.yaml."""
        base = Path(cfg.run.out_dir) / f"{name or cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise DiskError(
                e.errno,
                f"cannot create a run folder in {cfg.run.out_dir} ({e.strerror}): set "
                f"run.out_dir (--run.out_dir=DIR) to a writable folder",
            ) from None
        run = cls(path)
        run.write_config(cfg)
        return run

    def is_run(self) -> bool:
        """Whether this folder holds a run (its config.yaml)."""
        return (self.path / self.CONFIG).is_file()

    def has_results(self) -> bool:
        """Whether a run started here: it wrote metrics.jsonl or a checkpoint folder."""
        return (self.path / self.METRICS).is_file() or (self.path / "checkpoints").is_dir()

    @property
    def config_file(self) -> Path:
        """config.yaml's path (for a job script that reads it itself)."""
        return self.path / self.CONFIG

    def write_config(self, cfg: Config) -> None:
        atomic_write(self.path / self.CONFIG, dump_config(cfg))

    def read_config(self, overrides=None) -> Config:
        return load_config(self.path / self.CONFIG, overrides)

    def lock(self, log=print) -> RunLock:
        """Take this folder's lock for a job (see lock.py); release() when the job ends."""
        return RunLock(self.path, log).acquire()

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    # -- the federation's clients -------------------------------------------------------
    PLACEMENT = "clients.csv"
    SAMPLING_KEY = "sampling.key"

    def write_placement(self, rows: list[dict]) -> None:
        """clients.csv: each client's rank and number of training images."""
        write_csv(self.path / self.PLACEMENT, rows, ["client", "rank", "images"])

    def read_placement(self) -> list[dict]:
        p = self.path / self.PLACEMENT
        return read_csv(p) if p.is_file() else []

    def client_state_dir(self, rank: int) -> Path:
        """Where rank `rank` keeps its clients' personal regions when it hosts several:
        one file per client and round, state/rank_NNN/client_CCCCCC_rRRRRRR.pt (its
        checkpoint files hold the index of the current ones)."""
        return self.path / "state" / f"rank_{rank:03d}"

    def sampling_key(self, create: bool = True) -> int:
        """The secret key of the rounds' client samples under privacy.dp: drawn from the
        operating system's entropy on first use (`create`), kept in `sampling.key`
        (readable by its owner only) so that a resumed run samples the same clients.
        Whoever reads it can tell who was sampled, which voids the amplification by
        sampling (docs/privacy.md). A resume (create=False) never makes a new one."""
        p = self.path / self.SAMPLING_KEY
        if p.is_file():
            text = p.read_text().strip()
            if text.isdigit():
                return int(text)
            raise DiskError(
                0, f"{p} does not hold a key (digits); restore it from a backup, or start a new run"
            )
        if not create:
            raise DiskError(
                0,
                f"{p} is missing: the run's client samples cannot be drawn again without it; "
                f"restore it from a backup, or start a new run",
            )
        key = secrets.randbits(63)
        tmp = p.with_name(f".{p.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{key}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)  # complete or absent, never empty
        return key

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint_dir(self, index: int) -> Path:
        return self.path / "checkpoints" / f"round_{index:06d}"

    def complete_checkpoints(self) -> list[int]:
        """The indices (rounds or epochs) whose checkpoint has its COMPLETE marker, oldest first."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        found = []
        for d in root.iterdir():
            m = re.fullmatch(r"round_(\d+)", d.name)
            if m and (d / MARKER).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_complete(self) -> int | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def mark_complete(self, index: int, keep: int, files: dict | None = None) -> None:
        """Mark checkpoint `index` complete (recording each file's sha256), then delete
        complete ones beyond the newest `keep` (0: keep all). Call only for a checkpoint
        whose every file is written and finite: older ones are deleted after this."""
        record = {"round": index, "files": dict(sorted((files or {}).items()))}
        atomic_write(self.checkpoint_dir(index) / MARKER, json.dumps(record, indent=1) + "\n")
        if keep > 0:
            for old in self.complete_checkpoints()[:-keep]:
                shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)

    def marker_files(self, index: int) -> dict:
        """{file name: sha256} recorded in checkpoint `index`'s marker ({} for old markers)."""
        try:
            record = json.loads((self.checkpoint_dir(index) / MARKER).read_text())
            return dict(record.get("files", {})) if isinstance(record, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def verify(self, index: int) -> str | None:
        """None if every file of checkpoint `index` matches its recorded sha256, else why not.
        Markers without hashes (a bare round number) are trusted."""
        d = self.checkpoint_dir(index)
        try:
            text = (d / MARKER).read_text()
        except OSError as e:
            return f"{d / MARKER}: {e.strerror}"
        if text.strip().isdigit():  # a marker of the first layout: the bare round number
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return f"{d / MARKER} is corrupt"
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            return f"{d / MARKER} is corrupt"
        for name, digest in record["files"].items():
            p = d / name
            if not p.is_file():
                return f"{p} is missing"
            if sha256_file(p) != digest:
                return (
                    f"{p} does not match the sha256 recorded when it was written "
                    f"(corrupt or truncated)"
                )
        return None

    def checkpoint_models(self, index: int) -> tuple[bool, list[tuple[str, Path]]]:
        """(centralized, [(label, path)]) of the model files of checkpoint `index`:
        centralized, [("global", model.pt)]; or federated, federator.pt as "global" when
        present, then client_NNN.pt as "N" (the client's number). [] if it holds none."""
        d = self.checkpoint_dir(index)
        if (d / MODEL_FILE).is_file():
            return True, [("global", d / MODEL_FILE)]
        files = [(str(int(p.stem.split("_")[1])), p) for p in sorted(d.glob("client_[0-9]*.pt"))]
        if (d / FEDERATOR_FILE).is_file():
            files.insert(0, ("global", d / FEDERATOR_FILE))
        return False, files

    def has_centralized_checkpoint(self) -> bool:
        """Whether any checkpoint folder (complete or not) holds a centralized model.pt."""
        return any(self.path.glob(f"checkpoints/round_*/{MODEL_FILE}"))

    def newest_verified(self, warn=print) -> int | None:
        """The newest complete checkpoint whose files verify; warns about each one skipped."""
        for index in reversed(self.complete_checkpoints()):
            problem = self.verify(index)
            if problem is None:
                return index
            warn(
                f"warning: checkpoint of round {index} is unusable: {problem}; "
                f"falling back to an earlier one"
            )
        return None

    # -- metrics, evaluation, ledger ----------------------------------------------------
    def metrics_writer(self) -> JsonlWriter:
        return JsonlWriter(self.path / self.METRICS)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.path / self.METRICS)

    def append_eval(self, rows: list[dict]) -> None:
        append_csv(self.path / self.EVAL, rows)

    def read_eval(self) -> list[dict]:
        return read_csv(self.path / self.EVAL)

    def last_eval(self) -> list[dict]:
        """eval.csv's rows, the last one of each (round, client): a run resumed from a
        folder written before truncation existed re-wrote the rounds it replayed."""
        last = {(r.get("round"), r.get("client")): r for r in self.read_eval()}
        return list(last.values())

    def write_rescore(self, rows: list[dict], tag: str, index: int) -> Path:
        """rescore_<tag>_round_<index>.csv (fedmpi.evaluate's scores; the tag names the
        extractor and the scoring settings); returns its path."""
        path = self.path / f"rescore_{tag}_round_{index}.csv"
        write_csv(path, rows)
        return path

    def append_comm(self, rows: list[dict], fields) -> None:
        """Append ledger rows to comm.csv (the header `fields` when the file is new)."""
        append_csv(self.path / self.COMM, rows, fields)

    def read_comm(self) -> list[dict]:
        """comm.csv's rows as read (strings); fedmpi.fl.ledger.typed_rows gives them types."""
        return read_csv(self.path / self.COMM)

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.path / self.SUMMARY, json.dumps(summary, indent=1))

    def read_summary(self) -> dict | None:
        p = self.path / self.SUMMARY
        return json.loads(p.read_text()) if p.is_file() else None

    def has_summary(self) -> bool:
        """Whether comm_summary.json was written (a federated run writes it at its end)."""
        return (self.path / self.SUMMARY).is_file()

    def truncate(self, last: int, key: str = "round") -> None:
        """Drop the rows of rounds (or epochs, `key`) after `last` from metrics.jsonl,
        eval.csv and comm.csv, before a resume replays them (each rewritten atomically)."""
        p = self.path / self.METRICS
        if p.exists():
            write_jsonl(p, [r for r in read_jsonl(p) if r.get(key, 0) <= last])
        for name in (self.EVAL, self.COMM):
            p = self.path / name
            if not p.exists():
                continue
            rows = read_csv(p)
            # comm.csv's round 0 is the initial broadcast, sent again by a run from round 1
            keep = [r for r in rows if int(r["round"]) <= last and (last > 0 or name == self.EVAL)]
            if keep:
                write_csv(p, keep, list(rows[0]))
            else:
                p.unlink()

    # -- samples ------------------------------------------------------------------------
    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    def grids(self, index: int) -> list[Path]:
        """The sample grids written after round (or epoch) `index`."""
        return sorted(self.samples_dir.glob(f"round_{index:04d}*.png"))

    def save_grid(self, images, name: str, nrow: int | None = None) -> Path:
        """Save images in [-1, 1] (N, C, H, W) as samples/<name>.png; returns the path."""
        path = self.samples_dir / f"{name}.png"
        save_grid(images, path, nrow)
        return path

    def save_round_grid(self, images, index: int, client: int | None = None) -> Path:
        """The grid of round (epoch) `index`: samples/round_NNNN.png of the global model,
        samples/round_NNNN_client_KKK.png of client `client`'s (1..K) personal model."""
        name = f"round_{index:04d}" + (f"_client_{client:03d}" if client is not None else "")
        return self.save_grid(images, name)


def save_grid(images, path: Path, nrow: int | None = None) -> None:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    save_image(images.detach().float().cpu().add(1).div(2).clamp(0, 1), path, nrow=nrow, padding=2)
