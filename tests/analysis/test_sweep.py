"""Experiment grids (fedmpi.analysis.sweep) and the paper's tables (fedmpi.analysis.report).

* Unit: spec expansion, run names, validation before anything is written, the dry-run
  table (world sizes and bytes against fedmpi.fl.ledger.comparison), refusing a folder that
  holds results of another config, the mpirun and sbatch command lines (a stand-in
  sbatch / squeue on PATH records what a submission passes), report cells.
* End to end (real mpirun): tests/configs/sweep_tiny.yaml (FULL, UDEC x IID, label skew,
  K = 2, 2 rounds of 2 local steps, 16 samples scored with the offline classifier) with
  `--launcher local`; `fedmpi.analysis.report` on it (markdown, CSV, PNG); an interrupted run is
  reported incomplete, and a rerun skips the finished runs and resumes it; K = 1 runs the
  centralized baseline in one process and a failing run fails the sweep after the others.
* Slurm (marked `slurm`): the tiny sweep submitted with `--launcher slurm` to the local
  Slurm of tests/slurm_cluster.py, the jobs waited for, the report made.

The classifier is trained once (about 2.5 minutes on 2 loaded cores) and cached in
~/.cache/fedmpi; with the cache the local end-to-end tests take about 3 minutes on 2 busy
cores.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from mpihelp import ROOT, mpi_env

import fedmpi.analysis.launch as launch
import fedmpi.analysis.paper as paper
import fedmpi.analysis.report as report
import fedmpi.analysis.sweep as sweep
import fedmpi.cli.sweep as sweep_cli
from fedmpi.config import load_config
from fedmpi.store.runfolder import RunFolder

TINY_SPEC = ROOT / "tests/configs/sweep_tiny.yaml"
PAPER_SWEEPS = ROOT / "configs/paper/sweeps"
TINY_NAMES = ["K2-iid-full-s7", "K2-iid-udec-s7", "K2-label_skew-full-s7", "K2-label_skew-udec-s7"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_spec(path: Path, **spec) -> Path:
    spec.setdefault("base", str(ROOT / "tests/configs/tiny.yaml"))
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(module: str, *args, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            cwd=ROOT,
            env=env or mpi_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{module} timed out after {timeout}s\n{e.stdout}\n{e.stderr}")


# ---------------------------------------------------------------- expansion, names


def test_tiny_spec_expands_in_grid_order(tmp_path):
    sw = sweep.load_sweep(TINY_SPEC, out=tmp_path / "sw")
    assert [r.name for r in sw.runs] == TINY_NAMES
    assert sw.name == "sweep_tiny" and sw.out == tmp_path / "sw"
    for run, (split, method) in zip(
        sw.runs, [("iid", "full"), ("iid", "udec"), ("label_skew", "full"), ("label_skew", "udec")]
    ):
        c = run.cfg
        assert (c.split.kind, c.fed.method, c.split.num_clients, c.run.seed) == (
            split,
            method,
            2,
            7,
        )
        assert (c.eval.extractor, c.eval.num_samples, c.run.name) == ("classifier", 16, run.name)
        assert c.fed.rounds == 2 and c.fed.local_steps == 2  # from tiny.yaml
        assert run.world == 3 and run.dir == tmp_path / "sw" / run.name
    assert [r.name for r in sweep.load_sweep(TINY_SPEC, out=tmp_path).runs] == TINY_NAMES
    assert not (tmp_path / "sw").exists()  # expanding writes nothing


def test_run_names_are_deterministic_and_filesystem_safe():
    name = sweep.run_name(
        {
            "split.num_clients": 5,
            "fed.local_epochs": 3,
            "train.lr": 2e-4,
            "fed.freeze_unshared": True,
            "model.dim_mults": [1, 2, 4],
            "split.kind": "label_skew",
            "data.root": "/data/my fmnist",
            "run.seed": 2024,
        }
    )
    assert name == (
        "K5-E3-lr_0.0002-freeze_unshared_true-dim_mults_1x2x4-label_skew-root_data_my_fmnist-s2024"
    )
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name)


def test_paper_specs(tmp_path):
    main = sweep.load_sweep(PAPER_SWEEPS / "main_table.yaml", out=tmp_path)
    assert len(main.runs) == 4 * 3 * (5 + 5 + 3)  # the reference's repeats: 5, 5, 3 by K
    c = main.runs[0].cfg
    assert (c.fed.rounds, c.fed.local_epochs, c.train.batch_size, c.split.seed) == (
        15,
        5,
        128,
        2023,
    )
    assert {(r.cfg.fed.method, r.cfg.split.kind, r.clients) for r in main.runs} == {
        (m, s, k)
        for m in ("full", "usplit", "udec", "ulatdec")
        for s in ("iid", "label_skew", "quantity_skew")
        for k in (2, 5, 10)
    }
    # seed_mode fixed: every repeat trains from the same seed, as the reference does
    assert {r.cfg.run.seed for r in main.runs} == {2023}
    repeats = {k: {r.cfg.run.repeat for r in main.runs if r.clients == k} for k in (2, 5, 10)}
    assert repeats == {2: set(range(5)), 5: set(range(5)), 10: set(range(3))}
    assert main.runs[0].name == "K2-iid-full-r0"
    # the paper-exact evaluation: FID of 1,000 DDPM samples, the reference's PNG clamp,
    # the first 1,000 test images, personal models right after local training
    e = c.eval
    assert (e.extractor, e.preprocess, e.sampler, e.num_samples, e.personal) == (
        "inception",
        "reference",
        "ddpm",
        1000,
        "local",
    )
    assert c.data.test_subset == 1000
    ke = sweep.load_sweep(PAPER_SWEEPS / "k_by_e.yaml", out=tmp_path)
    assert sorted((r.clients, r.cfg.fed.local_epochs, r.cfg.run.repeat) for r in ke.runs) == [
        (k, e, i) for k in (2, 5, 10) for e in (1, 2, 3, 5, 8) for i in range(5)
    ]
    assert {(r.cfg.fed.method, r.cfg.split.kind, r.cfg.fed.rounds) for r in ke.runs} == {
        ("full", "iid", 15)
    }
    cen = sweep.load_sweep(PAPER_SWEEPS / "centralized.yaml", out=tmp_path)
    assert [(r.world, r.centralized, r.cfg.train.epochs) for r in cen.runs] == [(1, True, 15)] * 5


@pytest.mark.parametrize(
    "grid, overrides, expected",
    [
        (
            {"clients": [2], "fed.method": ["full", "fulll"]},
            {},
            r"run 'K2-fulll' \(clients=2, fed.method=fulll\): .*'fed.method' is 'fulll'; choose one of full",
        ),
        (
            {"clients": [2], "fed.metod": ["udec"]},
            {},
            r"run 'K2-metod_udec'.*unknown config key 'fed.metod'",
        ),
        (
            {"clients": [2], "train.batch_size": [0, 16]},
            {},
            r"run 'K2-B0'.*'train.batch_size' must be in \[1, 65536\]",
        ),
        ({"fed.method": ["full"]}, {}, r"run 'full'.*number of clients is not set"),
        (
            {"clients": [2], "fed.method": ["full"]},
            {"fed.method": "udec"},
            r"fed.method is both in 'grid' and in 'overrides'",
        ),
        ({"clients": 2}, {}, r"grid 'split.num_clients' must be a non-empty list"),
    ],
)
def test_invalid_spec_fails_whole_sweep_naming_the_run(tmp_path, grid, overrides, expected):
    spec = write_spec(tmp_path / "bad.yaml", overrides=overrides, grid=grid)
    with pytest.raises(sweep.SweepError, match=expected):
        sweep.load_sweep(spec, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_invalid_run_before_writing_anything(tmp_path):
    spec = write_spec(tmp_path / "bad.yaml", grid={"clients": [2], "fed.method": ["full", "fulll"]})
    res = cli("fedmpi.sweep", spec, "--launcher", "local", "--out", tmp_path / "out", timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith(
        f"error: {spec}: run 'K2-fulll' (clients=2, fed.method=fulll): "
    ), res.stderr
    assert "with the sweep's overrides" in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()  # not even the valid run's folder


def test_spec_errors(tmp_path):
    with pytest.raises(sweep.SweepError, match="unknown spec key 'grids'"):
        sweep.load_sweep(write_spec(tmp_path / "a.yaml", grids={}))
    with pytest.raises(sweep.SweepError, match="base config 'nope.yaml' not found"):
        sweep.load_sweep(write_spec(tmp_path / "b.yaml", base="nope.yaml"))
    with pytest.raises(sweep.SweepError, match="would replace the grid's split.kind"):
        sweep.load_sweep(TINY_SPEC, {"split.kind": "iid"})
    with pytest.raises(sweep.SweepError, match="name 'K2'"):
        sweep.load_sweep(write_spec(tmp_path / "c.yaml", grid={"clients": [2, 2]}))


def test_dry_run_lists_world_sizes_and_analytical_bytes(capsys):
    from fedmpi.fl.ledger import comparison
    from fedmpi.model.summary import model_region_sizes

    assert (
        sweep_cli.main(
            [str(PAPER_SWEEPS / "main_table.yaml"), "--dry-run", "--out", "/nonexistent/x"]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith("K") and re.match(r"K\d+-\w+-\w+-r\d ", line)
    }
    assert len(rows) == 156
    cfg = load_config(ROOT / "configs/paper/fmnist_full.yaml")
    sizes = model_region_sizes(cfg)
    for name, method, k in (
        ("K10-iid-full-r0", "full", 10),
        ("K5-label_skew-usplit-r1", "usplit", 5),
        ("K2-quantity_skew-udec-r4", "udec", 2),
    ):
        moved = comparison(method, k, 15, sizes, 2023)["moved"]
        run, w, m, kk, split, r, e, params, mb, status = rows[name]
        assert (int(w), m, int(kk), int(r), int(e), status) == (k + 1, method, k, 15, 5, "new")
        assert int(params.replace(",", "")) == moved["params"]
        assert float(mb.replace(",", "")) == pytest.approx(moved["bytes"] / 1e6, abs=0.06)
    assert (
        rows["K10-iid-full-r0"][7] == "928,857,650"
    )  # README / python -m fedmpi.comm --rule moved
    assert sweep_cli.main([str(PAPER_SWEEPS / "centralized.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^K1-r0\s+1\s+centralized\s+1\s+-\s+15 ep\s+-\s+0\s+0\.0\s+new$", out, re.M
    ), out


def test_folder_with_results_of_another_config_is_refused(tmp_path):
    sw = sweep.load_sweep(TINY_SPEC, out=tmp_path)
    sweep.write_configs(sw)
    run = sw.runs[0]
    assert load_config(run.dir / "config.yaml").to_dict() == run.cfg.to_dict()
    (run.dir / "metrics.jsonl").write_text('{"kind": "round", "round": 1}\n')
    sweep.write_configs(sweep.load_sweep(TINY_SPEC, out=tmp_path))  # same config: fine
    changed = sweep.load_sweep(TINY_SPEC, {"fed.rounds": 3}, out=tmp_path)
    with pytest.raises(
        sweep.SweepError,
        match=r"run 'K2-iid-full-s7': .* different config "
        r"\(fed.rounds: 2 -> 3\)",
    ):
        sweep.write_configs(changed)
    assert load_config(run.dir / "config.yaml").fed.rounds == 2
    assert load_config(sw.runs[1].dir / "config.yaml").fed.rounds == 2  # nothing rewritten


def test_local_command_lines(tmp_path):
    from mpihelp import mpirun_path

    mpirun = mpirun_path()
    runs = sweep.load_sweep(
        write_spec(tmp_path / "s.yaml", grid={"clients": [1, 2, 5]}), out=tmp_path / "o"
    ).runs
    cmds = [launch.train_command(r, "PY", mpirun, ["--bind-to", "none"]) for r in runs]
    assert cmds[0] == ["PY", "-m", "fedmpi.train", "--run-dir", str(tmp_path / "o/K1")]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    many = ["--oversubscribe"] if 6 > len(os.sched_getaffinity(0)) else []
    assert cmds[2] == [
        mpirun,
        *root,
        *many,
        "--bind-to",
        "none",
        "-n",
        "6",
        "PY",
        "-m",
        "fedmpi.train",
        "--run-dir",
        str(tmp_path / "o/K5"),
    ]
    assert cmds[1][cmds[1].index("-n") + 1] == "3"


FAKE_SBATCH = """#!/bin/sh
# stands in for sbatch: records the arguments and what slurm/run.sh would read
n=$(cat "$FAKE_DIR/next" 2>/dev/null || echo 500); echo $((n + 1)) > "$FAKE_DIR/next"
echo "$*" >> "$FAKE_DIR/calls"
echo "RUN_DIR=$RUN_DIR CONFIG=$CONFIG PYTHON=$PYTHON" >> "$FAKE_DIR/env"
echo "$n"
"""


def test_slurm_submission_command_lines(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "squeue").write_text('#!/bin/sh\necho "$FAKE_SQUEUE"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_SQUEUE", "")
    monkeypatch.delenv("PYTHON", raising=False)
    spec = write_spec(
        tmp_path / "s.yaml", name="fake", grid={"clients": [1, 3], "fed.method": ["udec"]}
    )
    out = tmp_path / "sw"
    assert (
        sweep_cli.main(
            [
                str(spec),
                "--launcher",
                "slurm",
                "--out",
                str(out),
                "--sbatch-flags",
                "--time=5 --partition=debug",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[1/2] K1-udec (--ntasks=1): submitted job 500" in printed
    assert "[2/2] K3-udec (--ntasks=4): submitted job 501" in printed
    assert "2 jobs submitted: 500 501" in printed
    calls = (tmp_path / "calls").read_text().splitlines()
    script = ROOT / "slurm" / "run.sh"
    for call, (name, n) in zip(calls, [("K1-udec", 1), ("K3-udec", 4)]):
        assert call == (
            f"--parsable --ntasks={n} --job-name=fake-{name} "
            f"--output={out.resolve()}/{name}/slurm-%j.out --time=5 "
            f"--partition=debug {script}"
        )
    envs = (tmp_path / "env").read_text().splitlines()
    assert envs[1] == (
        f"RUN_DIR={out.resolve()}/K3-udec CONFIG={out.resolve()}/K3-udec/config.yaml "
        f"PYTHON={sys.executable}"
    )
    assert load_config(out / "K3-udec/config.yaml").split.num_clients == 3
    assert (out / "K3-udec/slurm_jobs.txt").read_text() == "501\n"
    # resubmitting while the jobs are queued submits nothing
    monkeypatch.setenv("FAKE_SQUEUE", "PENDING")
    assert sweep_cli.main([str(spec), "--launcher", "slurm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[2/2] K3-udec (--ntasks=4): job 501 is still queued or running" in printed
    assert len((tmp_path / "calls").read_text().splitlines()) == 2
    # a failing sbatch is reported and makes the exit status non-zero
    monkeypatch.setenv("FAKE_SQUEUE", "")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n"
    )
    assert sweep_cli.main([str(spec), "--launcher", "slurm", "--out", str(out)]) == 1
    assert "sbatch FAILED (exit 1): sbatch: error: invalid partition" in capsys.readouterr().out
    assert launch.parse_job_id("Submitted batch job 1234\n") == "1234"
    assert launch.parse_job_id("77;cluster\n") == "77"


# ---------------------------------------------------------------- report cells


def test_paper_values_only_for_fid_at_the_paper_setting(tmp_path):
    main = sweep.load_sweep(PAPER_SWEEPS / "main_table.yaml", out=tmp_path).runs
    ke = sweep.load_sweep(PAPER_SWEEPS / "k_by_e.yaml", out=tmp_path).runs

    def table(run, extractor, **changes):
        cfg = run.cfg.replace({"eval.extractor": extractor, **changes})
        res = report.RunResult(
            tmp_path,
            cfg,
            cfg.fed.method,
            run.clients,
            report.Progress(15, 15, "rounds", True, 15),
            report.METRIC_OF_EXTRACTOR[extractor],
        )
        return report.Table(report.setting(res), [res])

    udec = next(r for r in main if r.name == "K5-quantity_skew-udec-r0")
    assert paper.paper_value(table(udec, "inception"), 5, "quantity_skew", "udec") == (
        139.0,
        135.0,
    )
    assert paper.paper_value(table(udec, "classifier"), 5, "quantity_skew", "udec") is None
    e2 = next(r for r in ke if r.name == "K10-E2-r0")
    assert paper.paper_value(table(e2, "inception"), 10, "iid", "full") == (110.9, None)
    tiny = sweep.load_sweep(TINY_SPEC, out=tmp_path).runs[0]
    assert paper.paper_value(table(tiny, "inception"), 2, "iid", "full") is None
    # every item of the paper's setting is checked, and the one that differs is named
    for key, value, named in (
        ("eval.sampler", "ddim", "sampler (1,000-step DDPM): eval.sampler = ddim (paper: ddpm)"),
        ("eval.num_samples", 500, "eval.num_samples = 500 (paper: 1000)"),
        ("eval.personal", "aggregated", "eval.personal = aggregated (paper: local)"),
        ("data.test_subset", None, "data.test_subset = null (paper: 1000)"),
        ("eval.preprocess", "exact", "eval.preprocess = exact (paper: reference)"),
        ("diffusion.loss", "mse", "diffusion.loss = mse (paper: huber)"),
        ("train.lr", 2e-4, "train.lr = 0.0002 (paper: 0.0001)"),
    ):
        t = table(udec, "inception", **{key: value})
        assert paper.paper_value(t, 5, "quantity_skew", "udec") is None, key
        assert paper.paper_differences(t, "udec") == [named] or named in "; ".join(
            paper.paper_differences(t, "udec")
        ), key
    # the scoring point of personal models does not concern a global model's cell
    full = next(r for r in main if r.name == "K5-quantity_skew-full-r0")
    t = table(full, "inception", **{"eval.personal": "aggregated"})
    assert paper.paper_value(t, 5, "quantity_skew", "full") == (22.8, 4.6)


def test_repeats_counts_by_k_and_seed_modes(tmp_path):
    spec = write_spec(
        tmp_path / "rep.yaml",
        overrides={"run.seed": 11},
        grid={"clients": [2, 3], "fed.method": ["full"]},
        repeats={"count": {2: 3, 3: 1}, "seed_mode": "per_repeat"},
    )
    sw = sweep.load_sweep(spec, out=tmp_path / "out")
    assert [(r.name, r.cfg.run.seed, r.cfg.run.repeat) for r in sw.runs] == [
        ("K2-full-r0", 11, 0),
        ("K2-full-r1", 12, 1),
        ("K2-full-r2", 13, 2),
        ("K3-full-r0", 11, 0),
    ]
    spec = write_spec(
        tmp_path / "fix.yaml", grid={"clients": [2]}, repeats={"count": 2, "seed_mode": "fixed"}
    )
    fixed = sweep.load_sweep(spec, out=tmp_path / "out2").runs
    assert [(r.cfg.run.seed, r.cfg.run.repeat) for r in fixed] == [(7, 0), (7, 1)]
    for bad, match in (
        ({"count": 0}, "whole number >= 1"),
        ({"count": 2, "seed_mode": "random"}, "seed_mode must be one of fixed, per_repeat"),
        ({"count": {5: 2}}, "no entry for K = 2"),
        ("three", "'repeats' must be"),
    ):
        with pytest.raises(sweep.SweepError, match=match):
            sweep.load_sweep(write_spec(tmp_path / "bad.yaml", grid={"clients": [2]}, repeats=bad))
    with pytest.raises(sweep.SweepError, match="remove run.seed from the grid"):
        sweep.load_sweep(
            write_spec(tmp_path / "b2.yaml", grid={"clients": [2], "run.seed": [1]}, repeats=2)
        )


def test_repeats_with_one_seed_sample_different_noise():
    """seed_mode fixed: repeat i trains as repeat 0 (the same run.seed) and draws its
    evaluation's sampling noise from the repeat, as the reference's unseeded sampler."""
    from fedmpi.eval.evaluate import Evaluator

    cfg = load_config(ROOT / "tests/configs/tiny.yaml")
    seeds = [
        Evaluator._seed(SimpleNamespace(cfg=cfg.replace({"run.repeat": i})), 1) for i in range(3)
    ]
    assert len(set(seeds)) == 3
    assert seeds[0] == Evaluator._seed(SimpleNamespace(cfg=cfg), 1)  # repeat 0: as before


def test_runs_two_sweeps_share_are_linked_and_reported_once(tmp_path):
    """A run whose resolved config (but for its name) is already a run of a sweep beside
    this one is that run: a link, trained once, counted once by the report."""
    a = write_spec(
        tmp_path / "a.yaml", grid={"clients": [2], "fed.method": ["full", "udec"]}, repeats=1
    )
    b = write_spec(
        tmp_path / "b.yaml",
        overrides={"fed.method": "full"},
        grid={"clients": [2], "fed.local_steps": [2, 3]},
        repeats=1,
    )
    sa = sweep.load_sweep(a, out=tmp_path / "runs" / "a")
    sweep.write_configs(sa)
    sb = sweep.load_sweep(b, out=tmp_path / "runs" / "b")
    sweep.write_configs(sb)
    shared, own = sb.runs  # local_steps 2 is tiny.yaml's own value: the same experiment
    assert shared.dir.is_symlink() and shared.dir.resolve() == (tmp_path / "runs/a/K2-full-r0")
    assert not own.dir.is_symlink() and (own.dir / "config.yaml").is_file()
    assert sweep.shared_with(shared) == tmp_path / "runs/a/K2-full-r0"
    assert "shared with a/K2-full-r0" in sweep.dry_run_text(sb)
    sweep.write_configs(sweep.load_sweep(b, out=tmp_path / "runs" / "b"))  # again: unchanged
    found = report.find_runs([tmp_path / "runs/a", tmp_path / "runs/b"])
    assert len(found) == 3 and len({p.resolve() for p in found}) == 3


# ---------------------------------------------------------------- end to end

pytest_mpi = pytest.mark.mpi


def final_eval(run_dir: Path) -> list[dict]:
    with (run_dir / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r["round"] == "2"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep_tiny"
    res = cli("fedmpi.sweep", TINY_SPEC, "--launcher", "local", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res.stdout


@pytest_mpi
def test_local_sweep_runs_every_run(tiny_sweep):
    out, stdout = tiny_sweep
    for i, name in enumerate(TINY_NAMES, 1):
        assert re.search(
            rf"^\[{i}/4\] {name} \(W=3\): running \.\.\. done, finished "
            rf"\(2/2 rounds\) in \d+s$",
            stdout,
            re.M,
        ), stdout
        d = out / name
        assert json.loads((d / "comm_summary.json").read_text())["matches_analytical"] is True
        assert (RunFolder(d).checkpoint_dir(2) / "COMPLETE").is_file()
        assert "-n 3" in (d / "train.log").read_text()
        assert report.run_progress(d).finished
    assert "sweep sweep_tiny: 4 of 4 runs finished" in stdout


def assert_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 500 and float(np.std(img[..., :3])) > 0.01


@pytest_mpi
def test_report_tables_csv_and_png(tiny_sweep):
    out, _ = tiny_sweep
    res = cli("fedmpi.report", out, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = out / "report"
    md = (rep / "report.md").read_text()
    # the metric is named, never called FID, and no paper value stands beside it
    assert (
        "**Metric: fd_classifier**" in md and "not comparable with the paper's Inception FID" in md
    )
    assert "FID**" not in md and "; paper " not in md
    full = {n: float(final_eval(out / n)[0]["fd_classifier"]) for n in TINY_NAMES if "full" in n}
    udec = {
        n: [float(r["fd_classifier"]) for r in final_eval(out / n)]
        for n in TINY_NAMES
        if "udec" in n
    }
    assert all(len(v) == 2 for v in udec.values())  # one row per client
    iid_udec = udec["K2-iid-udec-s7"]
    from scipy import stats

    lo, hi = stats.t.interval(0.95, 1, loc=np.mean(iid_udec), scale=stats.sem(iid_udec))
    row = (
        f"| 2 | IID | {full['K2-iid-full-s7']:.1f} (1 run) | {np.mean(iid_udec):.1f} ± "
        f"{np.std(iid_udec, ddof=1):.1f} [{lo:.1f}, {hi:.1f}] (1 run, n=2) |"
    )
    assert row in md, md
    assert "| K | split | FULL | UDEC |" in md and "| 2 | label skew |" in md
    # communication, the paper's rule: in all and per client per round (K = 2, R = 2)
    assert "| 2 | 2 | FULL | 0.533M | 2.1 | - | 0.133M | 0.53 |" in md, md
    assert "| 2 | 2 | UDEC | 0.231M | 0.9 | -56.8% | 0.0576M | 0.23 |" in md, md
    assert "![fd_classifier vs parameters exchanged](score_vs_params.png)" in md
    with (rep / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["K"], r["split"], r["metric"]) for r in table] == [
        ("2", "iid", "fd_classifier"),
        ("2", "label_skew", "fd_classifier"),
    ]
    ls = table[1]
    ls_udec = udec["K2-label_skew-udec-s7"]
    assert float(ls["full_mean"]) == pytest.approx(full["K2-label_skew-full-s7"])
    assert float(ls["udec_mean"]) == pytest.approx(np.mean(ls_udec))
    assert float(ls["udec_std"]) == pytest.approx(np.std(ls_udec, ddof=1))
    assert (ls["udec_n"], ls["full_n"], ls["usplit_runs"], ls["full_paper_fid_mean"]) == (
        "2",
        "1",
        "0",
        "",
    )
    with (rep / "runs.csv").open() as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    assert set(runs) == set(TINY_NAMES)
    assert runs["K2-iid-udec-s7"]["params_moved"] == "262930"
    assert runs["K2-iid-udec-s7"]["status"] == "complete"
    assert_png(rep / "score_vs_params.png")


@pytest_mpi
def test_rerun_skips_finished_and_resumes_interrupted(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    name = "K2-iid-udec-s7"
    d = out / name
    before = [float(r["fd_classifier"]) for r in final_eval(d)]
    # as if the job had been killed during round 2: round 1's checkpoint and logs only
    shutil.rmtree(RunFolder(d).checkpoint_dir(2))
    (d / "comm_summary.json").unlink()
    RunFolder(d).truncate(1)
    res = cli("fedmpi.report", out, "--out", tmp_path / "rep", timeout=180)
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep/report.md").read_text()
    assert "| 2 | IID | " in md and "| incomplete (1/2 rounds) |" in md
    assert f"| {name} | udec | 2 | IID | 7 | incomplete (1/2 rounds) |" in md
    assert "3 finished, 1 incomplete" in md
    res = cli("fedmpi.sweep", TINY_SPEC, "--launcher", "local", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    for other in TINY_NAMES:
        if other != name:
            assert f"{other} (W=3): finished (2/2 rounds), skipped" in res.stdout
    assert f"{name} (W=3): resuming after round 1, running ... done" in res.stdout
    assert "resume: continuing after round 1" in (d / "train.log").read_text()
    after = [float(r["fd_classifier"]) for r in final_eval(d)]
    assert after == pytest.approx(before, rel=1e-4)
    assert report.read_run(d).status == "complete"


@pytest_mpi
def test_centralized_k1_and_a_failing_run(tiny_sweep, tmp_path):
    """K = 1 runs in one process; a run that fails is reported, the others still run,
    the exit status is 1; the report puts the baseline row into the federated table."""
    spec = write_spec(
        tmp_path / "central.yaml",
        name="central",
        overrides={
            "eval.extractor": "classifier",
            "eval.num_samples": 16,
            "train.epochs": 1,
            "data.download": False,
        },
        grid={"clients": [1], "data.root": ["/nonexistent/fmnist", None], "run.seed": [7]},
    )
    out = tmp_path / "central"
    res = cli("fedmpi.sweep", spec, "--launcher", "local", "--out", out)
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(
        r"\[1/2\] K1-root_nonexistent_fmnist-s7 \(W=1\): running \.\.\. FAILED "
        r"\(exit 2, incomplete \(0/1 epochs\), \d+s\): .*error",
        res.stdout,
    ), res.stdout
    assert re.search(
        r"\[2/2\] K1-root_null-s7 \(W=1\): running \.\.\. done, finished "
        r"\(1/1 epochs\)",
        res.stdout,
    ), res.stdout
    assert "1 failed (rerun the same command to resume them)" in res.stdout
    log = (out / "K1-root_null-s7/train.log").read_text()
    assert "mpirun" not in log and "fedmpi centralized:" in log
    fed, _ = tiny_sweep
    res = cli("fedmpi.report", fed, out, "--out", tmp_path / "rep", timeout=180)
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep/report.md").read_text()
    score = float(final_eval_central(out / "K1-root_null-s7"))
    assert f"| 1 | centralized | {score:.1f} (1 run); 1 incomplete (0/1 epochs) |  |" in md, md
    assert md.count("## Table") == 1  # same setting as the federated runs: one table
    assert "6 runs from" in md


def final_eval_central(run_dir: Path) -> str:
    with (run_dir / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["client"] for r in rows] == ["global"]
    return rows[0]["fd_classifier"]


# ---------------------------------------------------------------- Slurm


@pytest.mark.slurm
def test_tiny_sweep_on_local_slurm(tmp_path):
    from mpihelp import mpirun_path
    from slurm_cluster import LocalSlurm, running_for_tests

    with running_for_tests(LocalSlurm, cpus=16) as slurm:
        out = tmp_path / "sw"
        # (slurm.env keeps its PATH; the node declares 16 CPUs on 2 cores: no core binding)
        env = slurm.env(
            {
                "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT),
                "MPIRUN": mpirun_path(),
                "MPIRUN_FLAGS": "--bind-to none",
            }
        )
        cmd = [
            sys.executable,
            "-m",
            "fedmpi.sweep",
            str(TINY_SPEC),
            "--launcher",
            "slurm",
            "--out",
            str(out),
            "--sbatch-flags",
            "--time=10 --cpus-per-task=1",
        ]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        jobs = re.findall(r"\(--ntasks=3\): submitted job (\d+)", res.stdout)
        assert len(jobs) == 4, res.stdout
        states = {}
        for job in jobs:
            states[job] = slurm.wait(int(job), timeout=600)
        outputs = {j: slurm.output_path(int(j)) for j in jobs}
        assert set(states.values()) == {"COMPLETED"}, f"{states}\n" + "\n".join(
            p.read_text(errors="replace") for p in outputs.values()
        )
        for name, job in zip(TINY_NAMES, jobs):
            assert outputs[job] == (out / name / f"slurm-{job}.out").resolve()
            assert (
                f"| 3 tasks (K=2) | config {(out / name).resolve()}/config.yaml"
                in outputs[job].read_text()
            )
            assert report.run_progress(out / name).finished
        # a second submission finds every run finished
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.count("finished (2/2 rounds), skipped") == 4
        # K = 1: the centralized baseline as a one-task job of slurm/run.sh
        spec = write_spec(
            tmp_path / "central.yaml",
            name="central",
            overrides={"train.epochs": 1, "eval.extractor": "none"},
            grid={"clients": [1], "run.seed": [7]},
        )
        central = tmp_path / "central"
        res = subprocess.run(
            [*cmd[:3], str(spec), *cmd[4:6], "--out", str(central), *cmd[8:]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        job = re.search(r"\(--ntasks=1\): submitted job (\d+)", res.stdout)
        assert res.returncode == 0 and job, res.stdout + res.stderr
        state = slurm.wait(int(job.group(1)), timeout=600)
        text = slurm.output_path(int(job.group(1))).read_text(errors="replace")
        assert state == "COMPLETED", text
        assert "| 1 tasks (the centralized baseline) |" in text and "fedmpi centralized:" in text
        assert report.run_progress(central / "K1-s7").finished
    res = cli("fedmpi.report", out, timeout=180)
    assert res.returncode == 0, res.stderr
    assert (out / "report/score_vs_params.png").is_file()
    assert "| 2 | IID |" in (out / "report/report.md").read_text()


def test_reproduce_presets(tmp_path):
    """The reduced presets: the CPU one (main table, K x E sharing its E = 1 runs, the
    baseline) and the GPU one (the paper's model, K = 5 label skew, 3 rounds)."""
    specs = ROOT / "configs/reproduce/sweeps"
    main = sweep.load_sweep(specs / "cpu_main.yaml", out=tmp_path / "r" / "main")
    assert len(main.runs) == 2 * 2 * 4 * 2
    assert {(r.clients, r.cfg.split.kind, r.cfg.run.repeat) for r in main.runs} == {
        (k, s, i) for k in (2, 5) for s in ("iid", "label_skew") for i in (0, 1)
    }
    assert {r.cfg.run.seed for r in main.runs} == {2023, 2024}  # per_repeat on a CPU
    sweep.write_configs(main)
    ke = sweep.load_sweep(specs / "cpu_k_by_e.yaml", out=tmp_path / "r" / "k_by_e")
    sweep.write_configs(ke)
    linked = sorted(r.name for r in ke.runs if sweep.shared_with(r))
    assert linked == ["K2-E1-r0", "K2-E1-r1", "K5-E1-r0", "K5-E1-r1"]
    cen = sweep.load_sweep(specs / "cpu_centralized.yaml", out=tmp_path / "r" / "c")
    assert [r.world for r in cen.runs] == [1, 1]
    assert cen.runs[0].cfg.train.epochs == main.runs[0].cfg.fed.rounds  # same passes (E = 1)
    gpu = sweep.load_sweep(specs / "gpu_main.yaml", out=tmp_path / "g").runs
    c = gpu[0].cfg
    assert [r.cfg.fed.method for r in gpu] == ["full", "usplit", "udec", "ulatdec"]
    assert (c.model.dim, c.split.kind, c.split.rng, c.fed.rounds, c.eval.ddim_steps) == (
        28,
        "label_skew",
        "numpy_legacy",
        3,
        100,
    )


def test_paper_sweep_without_inception_weights_stops_before_anything(tmp_path):
    env = dict(mpi_env(), TORCH_HOME=str(tmp_path / "torch"))  # an empty hub cache
    out = tmp_path / "out"
    spec = PAPER_SWEEPS / "centralized.yaml"
    res = cli("fedmpi.sweep", spec, "--launcher", "local", "--out", out, timeout=120, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in res.stderr and "curl -L" in res.stderr
    assert "--eval.extractor=classifier" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()  # nothing written, nothing launched
