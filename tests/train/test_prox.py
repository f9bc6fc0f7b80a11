"""FedProx's proximal term in LocalTrainer (`prox_mu`) and `use_images`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi.config.schema import ModelCfg
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.unet import build_unet
from fedmpi.train.trainer import LocalTrainer

TINY = ModelCfg(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
CPU = torch.device("cpu")


def images(seed=0, n=12):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)


def trainer(data=None, precision="fp32", lr=1e-3, **kw) -> LocalTrainer:
    """A tiny trainer whose model starts from the same weights every time."""
    torch.manual_seed(0)
    model = build_unet(TINY, channels=1, image_size=8)
    t = LocalTrainer(
        model, Diffusion(timesteps=10), images() if data is None else data, 4, lr, CPU, **kw
    )
    t.set_speed(precision)
    return t


def weights(t):
    return [p.detach().clone() for p in t.model.parameters()]


def grads(t):
    return [p.grad for p in t.model.parameters()]


def same(a, b) -> bool:
    """Bit for bit equal lists of tensors."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def distance(a, b):
    return float(sum(torch.sum((x - y) ** 2) for x, y in zip(a, b)) ** 0.5)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_mu_zero_is_bit_identical_to_no_prox(precision, monkeypatch):
    plain, zero = trainer(precision=precision), trainer(precision=precision, prox_mu=0.0)
    for extra in ("_mark_anchor", "_add_prox"):  # mu = 0: not even a copy of the weights
        monkeypatch.setattr(zero, extra, lambda: pytest.fail("FedProx work with mu = 0"))
    start = weights(plain)
    for t in (plain, zero):
        t.run(seed=3, steps=4)
        t.run(seed=4, steps=2)
    assert distance(weights(plain), start) > 0
    assert same(weights(plain), weights(zero)) and same(grads(plain), grads(zero))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_prox_adds_mu_times_the_drift_to_the_gradient(precision):
    """Step 1 starts at the anchor, so both trainers reach the same w_1; step 2's gradient
    then differs by exactly mu (w_1 - w_0) (fp16: both unscaled, by GradScaler.step at
    the latest)."""
    mu = 0.7
    plain = trainer(precision=precision)
    prox = trainer(precision=precision, prox_mu=mu)
    w0, w1 = weights(prox), {}
    for name, t in (("plain", plain), ("prox", prox)):
        keep = lambda step, loss, n=name, t=t: w1.setdefault(n, weights(t))
        t.run(seed=5, steps=2, on_step=keep)  # w1: the weights after the first step
    assert same(w1["plain"], w1["prox"])
    assert distance(w1["prox"], w0) > 0  # the first step was taken
    for g, h, a, b in zip(grads(plain), grads(prox), w1["prox"], w0):
        torch.testing.assert_close(h, g + mu * (a - b), rtol=1e-6, atol=1e-8)


def test_anchor_is_taken_again_at_each_run_start():
    """A second run pulls towards the weights it starts from: its first gradient is the
    plain one at those weights, bit for bit."""
    prox = trainer(prox_mu=5.0)
    prox.run(seed=1, steps=3)
    anchors = list(prox._anchors.values())
    prox.reset_optimizer()
    start = prox.model.state_dict()
    plain = trainer()
    plain.model.load_state_dict(start)
    for t in (prox, plain):
        t.run(seed=2, steps=1)
    assert same(grads(prox), grads(plain))
    assert all(a is b for a, b in zip(anchors, prox._anchors.values()))  # buffers reused


def test_large_mu_keeps_the_weights_near_the_start():
    drift = {}
    for mu in (0.0, 1.0, 100.0):
        t = trainer(lr=1e-2, prox_mu=mu)
        start = weights(t)
        t.run(seed=7, steps=25)
        drift[mu] = distance(weights(t), start)
    assert drift[100.0] < drift[1.0] < drift[0.0]
    assert drift[100.0] < 0.5 * drift[0.0]


def test_negative_mu_is_refused():
    with pytest.raises(ValueError, match="prox_mu"):
        trainer(prox_mu=-0.1)


def test_use_images_switches_the_training_set():
    a, b = images(seed=0), images(seed=1, n=8)
    switched = trainer(data=a)
    switched.use_images(b)
    assert switched.num_samples == 8 and switched.images.dtype == torch.uint8
    assert switched.images.device == CPU
    fresh_b, fresh_a = trainer(data=b), trainer(data=a)
    for t in (switched, fresh_b, fresh_a):
        t.run(seed=9, steps=3)
    assert same(weights(switched), weights(fresh_b))
    assert distance(weights(switched), weights(fresh_a)) > 0
    with pytest.raises(ValueError, match="no training images"):
        switched.use_images(np.zeros((0, 1, 8, 8), np.uint8))
