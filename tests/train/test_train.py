"""The centralized baseline: one process, real Fashion-MNIST, the shared training loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from mpihelp import ROOT

from fedmpi.cli.train import main
from fedmpi.config import load_config
from fedmpi.store.runfolder import RunFolder
from fedmpi.train.loop import run_job
from fedmpi.train.stop import Preempted

FMNIST = "/usr/share/datasets/fashion-mnist"


def quiet(*a, **k):
    pass


def tiny_cfg(tmp_path, **over):
    base = {
        "train.epochs": 2,
        "train.log_every": 5,
        "data.train_subset": 640,
        "eval.grid": 16,
        "eval.extractor": "none",
        "run.out_dir": str(tmp_path),
    }
    base.update(over)
    return load_config(ROOT / "tests/configs/tiny.yaml", base)


def test_centralized_loss_decreases_and_writes_run_folder(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 3})
    run = tmp_path / "run"
    run.mkdir()
    from fedmpi.cli.train import _evaluator_factory

    run_job(cfg, None, run, log=quiet, evaluator_factory=_evaluator_factory(cfg))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all(r["images_per_s"] > 0 for r in epochs)
    # 120 steps on real images: the epsilon loss must fall well below its start
    assert steps[-1]["loss"] < 0.6 * steps[0]["loss"], (steps[0], steps[-1])
    assert RunFolder(run).latest_complete() == 3
    ckpt = torch.load(RunFolder(run).checkpoint_dir(3) / "model.pt", weights_only=True)
    assert {"model", "optimizer", "step", "rng", "config", "epoch"} <= set(ckpt)
    assert ckpt["step"] == 3 * 40 and ckpt["config"]["train"]["epochs"] == 3
    png = run / "samples" / "round_0003.png"
    assert png.stat().st_size > 500


def test_sgd_with_momentum_and_l1_loss_train(tmp_path):
    """train.optimizer=sgd (the reference's other optimizer choice) with momentum, and the
    L1 loss: the job trains with them (the loss falls) and checkpoints SGD's momentum."""
    cfg = tiny_cfg(
        tmp_path,
        **{
            "train.epochs": 3,
            "train.optimizer": "sgd",
            "train.momentum": 0.9,
            "train.lr": 0.05,
            "diffusion.loss": "l1",
        },
    )
    run = tmp_path / "run"
    run.mkdir()
    run_job(cfg, None, run, log=quiet)
    steps = [
        json.loads(l)
        for l in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(l)["kind"] == "step"
    ]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"], (steps[0], steps[-1])
    opt = torch.load(RunFolder(run).checkpoint_dir(3) / "model.pt", weights_only=True)["optimizer"]
    assert opt["param_groups"][0]["momentum"] == 0.9 and "exp_avg" not in opt["state"][0]
    assert "momentum_buffer" in opt["state"][0]
    with pytest.raises(Exception, match="'train.optimizer' is 'adamw'"):
        tiny_cfg(tmp_path, **{"train.optimizer": "adamw"})


def test_centralized_preempted_then_resumed_matches_uninterrupted(tmp_path):
    """SIGUSR1 (what slurm/run.sh forwards at the time limit) during epoch 2 of a run
    that checkpoints every 2 epochs: epoch 2 is abandoned, epoch 1 is checkpointed from the
    copy kept in memory, Preempted (exit 75); the resumed run ends bit-identical to an
    uninterrupted one, fp16's loss scale included."""
    full, part = tmp_path / "full", tmp_path / "part"
    for d in (full, part):
        d.mkdir()
    # fp16 (CPU autocast + GradScaler): the loss scale is part of the state to resume
    opts = {
        "eval.grid": 0,
        "train.epochs": 3,
        "checkpoint.every": 2,
        "data.train_subset": 80,
        "train.precision": "fp16",
    }
    run_job(tiny_cfg(tmp_path, **opts), None, full, log=quiet)
    assert (
        RunFolder(full).latest_complete() == 3
        and not (RunFolder(full).checkpoint_dir(1) / "COMPLETE").exists()
    )
    lines = []

    def stop_after_epoch_1(msg):  # the signal lands before epoch 2's first step ends
        lines.append(msg)
        if msg.startswith("[epoch 1/3]"):
            os.kill(os.getpid(), signal.SIGUSR1)

    handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stop:
        run_job(tiny_cfg(tmp_path, **opts), None, part, log=stop_after_epoch_1)
    assert stop.value.exit_code == 75 and signal.getsignal(signal.SIGUSR1) == handler
    assert RunFolder(part).latest_complete() == 1
    assert any(
        l.startswith("preempted (SIGUSR1): epoch 2 abandoned; checkpoint of epoch 1 kept")
        for l in lines
    ), lines
    run_job(tiny_cfg(tmp_path, **opts), None, part, resume=True, log=lines.append)
    assert any(l.startswith("resume: continuing after epoch 1 (checkpoint") for l in lines), lines
    a = torch.load(RunFolder(full).checkpoint_dir(3) / "model.pt", weights_only=True)
    b = torch.load(RunFolder(part).checkpoint_dir(3) / "model.pt", weights_only=True)
    assert a["step"] == b["step"] == 3 * 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"]["_growth_tracker"] > 5 and a["scaler"] == b["scaler"]  # scale, tracker
    epochs = [
        json.loads(l)["epoch"]
        for l in (part / "metrics.jsonl").read_text().splitlines()
        if json.loads(l)["kind"] == "epoch"
    ]
    assert epochs == [1, 2, 3]  # the abandoned epoch's step lines dropped on resume


def test_cli_writes_resolved_config(tmp_path):
    run = tmp_path / "cli"
    code = main(
        [
            "--config",
            str(ROOT / "tests/configs/tiny.yaml"),
            "--run-dir",
            str(run),
            "--train.max_steps=3",
            "--train.lr=3e-4",
            "--eval.extractor=none",
            "--eval.grid=0",
        ]
    )
    assert code == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(3e-4) and saved["train"]["max_steps"] == 3


def test_cli_missing_data_is_a_clear_error(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmpi.train",
            "--config",
            "tests/configs/tiny.yaml",
            "--run-dir",
            str(tmp_path / "r"),
            f"--data.root={tmp_path}/nowhere",
            "--data.download=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "dataset-fashion-mnist" in res.stdout + res.stderr


# ---------------------------------------------------------------- short-run recipe


def test_lr_schedule_warmup_and_cosine():
    from fedmpi.train.recipe import LRSchedule

    s = LRSchedule(1e-3, warmup=4, kind="cosine", total=104, lr_min=1e-4)
    assert [s(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert s(4) == pytest.approx(1e-3)  # the peak, then a half cosine
    assert s(54) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert s(104) == pytest.approx(1e-4) and s(500) == pytest.approx(1e-4)
    assert all(s(i) >= s(i + 1) for i in range(4, 110))
    flat = LRSchedule(1e-3, warmup=0, kind="constant", total=104)
    assert not flat.active and flat(0) == flat(103) == 1e-3
    assert LRSchedule(1e-3, warmup=2).active and LRSchedule(1e-3, warmup=2)(50) == 1e-3


def test_thread_sharing_and_all_cores_for_the_waiting_federator(monkeypatch):
    import os

    from fedmpi.runtime import all_cpu_threads, share_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    before = torch.get_num_threads()
    try:
        share_cpu_threads(4)  # 8 cores, 4 ranks on the node
        assert torch.get_num_threads() == 2
        with all_cpu_threads():
            assert torch.get_num_threads() == 8
        assert torch.get_num_threads() == 2  # given back
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting decides
        torch.set_num_threads(3)
        share_cpu_threads(4)
        with all_cpu_threads():
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_ema_math_state_and_swap():
    from fedmpi.model.regions import bind_flat
    from fedmpi.model.unet import UNet
    from fedmpi.train.recipe import EMA

    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    bind_flat(model)
    p = next(model.parameters())
    start = p.detach().clone()
    ema = EMA(model, 0.9)
    # warm-up: d_n = min(decay, (1 + n) / (10 + n)): 0.1, 2/11, ... then 0.9
    assert ema.decay_for(1) == pytest.approx(0.1)
    assert ema.decay_for(2) == pytest.approx(0.1 * 2 / 11)
    with torch.no_grad():
        p.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow[_name(model, p)], 0.1 * start + 0.9 * (start + 1))
    # one update standing for 3 steps = 3 updates with the same weights
    twin = EMA(model, 0.9)
    twin.load_state_dict(ema.state_dict())
    ema.update(model, steps=3)
    for _ in range(3):
        twin.update(model)
    assert ema.updates == twin.updates == 4
    assert all(torch.allclose(ema.shadow[k], twin.shadow[k]) for k in ema.shadow)
    # far past the warm-up the decay is the configured one
    ema.updates = 1000
    assert ema.decay_for(1) == pytest.approx(0.9)
    # applied(): the averaged weights inside, the raw ones after, in the same storage
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ptr = p.data_ptr()
    with ema.applied(model):
        assert torch.equal(p, ema.shadow[_name(model, p)]) and p.data_ptr() == ptr
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    # mark / rollback (an abandoned round)
    ema.mark()
    before = {k: v.clone() for k, v in ema.shadow.items()}
    ema.update(model, steps=5)
    ema.rollback()
    assert ema.updates == 1000 and all(torch.equal(before[k], ema.shadow[k]) for k in before)
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(model, 1.0)


def test_ema_follows_the_model_to_the_training_device():
    """An EMA made while the model is still on the host moves with it to the trainer's
    device (the meta device stands in for a GPU): its update would otherwise mix devices."""
    import numpy as np

    from fedmpi.model.diffusion import Diffusion
    from fedmpi.model.unet import UNet
    from fedmpi.train.recipe import EMA
    from fedmpi.train.trainer import LocalTrainer

    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    ema = EMA(model, 0.9)
    ema.mark()
    trainer = LocalTrainer(
        model,
        Diffusion(timesteps=10),
        np.zeros((4, 1, 8, 8), np.uint8),
        2,
        1e-3,
        torch.device("meta"),
        ema=ema,
    )
    assert trainer.ema is ema
    assert {t.device.type for t in [*ema.shadow.values(), *ema._mark.values()]} == {"meta"}
    ema.update(model)  # same device as the weights: no error


def _name(model, param):
    return next(n for n, q in model.named_parameters() if q is param)


def test_centralized_ema_and_schedule_resume_bit_exact(tmp_path):
    over = {
        "eval.grid": 0,
        "train.ema_decay": 0.95,
        "train.lr_schedule": "cosine",
        "train.warmup_steps": 10,
        "train.lr_min": 1e-5,
    }
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    run_job(tiny_cfg(tmp_path, **over), None, full, log=quiet)
    # stop after epoch 1 by keeping only its checkpoint (a copy of the same run: same
    # config, same seed), then resume with the same config
    import shutil

    shutil.copytree(full, part)
    shutil.rmtree(RunFolder(part).checkpoint_dir(2))
    run_job(tiny_cfg(tmp_path, **over), None, part, resume=True, log=quiet)
    a = torch.load(RunFolder(full).checkpoint_dir(2) / "model.pt", weights_only=True)
    b = torch.load(RunFolder(part).checkpoint_dir(2) / "model.pt", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 80
    for key in ("model", "ema"):
        x, y = (a[key], b[key]) if key == "model" else (a[key]["shadow"], b[key]["shadow"])
        assert all(torch.equal(x[k], y[k]) for k in x), key
    assert any(not torch.equal(a["model"][k], a["ema"]["shadow"][k]) for k in a["model"])


def test_print_config_lists_every_key_and_loads_back(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmpi.train",
            "--print-config",
            "--config",
            "tests/configs/tiny.yaml",
            "--train.ema_decay=0.999",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    text = res.stdout
    (tmp_path / "printed.yaml").write_text(text)
    expected = load_config(ROOT / "tests/configs/tiny.yaml", ["--train.ema_decay=0.999"])
    assert load_config(tmp_path / "printed.yaml") == expected  # the resolved config itself
    for section, part in expected.to_dict().items():
        for key in part:
            assert f"\n  {key}: " in text, f"{section}.{key} missing"
    # the schema's comments come along: choices, ranges and meanings
    assert "  lr_schedule: constant  # constant | cosine" in text
    assert "  ema_decay: 0.999  # in [0, 1)" in text
    assert "# EMA of the weights for sampling" in text
    help_text = subprocess.run(
        [sys.executable, "-m", "fedmpi.train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--print-config" in help_text and "--section.key=value" in help_text
    bad = subprocess.run(
        [sys.executable, "-m", "fedmpi.train", "--print-config", "--train.lr_min=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "train.lr_min" in bad.stderr


def test_split_report_numbers_clients_from_one():
    import numpy as np

    from fedmpi.data.partition import client_table, split_table

    rows = client_table(np.arange(12) % 3, [np.arange(6), np.arange(6, 12)], 3)
    assert [r["client"] for r in rows] == [1, 2]
    assert [l.split()[0] for l in split_table(rows).splitlines()[2:4]] == ["1", "2"]
