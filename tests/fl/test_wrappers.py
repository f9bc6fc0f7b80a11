"""The strategy wrappers of virtual clients without a transport: DP-FedAvg's client
clipping and fixed denominator (`fedmpi.fl.privacy.DifferentialPrivacy`), FedProx and
the server optimizers (`fedmpi.fl.strategy`), and their order in `make_strategy`.

As in tests/fl/test_strategies.py every rank is simulated by its own `RegionBuffers`;
the SUM Reduce adds the client ranks' buffers to the federator's summand, then the
federator's `finish` runs. The federator saves each region's weights first when the
strategy `needs_before`, as `Aggregator._reduce` does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmpi.config import load_config
from fedmpi.fl.aggregate import make_strategy
from fedmpi.fl.population import Population
from fedmpi.fl.privacy import DifferentialPrivacy, epsilon
from fedmpi.fl.server_opt import ServerOptimizer
from fedmpi.fl.strategy import FedProx, PlainFedAvg, RegionBuffers, RegionRound, ServerOptimized

SIZES = {"encoder": 300, "bottleneck": 7, "decoder": 500}
ROUND = 3


def buffers(values: dict) -> RegionBuffers:
    """One rank's buffers holding these weights (numpy float32 per region)."""
    b = RegionBuffers.zeros_like_sizes(SIZES)
    for r, v in values.items():
        b.flat[r].copy_(torch.from_numpy(np.asarray(v, np.float32)))
    return b


def exchange(strategy, fed: RegionBuffers, slots: list, slot_sizes: list, regions=SIZES):
    """One round's Reduce and finish of these regions: `slots[s]` holds slot s's weights
    (its clients' mean), `slot_sizes[s]` their summed FedAvg size (every slot uploads
    every region here; each slot uses the same strategy object, which keeps no state
    for uploads). Returns finish's answers."""
    out = {}
    for region in regions:
        job = RegionRound(region, ROUND, list(range(len(slots))), list(slot_sizes))
        uploads = [strategy.upload(b, job, s).clone() for s, b in enumerate(slots)]
        if strategy.needs_before:
            fed.save_before(region)
        dst, own = strategy.receive(fed, job)
        acc = (dst if own is None else own).clone()
        for u in uploads:
            acc += u
        dst.copy_(acc)
        out[region] = strategy.finish(fed, job, dst)
    return out


def weights(b: RegionBuffers) -> dict:
    return {r: t.numpy().astype(np.float64) for r, t in b.flat.items()}


def setup(num_clients, seed=0, scale=1.0, start_scale=0.1):
    """A common start and clients far outside a unit clip ball around it (float32)."""
    rng = np.random.default_rng(seed)
    start = {r: rng.normal(0, start_scale, n).astype(np.float32) for r, n in SIZES.items()}
    thetas = [
        {r: (start[r] + rng.normal(0, scale, n)).astype(np.float32) for r, n in SIZES.items()}
        for _ in range(num_clients)
    ]
    return start, thetas


def tensors(values: dict) -> dict:
    return {r: torch.from_numpy(np.array(v, np.float32)) for r, v in values.items()}


def client_models(dp, start, thetas):
    """Each client's weights after its local training and DP's client step (clipped)."""
    out = []
    for theta in thetas:
        b = buffers(theta)
        dp.prepare_client(b, sorted(SIZES), tensors(start))
        out.append({r: t.numpy().copy() for r, t in b.flat.items()})
    return out


def slot_mean(models: list) -> dict:
    """A rank's mean of its clients (uniform: DP's sizes are all 1), in float32."""
    return {r: np.mean([m[r] for m in models], axis=0).astype(np.float32) for r in SIZES}


# --- DP: the fixed denominator -----------------------------------------------------------


