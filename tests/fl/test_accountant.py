"""fedmpi.fl.privacy.epsilon against an independent RDP accountant written here.

The reference uses numpy/scipy only (no dp_accounting). Renyi DP of the Poisson-
subsampled Gaussian mechanism (rate q, noise multiplier sigma), add/remove adjacency,
after Mironov, Talwar and Zhang (2019), "Renyi Differential Privacy of the Sampled
Gaussian Mechanism" (arXiv:1908.10530): RDP(alpha) = log(A_alpha) / (alpha - 1) with
A_alpha = E_{x ~ N(0, sigma^2)}[((1-q) + q exp((2x-1) / (2 sigma^2)))^alpha].

- integer alpha >= 2: their exact binomial expansion, in log space,
  A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2));
  alpha / (2 sigma^2) when q = 1;
- fractional alpha in (1, 11): the expectation above by numerical quadrature (checked
  against the binomial sum at integer alpha). dp_accounting's optimum often lies at a
  fractional order (3.7, 8.7, ...): integer orders alone overstate epsilon by up to ~8%.

T rounds compose to T * RDP(alpha); the conversion to (epsilon, delta) is the one
dp_accounting's `compute_epsilon` applies (Canonne, Kamath and Steinke 2020,
arXiv:2004.00010 Prop. 12; Asoodeh et al. 2020, arXiv:2001.05990 Eq. 20), minimised
over the orders:  T*RDP + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha-1).
At integer orders dp_accounting's RDP equals the binomial sum (to ~1e-14); at fractional
orders its series adds |C(alpha, i)| terms, an upper bound (up to ~20% above the exact
value at alpha near 1). The reference grid contains dp_accounting's orders and its RDP
is exact, so its epsilon is never above fedmpi's: fedmpi must lie in [ref, 1.01 ref]
(conservative, never under-reporting).
"""

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import gammaln, logsumexp

from fedmpi.fl.privacy import PrivacyError, epsilon

FRACTIONAL = np.round(np.arange(1.05, 11.0, 0.05), 2)
INTEGER = np.concatenate([np.arange(11, 257), [320, 384, 512, 768, 1024]])


def rdp_integer(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order alpha >= 2: Mironov et al.'s binomial expansion."""
    if q == 1.0:
        return alpha / (2 * sigma**2)
    k = np.arange(alpha + 1, dtype=np.float64)
    log_terms = (
        gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
        + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    )  # fmt: skip
    return float(logsumexp(log_terms)) / (alpha - 1)


def rdp_quadrature(q: float, sigma: float, alpha: float) -> float:
    """RDP at any order alpha > 1 (moderate alpha): A_alpha - 1 by quadrature."""

    def excess(x):  # density times ((1-q) + q L)^alpha - 1 - alpha q (L - 1): E[L - 1] = 0
        a, u = -(x**2) / (2 * sigma**2), (2 * x - 1) / (2 * sigma**2)  # u = log L(x)
        log_ratio = alpha * math.log1p(q * math.expm1(u))
        if log_ratio < 1:  # second order in q: keep it off the first-order cancellation
            return math.exp(a) * (math.expm1(log_ratio) - alpha * q * math.expm1(u))
        return math.exp(a + log_ratio) - math.exp(a) - alpha * q * (math.exp(a + u) - math.exp(a))

    lo, hi = -40 * sigma, alpha + 40 * sigma  # the bumps sit near 0 and near alpha
    val, _ = integrate.quad(excess, lo, hi, points=[0.0, 0.5, alpha], limit=500,
                            epsabs=0, epsrel=1e-11)  # fmt: skip
    return math.log1p(val / math.sqrt(2 * math.pi * sigma**2)) / (alpha - 1)


def reference_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """min over FRACTIONAL + INTEGER orders of the RDP -> (epsilon, delta) conversion."""
    rdps = [(a, rdp_quadrature(q, sigma, a)) for a in FRACTIONAL]
    rdps += [(a, rdp_integer(q, sigma, int(a))) for a in INTEGER]
    eps = [
        rounds * r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1) for a, r in rdps
    ]
    return max(0.0, min(eps))


CASES = [
    # (noise multiplier z, sample rate q, rounds T, delta)
    (1.0, 0.01, 100, 1e-5),
    (0.8, 0.01, 1000, 1e-5),
    (1.1, 0.05, 50, 1e-5),
    (2.0, 1.0, 10, 1e-5),
    (5.0, 1.0, 1, 1e-5),
    (0.75, 0.01, 200, 1e-5),  # privacy-utility regime: eps ~3
    (0.65, 0.01, 200, 1e-5),  # optimum at a small fractional order
    (1.0, 0.01, 200, 1e-6),
]


@pytest.mark.parametrize("z,q,rounds,delta", CASES)
def test_epsilon_matches_independent_rdp_accountant(z, q, rounds, delta):
    ours = epsilon(z, rounds, delta, sample_rate=q)
    ref = reference_epsilon(z, q, rounds, delta)
    assert math.isfinite(ours) and ref > 0
    rel = (ours - ref) / ref
    print(f"z={z} q={q} T={rounds} delta={delta}: fedmpi {ours:.6g} ref {ref:.6g} rel {rel:+.2e}")
    assert -1e-6 < rel < 0.01


def test_privacy_utility_case_is_in_the_meaningful_range():
    assert 2 < epsilon(0.75, 200, 1e-5, sample_rate=0.01) < 8


@pytest.mark.parametrize("q,sigma", [(0.01, 0.8), (0.05, 1.1), (0.3, 2.0), (1 - 1e-9, 1.3)])
def test_quadrature_agrees_with_binomial_expansion(q, sigma):
    for alpha in (2, 3, 5, 8, 10):
        assert rdp_quadrature(q, sigma, alpha) == pytest.approx(
            rdp_integer(q, sigma, alpha), rel=1e-6
        )


def test_subsampling_amplifies_and_rounds_compose():
    z, delta = 1.0, 1e-5
    by_rate = [epsilon(z, 100, delta, sample_rate=q) for q in (0.001, 0.01, 0.1, 1.0)]
    assert all(a < b for a, b in zip(by_rate, by_rate[1:])), by_rate
    by_rounds = [epsilon(z, t, delta, sample_rate=0.01) for t in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:])), by_rounds


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5])
def test_sample_rate_outside_unit_interval_is_refused(q):
    with pytest.raises(PrivacyError, match="sample rate"):
        epsilon(1.0, 10, 1e-5, sample_rate=q)
