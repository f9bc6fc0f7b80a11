"""Experiment grids: a spec expands into named runs under one sweep folder.

Owns the spec (`load_sweep`: read it, expand its grid, validate every run's config before
anything is written), the run names (`run_name`: the grid values in grid order, so the
same spec always gives the same names), the runs' config.yaml (`write_configs`, through
RunFolder), how far each run got (`progress`) and the dry run (`dry_run_text`: world
sizes and the analytical bytes). `launch.py` starts the runs (mpirun or Slurm). The spec
format and the command line are `python -m fedmpi.sweep --help` (fedmpi.cli.sweep).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedmpi.analysis.report import Progress, run_progress
from fedmpi.config import Config, ConfigError, load_config
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import format_table

SPEC_KEYS = ("name", "base", "out", "overrides", "grid", "repeats")
SEED_MODES = ("fixed", "per_repeat")
CLIENTS = "clients"  # spec shorthand for split.num_clients
# How grid values appear in run names: a prefix, or the bare value.
PREFIX = {
    "split.num_clients": "K",
    "fed.local_epochs": "E",
    "fed.local_steps": "steps",
    "fed.rounds": "R",
    "run.seed": "s",
    "run.repeat": "r",
    "split.seed": "splitseed",
    "train.batch_size": "B",
    "train.epochs": "epochs",
}
BARE = ("fed.method", "split.kind", "data.dataset", "eval.extractor")


class SweepError(ValueError):
    """A spec that cannot be expanded into valid runs (message names the spec and run)."""


@dataclass(frozen=True)
class Run:
    name: str
    values: dict  # this run's grid values (dotted keys)
    cfg: Config
    dir: Path

    @property
    def clients(self) -> int:
        return self.cfg.split.num_clients

    @property
    def centralized(self) -> bool:
        return self.clients == 1

    @property
    def world(self) -> int:
        return 1 if self.centralized else self.clients + 1

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.dir)


@dataclass
class Sweep:
    spec: Path
    name: str
    out: Path
    runs: list


# ---------------------------------------------------------------- expansion


def _value_text(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "x".join(map(_value_text, v))
    return str(v)


def run_name(values: dict) -> str:
    """Deterministic, filesystem-safe name from grid values (in grid order)."""
    tokens = []
    for key, v in values.items():
        text = re.sub(r"[^A-Za-z0-9._]+", "_", _value_text(v)).strip("_") or "x"
        if key in PREFIX:
            tokens.append(PREFIX[key] + text)
        elif key in BARE:
            tokens.append(text)
        else:
            tokens.append(f"{key.rsplit('.', 1)[-1]}_{text}")
    return "-".join(tokens)


def _dotted(mapping, what: str, spec: Path) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise SweepError(
            f"{spec}: '{what}' must be a mapping of dotted config keys "
            f"(e.g. fed.rounds: 15), got {mapping!r}"
        )
    out = {}
    for key, value in mapping.items():
        key = str(key)
        if key == CLIENTS:
            key = "split.num_clients"
        elif "." not in key:
            raise SweepError(
                f"{spec}: '{what}' key '{key}' is not a dotted config key "
                f"(section.key, e.g. fed.method) nor '{CLIENTS}'"
            )
        if key in out:
            raise SweepError(
                f"{spec}: '{what}' sets {key} twice ('{CLIENTS}' is split.num_clients)"
            )
        out[key] = value
    return out


@dataclass(frozen=True)
class Repeats:
    """The spec's `repeats`: how many runs of each grid point (a count, or one per K) and
    how their seeds differ. fixed: every repeat trains from the same run.seed (the
    reference re-seeds torch identically; repeats differ by the evaluation's sampling
    noise, drawn from run.repeat, and on GPUs by nondeterministic kernels); per_repeat:
    repeat i trains from run.seed + i."""

    count: int | dict
    seed_mode: str = "per_repeat"

    def of(self, clients) -> int:
        if isinstance(self.count, int):
            return self.count
        return self.count.get(clients, 0)


def _repeats(data, grid: dict, overrides: dict, spec: Path) -> Repeats | None:
    if data is None:
        return None
    example = "repeats: 3, or repeats: {count: {2: 5, 5: 5, 10: 3}, seed_mode: fixed}"
    data = {"count": data} if isinstance(data, int) and not isinstance(data, bool) else data
    if not isinstance(data, dict) or set(data) - {"count", "seed_mode"} or "count" not in data:
        raise SweepError(f"{spec}: 'repeats' must be {example}; got {data!r}")
    count, mode = data["count"], data.get("seed_mode", "per_repeat")
    counts = count.values() if isinstance(count, dict) else [count]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise SweepError(
            f"{spec}: repeats count must be a whole number >= 1 or a mapping K -> count "
            f"({example}); got {count!r}"
        )
    if mode not in SEED_MODES:
        raise SweepError(
            f"{spec}: repeats seed_mode must be one of {', '.join(SEED_MODES)}; got {mode!r}"
        )
    for key in ("run.seed", "run.repeat"):
        if key in grid:
            raise SweepError(
                f"{spec}: 'repeats' sets {key} itself; remove {key} from the grid "
                f"(keep run.seed in 'overrides' as the first repeat's seed)"
            )
    if isinstance(count, dict):
        ks = grid.get("split.num_clients") or [overrides.get("split.num_clients")]
        missing = [k for k in ks if k not in count]
        if missing:
            raise SweepError(
                f"{spec}: repeats count has no entry for K = {missing[0]} "
                f"(give one per K of the grid: {ks})"
            )
    return Repeats(count, mode)


def _resolve_base(spec: Path, base) -> Path:
    if not isinstance(base, str) or not base:
        raise SweepError(
            f"{spec}: 'base' must name the base config file, e.g. "
            f"base: ../fmnist_full.yaml (relative to the spec)"
        )
    for cand in (spec.parent / base, Path(base)):
        if cand.is_file():
            return cand
    raise SweepError(
        f"{spec}: base config '{base}' not found (looked in {spec.parent} and {Path.cwd()})"
    )


def _config_message(err: ConfigError) -> str:
    # load_config calls the overrides "command line"; here they come from the spec
    return (
        str(err)
        .replace("(with command-line overrides)", "(with the sweep's overrides)")
        .replace("command line: ", "", 1)
    )


def load_sweep(
    spec_path: str | Path, extra: dict | None = None, out: str | Path | None = None
) -> Sweep:
    """Read a spec, expand its grid and validate every run's config (nothing written)."""
    spec = Path(spec_path)
    if not spec.is_file():
        raise SweepError(f"sweep spec {spec} does not exist (see configs/paper/sweeps/)")
    try:
        data = yaml.safe_load(spec.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{spec}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{spec}: the top level must be a mapping ({', '.join(SPEC_KEYS)})")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise SweepError(
            f"{spec}: unknown spec key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (known: {', '.join(SPEC_KEYS)})"
        )
    base = _resolve_base(spec, data.get("base"))
    name = str(data.get("name") or spec.stem)
    overrides = _dotted(data.get("overrides"), "overrides", spec)
    grid = _dotted(data.get("grid"), "grid", spec)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{spec}: grid '{key}' must be a non-empty list, e.g. [{values!r}]")
        if key in overrides:
            raise SweepError(f"{spec}: {key} is both in 'grid' and in 'overrides'; keep one")
    for key, value in (extra or {}).items():
        if key in grid:
            raise SweepError(
                f"--{key} on the command line would replace the grid's "
                f"{key} {grid[key]}; edit the spec instead"
            )
        overrides[key] = value

    repeats = _repeats(data.get("repeats"), grid, overrides, spec)

    runs, errors = [], []
    try:
        base_cfg = load_config(base, overrides)
    except ConfigError as e:
        raise SweepError(f"{spec}: {_config_message(e)}") from None
    sweep_dir = Path(out or data.get("out") or Path(base_cfg.run.out_dir) / name)
    for values in _points(grid, repeats, base_cfg):
        # with repeats the name carries the repeat (r0, r1, ...), not the seed it implies
        named = {k: v for k, v in values.items() if not (repeats and k == "run.seed")}
        rname = run_name(named) if named else name
        try:
            cfg = load_config(base, {**overrides, **values, "run.name": rname})
            if cfg.split.num_clients is None:
                raise ConfigError(
                    f"the number of clients is not set: add '{CLIENTS}: [K]' "
                    f"to the spec's grid (or '{CLIENTS}: K' to its overrides)"
                )
        except ConfigError as e:
            shown = ", ".join(
                f"{CLIENTS if k == 'split.num_clients' else k}={_value_text(v)}"
                for k, v in values.items()
            )
            errors.append(f"run '{rname}' ({shown}): {_config_message(e)}")
            continue
        runs.append(Run(rname, values, cfg, sweep_dir / rname))
    if errors:
        more = (
            f" ({len(errors)} of {len(errors) + len(runs)} runs fail; the first is shown)"
            if len(errors) > 1
            else ""
        )
        raise SweepError(f"{spec}: {errors[0]}{more}")
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(
            f"{spec}: the grid gives several runs the name {dupes[0]!r} (repeated "
            f"values in a grid list?)"
        )
    return Sweep(spec, name, sweep_dir, runs)


