"""fedmpi.fl.privacy: clipping, noise calibration, the DP average and the accountant."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import optimize, stats

import fedmpi.fl.privacy as privacy
from fedmpi.fl.privacy import PrivacyError

# --- (d) clipping --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipping_bound_holds_for_every_client(dtype):
    rng = np.random.default_rng(0)
    clip = 0.7
    for scale in (1e-4, 0.01, 1.0, 100.0):
        delta = (rng.normal(0, scale, 50_000)).astype(dtype)
        clipped, norm = privacy.clip_update(delta, clip)
        assert clipped.dtype == delta.dtype
        assert norm == pytest.approx(np.linalg.norm(delta.astype(np.float64)), rel=1e-9)
        out = np.linalg.norm(clipped.astype(np.float64))
        assert out <= clip * (1 + 1e-6)
        if norm <= clip:
            assert np.array_equal(clipped, delta)  # small updates pass untouched
        else:
            assert out == pytest.approx(clip, rel=1e-6)  # large ones land on the ball
            # direction kept
            np.testing.assert_allclose(clipped / out, delta / norm, rtol=1e-4, atol=1e-7)


def test_clipping_rejects_bad_input():
    with pytest.raises(PrivacyError, match="privacy.clip"):
        privacy.clip_update(np.ones(3), 0.0)
    with pytest.raises(PrivacyError, match="non-finite"):
        privacy.clip_update(np.array([1.0, np.inf]), 1.0)
    zero, norm = privacy.clip_update(np.zeros(4), 1.0)
    assert norm == 0.0 and not np.any(zero)


# --- (d) noise -----------------------------------------------------------------------


def chi2_std_interval(samples, alpha=1e-4):
    """Two-sided confidence interval for the std of zero-mean Gaussian samples."""
    n = samples.size
    ss = float(np.sum(samples.astype(np.float64) ** 2))
    return (
        math.sqrt(ss / stats.chi2.ppf(1 - alpha / 2, n)),
        math.sqrt(ss / stats.chi2.ppf(alpha / 2, n)),
    )


def test_noise_std_matches_configuration():
    z, clip, n = 1.3, 0.5, 200_000
    assert privacy.noise_std(z, clip, "central", 4) == pytest.approx(z * clip)
    assert privacy.noise_std(z, clip, "distributed", 4) == pytest.approx(z * clip / 2)
    for dtype in (np.float32, np.float64):
        x = privacy.add_noise(np.zeros(n, dtype), z * clip, np.random.default_rng(1))
        lo, hi = chi2_std_interval(x)
        assert lo <= z * clip <= hi
        assert abs(np.mean(x)) < 5 * z * clip / math.sqrt(n)
        assert stats.normaltest(x).pvalue > 1e-4  # Gaussian, not just the right spread
    # the same seed gives the same noise (reproducible runs)
    a = privacy.add_noise(np.zeros(8), 1.0, np.random.default_rng(7))
    b = privacy.add_noise(np.zeros(8), 1.0, np.random.default_rng(7))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_dp_average_has_the_configured_noise_on_the_sum(mode):
    """Distributed: m clients' shares add up to std z*C on the sum, like central."""
    z, clip, m, n = 0.8, 1.0, 5, 100_000
    rng = np.random.default_rng(2)
    deltas = [rng.normal(0, 0.05, n) for _ in range(m)]
    clipped = [privacy.clip_update(d, clip)[0] for d in deltas]
    exact_avg = np.sum(clipped, axis=0) / m
    client_std = privacy.noise_std(z, clip, mode, m) if mode == "distributed" else 0.0
    uploads = [
        privacy.add_noise(c.copy(), client_std, np.random.default_rng(10 + k))
        for k, c in enumerate(clipped)
    ]
    avg = privacy.private_average(
        np.sum(uploads, axis=0), m, z, clip, mode, rng=np.random.default_rng(99)
    )
    noise_on_sum = (avg - exact_avg) * m
    lo, hi = chi2_std_interval(noise_on_sum)
    assert lo <= z * clip <= hi


def test_dp_settings_are_validated():
    with pytest.raises(PrivacyError, match="privacy.mode"):
        privacy.noise_std(1.0, 1.0, "local", 3)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        privacy.noise_std(-1.0, 1.0, "central", 3)
    with pytest.raises(PrivacyError, match="rng"):
        privacy.private_average(np.zeros(3), 3, 1.0, 1.0, "central")


# --- (d) accountant ------------------------------------------------------------------


@pytest.mark.parametrize("z,rounds,delta", [(1.0, 100, 1e-5), (0.7, 10, 1e-6), (4.0, 300, 1e-5)])
def test_epsilon_is_the_accountants(z, rounds, delta):
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)  # q = 1: plain Gaussian
    assert privacy.epsilon(z, rounds, delta) == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-12
    )


