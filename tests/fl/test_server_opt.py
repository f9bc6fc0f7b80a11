"""Server optimizers (fedmpi.fl.server_opt) against the formulas of Reddi et al. (2021),
computed independently in float64 numpy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.errors import ConfigError
from fedmpi.fl.server_opt import KINDS, ServerOptimizer

HYPER = {"lr": 0.3, "momentum": 0.8, "beta1": 0.85, "beta2": 0.95, "tau": 1e-2}


def reference(kind, xs, avgs, lr, momentum, beta1, beta2, tau):
    """The new global weights of each round, in float64, from the paper's Algorithm 2.
    `avgs[r]` is round r's average as an offset from that round's start: avg = x + avgs[r]."""
    x = np.asarray(xs, np.float64)
    m, v, out = np.zeros_like(x), np.zeros_like(x), []
    for offset in avgs:
        delta = np.asarray(offset, np.float64)
        if kind == "fedavgm":
            m = momentum * m + delta
            x = x + lr * m
        else:
            m = beta1 * m + (1 - beta1) * delta
            if kind == "fedadam":
                v = beta2 * v + (1 - beta2) * delta**2
            else:
                v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
            x = x + lr * m / (np.sqrt(v) + tau)
        out.append(x)
    return out


def offsets(rounds, n, seed=0):
    rng = np.random.default_rng(seed)
    # scales that vary by round so yogi's sign(v - delta^2) takes both values
    return [rng.normal(0, s, n) for s in rng.uniform(0.01, 0.5, rounds)]


def run_rounds(opt, x0, offs, region="body"):
    """Round by round: avg = x + offset, then the server step; returns each round's x."""
    x, out = torch.tensor(x0, dtype=torch.float32), []
    for offset in offs:
        before = x.clone()
        avg = before + torch.tensor(offset, dtype=torch.float32)
        opt.step(region, before, avg)
        x = avg
        out.append(x.clone())
    return out


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_steps_follow_the_formulas(kind):
    x0 = np.random.default_rng(1).normal(0, 1, 257).astype(np.float32)
    offs = offsets(6, 257)
    got = run_rounds(ServerOptimizer(kind, **HYPER), x0, offs)
    # the reference starts each round from the float32 weights the optimizer produced
    xs = [x0, *[g.numpy() for g in got[:-1]]]
    avgs = [(xs[r].astype(np.float32) + offs[r].astype(np.float32)) - xs[r] for r in range(6)]
    want = reference(kind, x0, avgs, **HYPER)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[-1].numpy(), xs[-1] + avgs[-1])  # not plain FedAvg


def test_fedyogi_differs_from_fedadam():
    x0 = np.zeros(64, np.float32)
    offs = offsets(5, 64, seed=3)
    adam = run_rounds(ServerOptimizer("fedadam", **HYPER), x0, offs)[-1]
    yogi = run_rounds(ServerOptimizer("fedyogi", **HYPER), x0, offs)[-1]
    assert not torch.allclose(adam, yogi)


def test_none_leaves_the_average_bit_for_bit():
    opt = ServerOptimizer("none", **HYPER)
    assert not opt.active and all(ServerOptimizer(k).active for k in KINDS[1:])
    before = torch.randn(100)
    avg = before + torch.randn(100) * 0.1
    kept = avg.clone()
    opt.step("body", before, avg)
    assert torch.equal(avg, kept)
    assert opt.state_dict()["regions"] == {}


def test_fedavgm_without_momentum_at_lr_1_is_fedavg():
    before = torch.randn(50)
    avg = before + torch.randn(50)
    want = avg.clone()
    ServerOptimizer("fedavgm", lr=1.0, momentum=0.0).step("body", before, avg)
    torch.testing.assert_close(avg, want, rtol=0, atol=1e-6)


def test_regions_keep_separate_state():
    x0 = np.zeros(10, np.float32)
    offs = offsets(3, 10, seed=5)
    together = ServerOptimizer("fedadam", **HYPER)
    alone = ServerOptimizer("fedadam", **HYPER)
    run_rounds(together, x0, offsets(3, 10, seed=6), region="head")
    a = run_rounds(together, x0, offs, region="body")
    b = run_rounds(alone, x0, offs, region="body")
    assert torch.equal(a[-1], b[-1])
    assert set(together.state_dict()["regions"]) == {"head", "body"}


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_state_dict_round_trip_continues_identically(kind, tmp_path):
    x0 = np.random.default_rng(2).normal(0, 1, 33).astype(np.float32)
    offs = offsets(6, 33, seed=4)
    straight = run_rounds(ServerOptimizer(kind, **HYPER), x0, offs)

    first = ServerOptimizer(kind, **HYPER)
    half = run_rounds(first, x0, offs[:3])
    torch.save(first.state_dict(), tmp_path / "server.pt")
    run_rounds(first, x0, offs[:2])  # later steps do not change the saved state
    resumed = ServerOptimizer(kind, **HYPER)
    resumed.load_state_dict(torch.load(tmp_path / "server.pt"))
    rest = run_rounds(resumed, half[-1].numpy(), offs[3:])
    for a, b in zip(straight[3:], rest):
        assert torch.equal(a, b)


def test_loading_another_kind_is_refused():
    opt = ServerOptimizer("fedadam")
    opt.step("body", torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="fedadam"):
        ServerOptimizer("fedyogi").load_state_dict(opt.state_dict())


def test_shape_changes_and_bad_settings_are_refused():
    opt = ServerOptimizer("fedavgm")
    opt.step("body", torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        opt.step("body", torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="shape"):
        opt.step("head", torch.zeros(4), torch.ones(5))
    for bad in ({"kind": "sgd"}, {"lr": 0}, {"beta2": 1.0}, {"momentum": -0.1}, {"tau": 0}):
        with pytest.raises(ValueError):
            ServerOptimizer(**{"kind": "fedadam", **bad})


def test_from_config_reads_the_fed_fields_with_defaults():
    cfg = SimpleNamespace(server_opt="fedyogi", server_lr=0.01, server_beta2=0.9)
    opt = ServerOptimizer.from_config(cfg)
    assert (opt.kind, opt.lr, opt.beta2) == ("fedyogi", 0.01, 0.9)
    assert (opt.beta1, opt.tau, opt.momentum) == (0.9, 1e-3, 0.9)
    assert not ServerOptimizer.from_config(SimpleNamespace()).active
    with pytest.raises(ConfigError, match="server"):
        ServerOptimizer.from_config(SimpleNamespace(server_opt="adamw"))


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_server_steps_approach_a_quadratic_optimum(kind):
    """Clients that each take one gradient step on f(x) = |x - x*|^2 / 2 report
    avg = x - g (x - x*) (noisy): the server's steps move x towards x*."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(200, generator=gen)
    x = torch.zeros(200)
    opt = ServerOptimizer(kind, lr=0.1 if kind != "fedavgm" else 0.5, momentum=0.5)
    start = float(torch.linalg.vector_norm(x - target))
    for _ in range(60):
        avg = x - 0.2 * (x - target) + 0.01 * torch.randn(200, generator=gen)
        opt.step("body", x, avg)
        x = avg
    assert float(torch.linalg.vector_norm(x - target)) < 0.2 * start
