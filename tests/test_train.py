"""The centralized baseline: one process, real Fashion-MNIST, the shared training loop."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from fedmpi.checkpoint import checkpoint_dir, latest_complete
from fedmpi.config import load_config
from fedmpi.train import main, run_centralized

from mpihelp import ROOT

FMNIST = "/usr/share/datasets/fashion-mnist"


def quiet(*a, **k):
    pass


def tiny_cfg(tmp_path, **over):
    base = {"train.epochs": 2, "train.log_every": 5, "data.train_subset": 640,
            "eval.grid": 16, "eval.extractor": "none", "run.out_dir": str(tmp_path)}
    base.update(over)
    return load_config(ROOT / "tests/configs/tiny.yaml", base)


def test_centralized_loss_decreases_and_writes_run_folder(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 3})
    run = tmp_path / "run"
    run.mkdir()
    from fedmpi.train import _evaluator_factory
    run_centralized(cfg, run, log=quiet, evaluator_factory=_evaluator_factory(cfg))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all(r["images_per_s"] > 0 for r in epochs)
    # 120 steps on real images: the epsilon loss must fall well below its start
    assert steps[-1]["loss"] < 0.6 * steps[0]["loss"], (steps[0], steps[-1])
    assert latest_complete(run) == 3
    ckpt = torch.load(checkpoint_dir(run, 3) / "model.pt", weights_only=True)
    assert {"model", "optimizer", "step", "rng", "config", "epoch"} <= set(ckpt)
    assert ckpt["step"] == 3 * 40 and ckpt["config"]["train"]["epochs"] == 3
    png = run / "samples" / "round_0003.png"
    assert png.stat().st_size > 500


def test_centralized_resume_matches_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    for d in (full, part):
        d.mkdir()
    run_centralized(tiny_cfg(tmp_path, **{"eval.grid": 0}), full, log=quiet)
    run_centralized(tiny_cfg(tmp_path, **{"eval.grid": 0, "train.epochs": 1}), part, log=quiet)
    run_centralized(tiny_cfg(tmp_path, **{"eval.grid": 0}), part, resume=True, log=quiet)
    a = torch.load(checkpoint_dir(full, 2) / "model.pt", weights_only=True)["model"]
    b = torch.load(checkpoint_dir(part, 2) / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_writes_resolved_config(tmp_path):
    run = tmp_path / "cli"
    code = main(["--config", str(ROOT / "tests/configs/tiny.yaml"), "--run-dir", str(run),
                 "--train.max_steps=3", "--train.lr=3e-4", "--eval.extractor=none",
                 "--eval.grid=0"])
    assert code == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(3e-4) and saved["train"]["max_steps"] == 3


def test_cli_missing_data_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fedmpi.train", "--config",
                          "tests/configs/tiny.yaml", "--run-dir", str(tmp_path / "r"),
                          f"--data.root={tmp_path}/nowhere", "--data.download=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "dataset-fashion-mnist" in res.stdout + res.stderr