def _points(grid: dict, repeats: Repeats | None, base_cfg: Config):
    """Every run's grid values: the grid's product, then with `repeats` each point that
    many times (run.repeat = i; run.seed = base seed + i with seed_mode per_repeat)."""
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        if repeats is None:
            yield values
            continue
        clients = values.get("split.num_clients", base_cfg.split.num_clients)
        for i in range(repeats.of(clients)):
            seed = base_cfg.run.seed + (i if repeats.seed_mode == "per_repeat" else 0)
            yield {**values, "run.repeat": i, "run.seed": seed}


def _same_experiment(cfg: Config) -> str:
    """A run's content address: its resolved config, less the name (which only labels it)."""
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k != "name"}
    return json.dumps(d, sort_keys=True, default=str)


def _neighbours(sweep: Sweep) -> dict:
    """Run folders of the other sweeps beside this one (out's parent folder), by content
    address: a run already written there is this sweep's run too."""
    found = {}
    if not sweep.out.parent.is_dir():
        return found
    for other in sorted(sweep.out.parent.iterdir()):
        if other.resolve() == sweep.out.resolve() or not other.is_dir():
            continue
        for d in sorted(other.iterdir()):
            folder = RunFolder(d)
            if d.is_symlink() or not folder.is_run():
                continue
            try:
                found.setdefault(_same_experiment(folder.read_config()), d)
            except ConfigError:
                continue
    return found


