"""`python -m fedmpi.plot` and `python -m fedmpi.evaluate` on a tiny finished UDEC run.

One run per module (3 ranks: federator + 2 clients, 2 rounds, 16 samples per client
scored with the offline classifier, cached in ~/.cache/fedmpi or trained once).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpihelp import ROOT, mpi_env, train

pytestmark = pytest.mark.mpi

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def udec_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plot_eval") / "tiny_udec"
    res = train(
        3,
        run_dir,
        "--fed.method=udec",
        "--eval.extractor=classifier",
        "--eval.num_samples=16",
        "--eval.every=1",
        "--eval.personal=local",  # the reference's scoring point (eval.csv scores it)
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return run_dir


def cli(module: str, *args: str, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env or mpi_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_image(path) -> None:
    """A real, non-blank PNG of a sensible size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 400, (path, img.shape)
    assert float(np.std(img[..., :3])) > 0.01, f"{path} is blank"


# ---------------------------------------------------------------- plot


def test_plot_cli_writes_every_png(udec_run):
    res = cli("fedmpi.plot", udec_run)
    assert res.returncode == 0, res.stdout + res.stderr
    out = udec_run / "plots"
    name = udec_run.name
    expected = {
        out / f
        for f in (
            "score_vs_round.png",
            "score_vs_bytes.png",
            "loss.png",
            f"per_client_{name}.png",
            f"split_{name}.png",
        )
    }
    printed = {Path(line) for line in res.stdout.splitlines() if line.strip()}
    assert printed == expected, res.stdout
    for path in expected:
        assert_image(path)


def test_plot_several_runs_default_out_and_data(udec_run, tmp_path, monkeypatch, capsys):
    import fedmpi.analysis.runs as runs
    import fedmpi.cli.plot as plot_cli

    other = tmp_path / "copy"
    other.mkdir()
    for f in ("config.yaml", "metrics.jsonl", "eval.csv", "comm.csv"):
        shutil.copy(udec_run / f, other / f)
    monkeypatch.chdir(tmp_path)
    assert plot_cli.main([str(udec_run), str(other), "--metric", "fd_classifier"]) == 0
    written = capsys.readouterr().out.split()
    assert all(w.startswith("plots/") for w in written) and len(written) == 7, written
    assert (tmp_path / "plots" / "score_vs_bytes.png").is_file()

    run = runs.load_run(udec_run)
    assert run.method == "udec" and run.personal and run.num_clients == 2
    # cumulative client bytes: round 0 = the full model to both clients, then UDEC's decoder
    # up (with its weight) and down for both clients every round
    from fedmpi.config import load_config
    from fedmpi.model.summary import model_region_sizes

    sizes = model_region_sizes(load_config(udec_run / "config.yaml"))
    r0 = 2 * 4 * sum(sizes.values())
    per_round = 2 * (4 * (sizes["decoder"] + 1) + 4 * sizes["decoder"])
    assert runs.cumulative_bytes(run) == {0: r0, 1: r0 + per_round, 2: r0 + 2 * per_round}
    xs, mean, std = runs.score_series(run, "fd_classifier")
    assert list(xs) == [1, 2] and std is not None and np.all(std >= 0)
    rows, desc = runs.split_rows(run)
    assert [r["size"] for r in rows] == [120, 120] and "2 clients" in desc


def test_plot_rejects_a_folder_that_is_not_a_run(tmp_path):
    res = cli("fedmpi.plot", tmp_path)
    assert res.returncode == 2
    assert "not a fedmpi run folder" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------- evaluate