def test_epsilon_monotone_in_rounds_and_noise():
    eps = [privacy.epsilon(1.1, r, 1e-5) for r in (1, 2, 5, 10, 50, 200)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert privacy.epsilon(2.0, 50, 1e-5) < privacy.epsilon(1.0, 50, 1e-5)
    assert privacy.epsilon(1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 5, 1e-5) == math.inf
    # sub-sampling (q < 1) only helps, never hurts
    assert privacy.epsilon(1.0, 50, 1e-5, sample_rate=0.1) < privacy.epsilon(1.0, 50, 1e-5)
    with pytest.raises(PrivacyError, match="privacy.delta"):
        privacy.epsilon(1.0, 5, 0.0)


# --- the accountant against independent references -----------------------------------
# At sample rate 1, R rounds of the Gaussian mechanism with noise multiplier z (sensitivity
# 1, add/remove adjacency) compose exactly to ONE Gaussian mechanism with mu = sqrt(R) / z
# (Dong, Roth & Su 2019). Its exact (epsilon, delta) curve is the analytic Gaussian
# mechanism's (Balle & Wang 2018). RDP accounting is an upper bound on it; the classic RDP
# conversion min_alpha R alpha / (2 z^2) + log(1/delta) / (alpha - 1) bounds fedmpi's
# (dp_accounting's improved conversion over its grid of orders) from above wherever the
# best order 1 + z sqrt(2 log(1/delta) / R) is inside that grid (>= 1.3 here).

ACCOUNTANT_CASES = [
    (0.5, 1, 1e-5),
    (0.8, 2, 1e-5),
    (1.1, 5, 1e-5),
    (1.0, 10, 1e-5),
    (0.7, 10, 1e-6),
    (2.0, 100, 1e-6),
    (4.0, 300, 1e-5),
    (10.0, 1, 1e-3),
]
RDP_SLACK = 1.25  # fedmpi's epsilon / the exact one: 1.03-1.2 over ACCOUNTANT_CASES


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with delta(epsilon) <= delta for the mu-Gaussian mechanism:
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018,
    Theorem 8), decreasing in eps; the second term in logs (no overflow)."""

    def excess(eps):
        tail = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
        return stats.norm.cdf(-eps / mu + mu / 2) - tail - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return optimize.brentq(excess, 0.0, hi, xtol=1e-12, rtol=1e-12)


def classic_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """min over alpha > 1 of R alpha / (2 z^2) + log(1/delta) / (alpha - 1), in closed
    form: with c = R / (2 z^2) and L = log(1/delta), c + 2 sqrt(c L) at alpha = 1 + sqrt(L/c)."""
    c, log_inv_delta = rounds / (2 * z * z), math.log(1 / delta)
    return c + 2 * math.sqrt(c * log_inv_delta)


@pytest.mark.parametrize("z,rounds,delta", ACCOUNTANT_CASES)
def test_epsilon_between_the_exact_gaussian_and_the_classic_rdp_bound(z, rounds, delta):
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)
    eps = privacy.epsilon(z, rounds, delta)
    assert exact <= eps <= classic_rdp_epsilon(z, rounds, delta)
    assert eps <= RDP_SLACK * exact
    # the bounds discriminate: a formula that forgot R (one round) or used z / 2 (twice
    # the sensitivity: replace-one adjacency) falls outside them
    if rounds > 1:
        assert privacy.epsilon(z, 1, delta) < exact
    assert privacy.epsilon(z / 2, rounds, delta) > classic_rdp_epsilon(z, rounds, delta)


def test_exact_gaussian_epsilon_is_the_mechanisms():
    """The reference itself: at its epsilon, the mechanism's delta is the one asked for,
    and a mechanism twice as noisy needs less epsilon."""
    mu, delta = 1.7, 1e-5
    eps = exact_gaussian_epsilon(mu, delta)
    at = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert at == pytest.approx(delta, rel=1e-6)
    assert exact_gaussian_epsilon(mu / 2, delta) < eps
    assert exact_gaussian_epsilon(0.01, 0.5) == 0.0  # delta(0) below delta


@pytest.mark.parametrize("z,rounds,delta", [(0.8, 2, 1e-5), (1.1, 5, 1e-5), (4.0, 300, 1e-5)])
def test_pld_accountant_agrees_with_the_exact_gaussian(z, rounds, delta):
    """Two independent references agree: dp_accounting's privacy-loss-distribution
    accountant (add/remove adjacency, its default) and the analytic Gaussian mechanism."""
    from dp_accounting import pld

    accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)
    assert accountant.get_epsilon(delta) == pytest.approx(exact, rel=0.01)
    assert exact_gaussian_epsilon(1 / z, delta) < 0.99 * exact  # one round is not enough


def test_epsilon_is_reported_with_its_adjacency():
    """metrics.jsonl's round fields and the round line name the neighbouring relation."""
    assert privacy.ADJACENCY == "add/remove one client"
    assert privacy.epsilon_fields(8.04, 1e-5) == {
        "epsilon": 8.04,
        "dp_delta": 1e-5,
        "dp_adjacency": "add/remove one client",
    }
    assert privacy.epsilon_text(8.0412, 1e-5) == "eps 8.04 (delta 1e-05, add/remove one client)"


# --- (d) a client's whole upload: one clip over all its regions ------------------------


def test_clip_upload_clips_jointly():
    rng = np.random.default_rng(3)
    starts = [rng.normal(0, 0.1, n).astype(np.float32) for n in (30_000, 20_000)]
    deltas = [rng.normal(0, 0.01, s.size).astype(np.float32) for s in starts]
    clip = 0.5
    joint = float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in deltas)))
    assert joint > clip and all(np.linalg.norm(d) < joint for d in deltas)
    thetas = [s + d for s, d in zip(starts, deltas)]
    exact = [t.astype(np.float64) - s for t, s in zip(thetas, starts)]
    norm, clipped = privacy.clip_upload(thetas, starts, clip)
    assert norm == pytest.approx(joint, rel=1e-6) and clipped <= clip
    assert clipped == pytest.approx(clip, rel=1e-6)  # on the ball, the same factor everywhere
    for t, s, e in zip(thetas, starts, exact):
        np.testing.assert_allclose(t - s, e * clip / norm, atol=2e-8)
    # a small update passes untouched
    small = [s + 1e-4 * np.sign(s) for s in starts]
    before = [t.copy() for t in small]
    norm, clipped = privacy.clip_upload(small, starts, 100.0)
    assert norm == clipped and all(np.array_equal(a, b) for a, b in zip(small, before))