@pytest.mark.parametrize("hosts", [[0, 1, 2], [0, 0, 1, 1, 1]])
def test_fixed_denominator_divides_the_clipped_sum_by_d(hosts):
    """m clients (one or several per rank) upload start + clip(delta_k); the federator
    ends at start + sum_k clip(delta_k) / D, not / m."""
    m, D, C = len(hosts), 7.5, 1.0
    dp = DifferentialPrivacy(
        PlainFedAvg(), C, 1e-9, "central", rng=np.random.default_rng(1), denominator=D
    )
    assert dp.needs_before
    start, thetas = setup(m, seed=m)
    clipped = client_models(dp, start, thetas)
    num_slots = max(hosts) + 1
    slots = [
        buffers(slot_mean([clipped[k] for k in range(m) if hosts[k] == s]))
        for s in range(num_slots)
    ]
    sizes = dp.fedavg_sizes([float(100 + k) for k in range(m)])  # every client counts 1
    slot_sizes = [sum(sizes[k] for k in range(m) if hosts[k] == s) for s in range(num_slots)]
    fed = buffers(start)
    exchange(dp, fed, slots, slot_sizes)
    got = weights(fed)
    for r in SIZES:
        deltas = [c[r].astype(np.float64) - start[r] for c in clipped]
        want = start[r] + np.sum(deltas, axis=0) / D
        np.testing.assert_allclose(got[r], want, rtol=0, atol=2e-6)
        by_m = start[r] + np.sum(deltas, axis=0) / m
        assert np.max(np.abs(got[r] - by_m)) > 1e-3  # the reporters' count is not used
    norms = [
        math.sqrt(sum(float(np.sum((c[r].astype(np.float64) - start[r]) ** 2)) for r in SIZES))
        for c in clipped
    ]
    assert all(n <= C * (1 + 1e-6) for n in norms) and min(norms) > 0.99 * C


def test_without_a_denominator_the_average_divides_by_m():
    m, C = 3, 1.0
    dp = DifferentialPrivacy(PlainFedAvg(), C, 1e-9, "central", rng=np.random.default_rng(2))
    assert not dp.needs_before and dp.denominator is None
    start, thetas = setup(m, seed=5)
    clipped = client_models(dp, start, thetas)
    fed = buffers(start)
    exchange(dp, fed, [buffers(c) for c in clipped], [1.0] * m)
    for r in SIZES:
        want = np.mean([c[r].astype(np.float64) for c in clipped], axis=0)
        np.testing.assert_allclose(weights(fed)[r], want, rtol=0, atol=2e-6)


def test_fixed_denominator_scales_the_noise_to_zc_over_d():
    """Clients that did not move: the result minus the start is the noise alone, std
    z C / D per coordinate (z C on the sum, then / D), whatever m."""
    m, D, C, z = 3, 12.0, 0.5, 2.0
    dp = DifferentialPrivacy(
        PlainFedAvg(), C, z, "central", rng=np.random.default_rng(3), denominator=D
    )
    start = {r: np.full(n, 0.25, np.float32) for r, n in SIZES.items()}
    fed = buffers(start)
    exchange(dp, fed, [buffers(start) for _ in range(m)], [1.0] * m)
    noise = np.concatenate([weights(fed)[r] - 0.25 for r in SIZES])
    n = noise.size
    want = z * C / D
    # the sample std of n normals is within ~ 4 / sqrt(2 n) of the truth
    assert abs(noise.std() / want - 1) < 4 / math.sqrt(2 * n), noise.std()
    assert abs(noise.mean()) < 4 * want / math.sqrt(n)


def test_from_config_takes_the_populations_rate_and_expected_count():
    cfg = load_config(None, {"privacy.dp": True, "privacy.noise_multiplier": 1.3})
    pop = Population.place([10] * 40, 4, 0.25, "poisson")
    dp = DifferentialPrivacy.from_config(PlainFedAvg(), cfg.privacy, pop)
    assert dp.sample_rate == 0.25 and dp.denominator == pytest.approx(10.0)
    assert dp.needs_before
    full = DifferentialPrivacy.from_config(PlainFedAvg(), cfg.privacy, Population.place([1] * 4, 4))
    assert full.sample_rate == 1.0 and full.denominator is None and not full.needs_before
    assert DifferentialPrivacy.from_config(PlainFedAvg(), cfg.privacy).denominator is None