def shared_with(run: Run) -> Path | None:
    """The other sweep's folder this run shares (trained once for both), if any."""
    return run.dir.resolve() if run.dir.is_symlink() else None


def write_configs(sweep: Sweep) -> None:
    """Write every run's config.yaml. A folder that already has results must hold the
    same config (else the sweep stops before writing anything). A run whose config
    (but for its name) is already a run folder of another sweep beside this one -- the
    main table's K = 5, E = 5, IID FULL run and the K x E grid's -- becomes a link to
    that folder: trained once, reported by both (its lock keeps two launches apart)."""
    new = [r for r in sweep.runs if not (r.dir.exists() or r.dir.is_symlink())]
    neighbours = _neighbours(sweep) if new else {}
    for run in new:
        same = neighbours.get(_same_experiment(run.cfg))
        if same is not None:
            run.dir.parent.mkdir(parents=True, exist_ok=True)
            run.dir.symlink_to(os.path.relpath(same, run.dir.parent), target_is_directory=True)
    for run in sweep.runs:
        folder = run.folder
        if not (folder.is_run() and folder.has_results()):
            continue
        try:
            old = folder.read_config().to_dict()
        except ConfigError as e:
            raise SweepError(
                f"run '{run.name}': {run.dir} holds results but its config.yaml "
                f"cannot be read ({e}); move the folder away or use --out"
            ) from None
        new = run.cfg.to_dict()
        old["run"]["name"] = new["run"]["name"]  # a shared folder keeps its first name
        if old != new:
            diff = [
                f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}"
                for s in new
                for k in new[s]
                if old.get(s, {}).get(k) != new[s][k]
            ]
            raise SweepError(
                f"run '{run.name}': {run.dir} holds results of a different config "
                f"({'; '.join(diff[:5])}); move the folder away, use another --out, "
                f"or undo the change in the spec"
            )
    for run in sweep.runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        if run.dir.is_symlink():
            continue
        if not run.folder.is_run() or not run.folder.has_results():
            run.folder.write_config(run.cfg)