def test_evaluate_rescores_personal_models(udec_run):
    res = cli("fedmpi.evaluate", udec_run, "--num-samples", 16)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line.split() for line in res.stdout.splitlines()]
    assert [cells[0] for cells in lines if cells and cells[0] in ("1", "2", "mean", "std")] == [
        "1",
        "2",
        "mean",
        "std",
    ], res.stdout
    assert "+-" in res.stdout

    path = udec_run / "rescore_classifier_local_round_2.csv"
    assert str(path) in res.stdout
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["client"] for r in rows] == ["1", "2", "mean", "std"]
    assert all(r["round"] == "2" and r["num_samples"] == "16" for r in rows)
    scores = [float(r["fd_classifier"]) for r in rows[:2]]
    assert float(rows[2]["fd_classifier"]) == pytest.approx(np.mean(scores))
    assert float(rows[3]["fd_classifier"]) == pytest.approx(np.std(scores, ddof=1))
    # same checkpoint, settings and seeds as the training-time evaluation: same scores,
    # precision and recall of each personal model too (the federator scores them)
    with (udec_run / "eval.csv").open() as f:
        at_train = {r["client"]: r for r in csv.DictReader(f) if r["round"] == "2"}
    assert scores == pytest.approx(
        [float(at_train[c]["fd_classifier"]) for c in ("1", "2")], rel=1e-3
    )
    for r in rows[:2]:
        for key in ("precision", "recall"):
            assert 0 <= float(r[key]) <= 1
            assert float(r[key]) == pytest.approx(float(at_train[r["client"]][key]), abs=1 / 16)


def _rescored(run, *args) -> dict:
    res = cli("fedmpi.evaluate", run, "--num-samples", 16, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    path = next(line.split()[-1] for line in res.stdout.splitlines() if line.startswith("wrote"))
    with open(path) as f:
        return {r["client"]: float(r["fd_classifier"]) for r in csv.DictReader(f)}


def test_evaluate_honours_personal_scoring_point(udec_run):
    """eval.personal=local re-scores each client's model from right after its local
    training (what eval.csv scored during training); aggregated the same client's
    personal regions with the averaged shared ones: another model, other scores."""
    local = _rescored(udec_run)  # the run's own setting: local
    aggregated = _rescored(udec_run, "--eval.personal=aggregated")
    assert (udec_run / "rescore_classifier_round_2.csv").is_file()
    for client in ("1", "2"):  # other weights, same sampling noise: never the same score
        assert local[client] != pytest.approx(aggregated[client], rel=1e-6), (local, aggregated)
    with (udec_run / "eval.csv").open() as f:
        at_train = {
            r["client"]: float(r["fd_classifier"]) for r in csv.DictReader(f) if r["round"] == "2"
        }
    assert local["1"] == pytest.approx(at_train["1"], rel=1e-3)
    assert aggregated["1"] != pytest.approx(at_train["1"], rel=1e-6)


def test_evaluate_local_needs_the_pre_averaging_model(udec_run, tmp_path):
    """A client file without the pre-averaging model (a run trained with
    eval.personal=aggregated) is refused for local scoring, naming the fix."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(udec_run, run)
    ckpt = run / "checkpoints" / "round_000002" / "client_001.pt"
    obj = torch.load(ckpt, weights_only=True)
    del obj["local_model"]
    torch.save(obj, ckpt)
    res = cli("fedmpi.evaluate", run, "--num-samples", 16)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--eval.personal=aggregated" in res.stderr and "Traceback" not in res.stderr


def test_evaluate_bad_round_and_folder(udec_run, tmp_path, capsys):
    from fedmpi.cli.evaluate import main

    assert main([str(udec_run), "--round", "9"]) == 2
    assert "complete: 1, 2" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "not a fedmpi run folder" in capsys.readouterr().err


def test_evaluate_inception_without_weights_fails_first(udec_run, tmp_path):
    env = dict(mpi_env(), TORCH_HOME=str(tmp_path / "torch"))  # an empty hub cache
    res = cli("fedmpi.evaluate", udec_run, "--extractor", "inception", env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in res.stdout + res.stderr
    assert "re-scoring" not in res.stdout  # failed before loading or sampling anything
    assert not (udec_run / "rescore_inception_round_2.csv").exists()