def test_epsilon_uses_the_sample_rate():
    z, delta, q, rounds = 1.1, 1e-5, 0.25, 30
    dp = DifferentialPrivacy(PlainFedAvg(), 1.0, z, "central", delta, sample_rate=q, denominator=8)
    assert dp.epsilon(rounds) == pytest.approx(epsilon(z, rounds, delta, q), rel=1e-12)
    assert dp.epsilon(rounds) < epsilon(z, rounds, delta, 1.0)
    wrapped = ServerOptimized(FedProx(dp, 0.1), ServerOptimizer("fedadam"))
    assert wrapped.epsilon(rounds) == dp.epsilon(rounds)
    assert PlainFedAvg().epsilon(rounds) is None


# --- DP: clipping on the client ----------------------------------------------------------


def test_prepare_client_clips_one_norm_over_the_given_regions():
    """Updates of norm 3 (encoder) and 4 (decoder): one norm 5, scaled to C = 1 as a
    whole (0.6 and 0.8), not each to 1; a region not given (bottleneck) is untouched."""
    C = 1.0
    dp = DifferentialPrivacy(PlainFedAvg(), C, 1.0, "central", rng=np.random.default_rng(0))
    rng = np.random.default_rng(4)
    start = {r: rng.normal(0, 0.1, n).astype(np.float32) for r, n in SIZES.items()}
    theta = {}
    for r, norm in (("encoder", 3.0), ("decoder", 4.0), ("bottleneck", 50.0)):
        d = rng.normal(0, 1, SIZES[r])
        theta[r] = (start[r] + d * norm / np.linalg.norm(d)).astype(np.float32)
    b = buffers(theta)
    stats = dp.prepare_client(b, ["decoder", "encoder"], tensors(start))
    after = weights(b)
    upd = {r: float(np.linalg.norm(after[r] - start[r])) for r in SIZES}
    assert upd["encoder"] == pytest.approx(0.6, rel=1e-4)
    assert upd["decoder"] == pytest.approx(0.8, rel=1e-4)
    assert math.hypot(upd["encoder"], upd["decoder"]) <= C * (1 + 1e-6)
    assert np.array_equal(after["bottleneck"], theta["bottleneck"].astype(np.float64))
    assert stats["dp_update_norm"] == pytest.approx(5.0, rel=1e-5)
    assert stats["dp_clipped_norm"] <= C


def test_prepare_client_leaves_a_small_update_and_needs_the_start():
    dp = DifferentialPrivacy(PlainFedAvg(), 10.0, 1.0, "central", rng=np.random.default_rng(0))
    start, (theta,) = setup(1, seed=8, scale=0.01)
    b = buffers(theta)
    stats = dp.prepare_client(b, sorted(SIZES), tensors(start))
    assert stats["dp_update_norm"] == stats["dp_clipped_norm"] < 10.0
    for r in SIZES:  # start + (theta - start) in float32: theta up to rounding
        np.testing.assert_allclose(weights(b)[r], theta[r], rtol=0, atol=1e-7)
    assert dp.prepare_client(buffers(theta), [], None) == {}  # uploads nothing: no clip
    with pytest.raises(RuntimeError, match="start"):
        dp.prepare_client(buffers(theta), ["encoder"], None)


# --- server optimizers -------------------------------------------------------------------


def run_rounds(strategy, rounds=2, seed=0, start_scale=0.1, scale=0.05, offset=0.0):
    """`rounds` rounds of 3 clients (sizes 1, 2, 3) from the federator's weights; returns
    each round's federator weights (float32 tensors) and the averages' inputs."""
    rng = np.random.default_rng(seed)
    x = {r: (offset + rng.normal(0, start_scale, n)).astype(np.float32) for r, n in SIZES.items()}
    fed, out = buffers(x), []
    for _ in range(rounds):
        now = {r: t.numpy().copy() for r, t in fed.flat.items()}
        slots = [
            buffers(
                {r: (now[r] + rng.normal(0, scale, n)).astype(np.float32) for r, n in SIZES.items()}
            )
            for _ in range(3)
        ]
        exchange(strategy, fed, slots, [1.0, 2.0, 3.0])
        out.append({r: t.clone() for r, t in fed.flat.items()})
    return out