def progress(run: Run) -> Progress | None:
    if not run.folder.is_run():
        return None
    return run_progress(run.dir, run.cfg)


# ---------------------------------------------------------------- dry run


def estimates(sweep: Sweep) -> list[dict]:
    """Per run: world size and the analytical parameters / bytes the run will move
    (fedmpi.fl.ledger.comparison, the table `python -m fedmpi.comm` prints, 'moved' rule)."""
    from fedmpi.fl.ledger import comparison
    from fedmpi.model.summary import model_region_sizes

    sizes_of: dict = {}
    out = []
    for run in sweep.runs:
        cfg = run.cfg
        if run.centralized:
            moved = {"params": 0, "bytes": 0}
        else:
            key = repr((cfg.model, cfg.data.dataset))
            if key not in sizes_of:
                sizes_of[key] = model_region_sizes(cfg)
            moved = comparison(
                cfg.fed.method, run.clients, cfg.fed.rounds, sizes_of[key], cfg.run.seed
            )["moved"]
        out.append(dict(run=run, world=run.world, params=moved["params"], bytes=moved["bytes"]))
    return out


def dry_run_text(sweep: Sweep) -> str:
    rows = []
    est = estimates(sweep)
    for e in est:
        run, cfg = e["run"], e["run"].cfg
        p = progress(run)
        status = "new" if p is None or (p.done == 0 and not p.finished) else p.text()
        if shared_with(run):
            status += f"; shared with {shared_with(run).parent.name}/{shared_with(run).name}"
        local = f"{cfg.fed.local_steps} steps" if cfg.fed.local_steps else str(cfg.fed.local_epochs)
        rows.append(
            [
                run.name,
                e["world"],
                "centralized" if run.centralized else cfg.fed.method,
                run.clients,
                "-" if run.centralized else cfg.split.kind,
                f"{cfg.train.epochs} ep" if run.centralized else cfg.fed.rounds,
                "-" if run.centralized else local,
                f"{e['params']:,}",
                f"{e['bytes'] / 1e6:,.1f}",
                status,
            ]
        )
    table = format_table(
        ["run", "W", "method", "K", "split", "R", "E", "parameters", "MB", "status"],
        rows,
        align="lrlrlrrrrl",
    )
    total = sum(e["bytes"] for e in est)
    return (
        f"sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.out} (spec {sweep.spec})\n"
        f"{table}\n"
        f"W = world size (K + 1 ranks; 1 = centralized baseline, one process). Parameters "
        f"and MB: what each run moves by the analytical table (initial model + R uploads + "
        f"R downloads, float32, the weight w_k included): {total / 1e6:,.1f} MB in all; largest world "
        f"{max((e['world'] for e in est), default=0)} ranks."
    )
