"""Mixed precision and torch.compile give the fp32 eager loss curve within a tolerance
(CPU: bf16 autocast, compiled UNet); weights and optimizer state stay float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi.config import load_config
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.unet import UNet
from fedmpi.train.trainer import LocalTrainer

STEPS = 30


def _curve(precision="fp32", compile=False):
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    from fedmpi.data import load_arrays

    cfg = load_config("tests/configs/tiny.yaml")
    images, _ = load_arrays(cfg.data, "train")
    t = LocalTrainer(
        model, Diffusion.from_config(cfg.diffusion), images[:256], 16, 2e-3, torch.device("cpu")
    )
    t.set_speed(precision, compile)
    losses = []
    t.run(seed=3, steps=STEPS, on_step=lambda i, loss: losses.append(float(loss)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(
        v.dtype == torch.float32
        for s in t.optimizer.state.values()
        for k, v in s.items()
        if k != "step"
    )
    return np.array(losses)


def _close(a, b):
    # the curve, smoothed over windows of 10 steps: same descent within 10%
    wa, wb = a.reshape(-1, 10).mean(1), b.reshape(-1, 10).mean(1)
    return np.allclose(wa, wb, rtol=0.10), (wa, wb)


@pytest.fixture(scope="module")
def fp32_curve():
    """The fp32 eager reference curve both comparisons use (computed once)."""
    curve = _curve()
    curve.setflags(write=False)
    return curve


def test_bf16_follows_the_fp32_loss_curve(fp32_curve):
    ref, bf16 = fp32_curve, _curve("bf16")
    ok, detail = _close(ref, bf16)
    assert ok, detail
    assert not np.array_equal(ref, bf16)  # autocast really ran in bf16


def test_compiled_follows_the_eager_loss_curve(fp32_curve):
    ok, detail = _close(fp32_curve, _curve(compile=True))
    assert ok, detail


def test_compiled_net_sees_only_full_batches(monkeypatch):
    """An epoch's last, smaller batch goes through the eager model, so a compiled UNet
    is compiled (and CUDA-graph captured) for one batch shape only; each training call of
    a CUDA-graph net begins a graph step (after a sampler has marked steps, torch no
    longer tells training steps apart by itself)."""
    from fedmpi.model.unet import _CUDAGRAPH_MODULES

    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    images = np.random.default_rng(0).integers(0, 255, (10, 1, 8, 8), dtype=np.uint8)
    t = LocalTrainer(model, Diffusion(timesteps=10), images, 4, 1e-3, torch.device("cpu"))
    seen = {"net": [], "model": []}
    monkeypatch.setattr(
        torch.compiler, "cudagraph_mark_step_begin", lambda: seen["net"].append("step")
    )
    t.net = _Counting(model, None)
    _CUDAGRAPH_MODULES.add(t.net)  # as compile_unet marks its reduce-overhead wrappers
    t.net.register_forward_hook(lambda m, args, out: seen["net"].append(len(args[0])))
    model.register_forward_hook(lambda m, args, out: seen["model"].append(len(args[0])))
    t.run(seed=0, epochs=2)
    assert seen["net"] == ["step", 4] * 4
    assert seen["model"] == [4, 4, 2, 4, 4, 2]  # the net's calls reach it too


def test_bad_precision_is_refused():
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    t = LocalTrainer(
        model,
        Diffusion(timesteps=10),
        np.zeros((4, 1, 28, 28), np.uint8),
        2,
        1e-3,
        torch.device("cpu"),
    )
    with pytest.raises(ValueError, match="precision"):
        t.set_speed("fp8")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_grad_clip_bounds_every_step_gradient(precision):
    """train.grad_clip: the gradient Adam sees has L2 norm <= the bound (fp16: after
    unscaling), and the unclipped gradient of the same step is larger."""
    images = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)

    def step_grad_norm(clip):
        torch.manual_seed(0)
        model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
        t = LocalTrainer(
            model, Diffusion(timesteps=10), images, 8, 1e-3, torch.device("cpu"), grad_clip=clip
        )
        t.set_speed(precision)
        t.run(seed=1, steps=1)  # the gradients stay on the parameters after the step
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
        )
        return float(norm)

    if precision == "fp32":  # (fp16 leaves unclipped gradients multiplied by the scale)
        assert step_grad_norm(0.0) > 0.05
    assert 0.009 < step_grad_norm(0.01) <= 0.01 * (1 + 1e-5)


def _samples(precision):
    import dataclasses

    from fedmpi.eval.evaluate import Evaluator

    cfg = load_config(
        "tests/configs/tiny.yaml",
        ["--eval.extractor=none", "--eval.ddim_steps=5", f"--train.precision={precision}"],
    )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=8, dim_mults=(1, 2)))
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    ev = Evaluator(cfg, None, "unused", torch.device("cpu"))
    return torch.cat(list(ev._generate(model, 8, seed=5)))


def test_sampling_runs_under_the_training_precision():
    ref, bf16 = _samples("fp32"), _samples("bf16")
    assert ref.dtype == bf16.dtype == torch.float32
    assert torch.isfinite(bf16).all()
    assert not torch.equal(ref, bf16)  # the UNet really ran in bf16
    assert (ref - bf16).abs().mean() < 0.05, (ref - bf16).abs().mean()


def test_channels_last_activations_give_the_same_output():
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,))
    layouts = []
    conv = model.encoder.levels[0].block1.ds_conv
    conv.register_forward_hook(
        lambda m, i, o: layouts.append(
            not i[0].is_contiguous() and i[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    ref = model(x, t)
    trainer = LocalTrainer(
        model,
        Diffusion(timesteps=10),
        np.zeros((4, 1, 28, 28), np.uint8),
        2,
        1e-3,
        torch.device("cpu"),
    )
    trainer.set_speed("fp32", channels_last=True)
    out = model(x, t)
    assert layouts == [False, True]  # NHWC activations only after set_speed(channels_last=True)
    assert torch.allclose(ref, out, atol=1e-5), (ref - out).abs().max()


def test_compile_options_follow_mode_and_channels_last():
    """compile_unet hands torch.compile its mode's inductor options, plus the forced
    channels-last layout when the model computes NHWC (inductor's heuristic would keep
    this UNet NCHW: a transpose around every convolution on a GPU)."""
    from fedmpi.model.unet import compile_unet

    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    plain = compile_unet(model).get_compiler_config()
    graphs = compile_unet(model, "reduce-overhead").get_compiler_config()
    model.channels_last = True
    nhwc = compile_unet(model, "reduce-overhead").get_compiler_config()
    assert not plain["triton.cudagraphs"] and graphs["triton.cudagraphs"]
    assert nhwc["triton.cudagraphs"] and nhwc["force_layout_optimization"]
    assert not plain["force_layout_optimization"] and not graphs["force_layout_optimization"]


def test_cuda_graph_compile_mode_marks_the_model_for_samplers(monkeypatch):
    """train.compile_mode: reduce-overhead (and max-autotune) compile the UNet with CUDA
    graphs; the samplers then begin a new graph step before each call (and only for such a model)."""
    from fedmpi.config import ConfigError
    from fedmpi.model.unet import _CUDAGRAPH_MODULES, compile_unet, cudagraph_step

    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    graphs, plain = compile_unet(model, "reduce-overhead"), compile_unet(model)
    for net in (graphs, plain, model):
        cudagraph_step(net)
    assert steps == [1]
    d = Diffusion(timesteps=10)
    d.sample_ddim(graphs_free := _Counting(model, steps), (1, 1, 28, 28), "cpu", steps=3)
    assert steps == [1]  # an uncompiled model: no graph steps
    _CUDAGRAPH_MODULES.add(graphs_free)  # as compile_unet marks its reduce-overhead wrappers
    d.sample_ddim(graphs_free, (1, 1, 28, 28), "cpu", steps=3)
    assert steps == [1, 1, 1, 1] and graphs_free.calls == 6  # one step before each call
    cudagraph_step(compile_unet(model, "max-autotune"))  # CUDA graphs too
    assert steps == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="compile mode"):
        compile_unet(model, "fast")
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config("tests/configs/tiny.yaml", {"train.compile_mode": "fast"})
    with pytest.raises(ConfigError, match="set --train.compile=true"):  # silently unused
        load_config("tests/configs/tiny.yaml", {"train.compile_mode": "reduce-overhead"})
    assert load_config(
        "tests/configs/tiny.yaml", {"train.compile_mode": "reduce-overhead", "train.compile": True}
    ).train.compile


class _Counting(torch.nn.Module):
    """The model, counting its calls (the test marks it as a CUDA-graph module)."""

    def __init__(self, model, steps):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x, t):
        self.calls += 1
        return self.model(x, t)