def test_fedavgm_without_momentum_at_lr_1_is_plain_fedavg_bit_for_bit():
    """Weights away from zero and updates small next to them (x/2 <= avg <= 2x): the
    step's before + (avg - before) is exact, so the bits are plain FedAvg's."""
    opt = ServerOptimized(PlainFedAvg(), ServerOptimizer("fedavgm", lr=1.0, momentum=0.0))
    assert opt.needs_before and not PlainFedAvg().needs_before
    kw = dict(rounds=3, seed=1, offset=1.5, start_scale=0.1, scale=0.05)
    for a, b in zip(run_rounds(opt, **kw), run_rounds(PlainFedAvg(), **kw)):
        for r in SIZES:
            assert torch.equal(a[r], b[r]), r


def test_fedavgm_without_momentum_at_lr_1_is_plain_fedavg_to_rounding():
    """Weights of both signs: before + (avg - before) rounds twice in float32, so plain
    FedAvg's average up to an ulp of the operands."""
    opt = ServerOptimized(PlainFedAvg(), ServerOptimizer("fedavgm", lr=1.0, momentum=0.0))
    kw = dict(rounds=3, seed=2, start_scale=0.1, scale=0.05)
    for a, b in zip(run_rounds(opt, **kw), run_rounds(PlainFedAvg(), **kw)):
        for r in SIZES:
            torch.testing.assert_close(a[r], b[r], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizer_steps_on_the_plain_average(kind):
    """Round by round, the server-optimized weights are ServerOptimizer.step(before,
    plain average): the same bits as applying the step by hand."""
    hyper = dict(lr=0.05, momentum=0.8, beta1=0.9, beta2=0.99, tau=1e-3)
    wrapped = ServerOptimized(PlainFedAvg(), ServerOptimizer(kind, **hyper))
    ref = ServerOptimizer(kind, **hyper)
    rng = np.random.default_rng(9)
    x = {r: rng.normal(0, 0.1, n).astype(np.float32) for r, n in SIZES.items()}
    fed = buffers(x)
    for _ in range(3):
        before = {r: t.clone() for r, t in fed.flat.items()}
        slots = [
            buffers(
                {
                    r: (before[r].numpy() + rng.normal(0, 0.05, n)).astype(np.float32)
                    for r, n in SIZES.items()
                }
            )
            for _ in range(3)
        ]
        plain = buffers({r: t.numpy() for r, t in before.items()})
        exchange(PlainFedAvg(), plain, [buffers(weights(s)) for s in slots], [1.0, 2.0, 3.0])
        exchange(wrapped, fed, slots, [1.0, 2.0, 3.0])
        for r in SIZES:
            want = plain.flat[r].clone()
            ref.step(r, before[r], want)
            assert torch.equal(fed.flat[r], want), r
            assert not torch.equal(fed.flat[r], plain.flat[r])  # the step did something


# --- FedProx and the chain ---------------------------------------------------------------


def test_prox_mu_is_found_through_the_chain():
    assert PlainFedAvg().prox_mu == 0.0 and PlainFedAvg().find(FedProx) is None
    prox = FedProx(PlainFedAvg(), 0.03)
    assert prox.prox_mu == 0.03 and prox.find(FedProx) is prox
    dp = DifferentialPrivacy(prox, 1.0, 1.0, "central", rng=np.random.default_rng(0))
    assert dp.prox_mu == 0.03 and dp.find(FedProx) is prox
    outer = ServerOptimized(FedProx(dp, 0.5), ServerOptimizer("fedavgm"))
    assert outer.prox_mu == 0.5  # the outermost FedProx
    assert ServerOptimized(PlainFedAvg(), ServerOptimizer("fedadam")).prox_mu == 0.0
    no_prox = DifferentialPrivacy(PlainFedAvg(), 1.0, 1.0, "central", rng=np.random.default_rng(0))
    assert no_prox.prox_mu == 0.0


def test_prox_changes_no_aggregation():
    kw = dict(rounds=2, seed=4)
    for a, b in zip(run_rounds(FedProx(PlainFedAvg(), 0.7), **kw), run_rounds(PlainFedAvg(), **kw)):
        for r in SIZES:
            assert torch.equal(a[r], b[r])


def test_make_strategy_wraps_in_order():
    cfg = load_config(
        None,
        {
            "privacy.dp": True,
            "fed.participation": 0.5,
            "fed.sampling": "poisson",
            "fed.prox_mu": 0.01,
            "fed.server_opt": "fedadam",
            "fed.server_lr": 0.02,
        },
    )
    pop = Population.place([5] * 12, 3, 0.5, "poisson")
    s = make_strategy(None, cfg, pop)
    chain = []
    node = s
    while node is not None:
        chain.append(type(node))
        node = node.inner
    assert chain == [ServerOptimized, FedProx, DifferentialPrivacy, PlainFedAvg]
    assert s.optimizer.kind == "fedadam" and s.optimizer.lr == 0.02
    assert s.prox_mu == 0.01 and s.inner.mu == 0.01
    dp = s.find(DifferentialPrivacy)
    assert dp.sample_rate == 0.5 and dp.denominator == pytest.approx(6.0)
    assert s.needs_before
    assert s.fedavg_sizes([5.0, 0.0, 2.0]) == [1.0, 0.0, 1.0]  # DP's uniform weights
    # the chain's client step is DP's clipping (one norm over the uploaded regions)
    start, (theta,) = setup(1, seed=6)
    b = buffers(theta)
    stats = s.prepare_client(b, sorted(SIZES), tensors(start))
    assert stats["dp_update_norm"] > cfg.privacy.clip >= stats["dp_clipped_norm"]
    assert s.epsilon(10) == pytest.approx(
        epsilon(cfg.privacy.noise_multiplier, 10, cfg.privacy.delta, 0.5)
    )


def test_make_strategy_is_plain_without_options():
    cfg = load_config(None)
    for s in (make_strategy(None, cfg, Population.place([1] * 3, 3)), make_strategy(None)):
        assert type(s) is PlainFedAvg and s.inner is None
        assert s.prox_mu == 0.0 and not s.needs_before and s.epsilon(5) is None
    only_prox = make_strategy(None, load_config(None, {"fed.prox_mu": 0.2}))
    assert type(only_prox) is FedProx and type(only_prox.inner) is PlainFedAvg
    only_opt = make_strategy(None, load_config(None, {"fed.server_opt": "fedyogi"}))
    assert type(only_opt) is ServerOptimized and type(only_opt.inner) is PlainFedAvg


def test_a_round_nobody_reported_still_releases_the_noise():
    """DP with sampling: a shared region that no sampled client reported is released
    anyway, as start + N(0, (z C)^2) / D (the accountant counts a noised sum every round),
    without any Reduce; the driver is told to check the result for overflow."""
    D, C, z = 10.0, 1.0, 1.5
    dp = DifferentialPrivacy(
        PlainFedAvg(), C, z, "central", rng=np.random.default_rng(5), denominator=D
    )
    assert dp.released_every_round(("decoder",)) == ("decoder",)
    assert DifferentialPrivacy(PlainFedAvg(), C, z).released_every_round(("decoder",)) == ()
    start = {r: np.full(n, 0.5, np.float32) for r, n in SIZES.items()}
    fed = buffers(start)
    for region in SIZES:
        job = RegionRound(region, 1, [], [])
        fed.save_before(region)
        dst, _ = dp.receive(fed, job)
        assert dp.finish(fed, job, dst) is True
    noise = np.concatenate([weights(fed)[r] - 0.5 for r in SIZES])
    want = z * C / D
    assert abs(noise.std() / want - 1) < 4 / math.sqrt(2 * noise.size), noise.std()
