"""fedmpi.fl.secure without a transport: W clients simulated in one process.

The SUM reduce is np.sum over the stacked uint64 uploads (wraps modulo 2^64, as
MPI.UINT64_T / SUM does). Keys come from a seeded generator so every statistic below
is deterministic.
"""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy.stats import chisquare

import fedmpi.fl.methods as methods
import fedmpi.fl.secure as secure
from fedmpi.fl.secure import DEFAULT_FRAC_BITS, SecureAggError, SecureAggregator
from fedmpi.model.regions import REGIONS

RUN = "run-test"


def clients(num, seed=0, frac_bits=DEFAULT_FRAC_BITS, run_id=RUN):
    """num SecureAggregators with deterministic keys, after the (relayed) key exchange."""
    rng = np.random.default_rng(seed)
    aggs = [
        SecureAggregator(k, frac_bits, X25519PrivateKey.from_private_bytes(rng.bytes(32)))
        for k in range(num)
    ]
    publics = {a.client_id: a.public_bytes() for a in aggs}  # what the federator relays
    for a in aggs:
        a.establish(publics, run_id)
    return aggs


def reduce_sum(uploads):
    return np.sum(np.stack(uploads), axis=0, dtype=np.uint64)


def weights(num, n, seed=1):
    rng = np.random.default_rng(seed)
    thetas = [rng.normal(0, 0.1, n).astype(np.float32) for _ in range(num)]
    sizes = [float(s) for s in rng.integers(100, 20000, num)]
    return thetas, sizes


def secure_fedavg(aggs, reporters, thetas, sizes, round_index, region):
    """What _exchange will do: upload [n_k theta_k, n_k] masked, SUM, decode, divide."""
    uploads = []
    for k in reporters:
        values = np.append(thetas[k].astype(np.float64) * sizes[k], sizes[k])
        uploads.append(aggs[k].upload(values, round_index, region, reporters))
    total = secure.decode(reduce_sum(uploads))
    return total[:-1] / total[-1], total[-1]


def resolution(reporters, sizes):
    """Bound on |secure - exact| of the average: each upload rounds by <= 2^-(F+1)."""
    m = len(reporters)
    return m * 2.0 ** -(DEFAULT_FRAC_BITS + 1) / sum(sizes[k] for k in reporters) * 1.01


# --- (a) the secure sum is the plain FedAvg within the fixed-point resolution -----------


@pytest.mark.parametrize("num", [2, 4])
def test_secure_fedavg_equals_plain_all_reporters(num):
    aggs = clients(num)
    thetas, sizes = weights(num, 5000)
    reporters = list(range(num))
    avg, total_n = secure_fedavg(aggs, reporters, thetas, sizes, 1, "decoder")
    exact = sum(sizes[k] * thetas[k].astype(np.float64) for k in reporters) / sum(sizes)
    assert total_n == sum(sizes)  # integer n_k survive fixed point exactly
    assert np.max(np.abs(avg - exact)) <= resolution(reporters, sizes)
    # and it agrees with the project's plain FedAvg (float32) to float32 precision
    plain = methods.fedavg([thetas[k] for k in reporters], [sizes[k] for k in reporters])
    np.testing.assert_allclose(avg.astype(np.float32), plain, rtol=0, atol=1e-7)


def test_secure_fedavg_random_reporter_subsets():
    num = 6
    aggs = clients(num, seed=3)
    thetas, sizes = weights(num, 3000, seed=4)
    rng = np.random.default_rng(5)
    for round_index in (1, 2, 3):
        for region in REGIONS:
            m = int(rng.integers(2, num + 1))
            reporters = sorted(rng.choice(num, m, replace=False).tolist())
            avg, _ = secure_fedavg(aggs, reporters, thetas, sizes, round_index, region)
            exact = sum(sizes[k] * thetas[k].astype(np.float64) for k in reporters) / sum(
                sizes[k] for k in reporters
            )
            assert np.max(np.abs(avg - exact)) <= resolution(reporters, sizes), (
                round_index,
                region,
            )


@pytest.mark.parametrize("num", [4, 5])
def test_secure_fedavg_on_usplit_plans(num):
    """USPLIT gives each region its own reporter subset; each subset's masks cancel."""
    aggs = clients(num, seed=6)
    thetas, sizes = weights(num, 1000, seed=7)
    for round_index in (1, 2):
        plan = methods.make_plan("usplit", round_index, num, seed=0)
        for region in REGIONS:
            reporters = plan.uploaders(region)
            secure.check_reporters(region, round_index, reporters)
            avg, _ = secure_fedavg(aggs, reporters, thetas, sizes, round_index, region)
            plain = methods.fedavg([thetas[k] for k in reporters], [sizes[k] for k in reporters])
            np.testing.assert_allclose(avg.astype(np.float32), plain, rtol=0, atol=1e-7)


# --- (b) one masked upload looks uniform and is not the plain encoding -----------------


def byte_pvalue(buf_u64):
    counts = np.bincount(buf_u64.view(np.uint8), minlength=256)
    return chisquare(counts).pvalue


def test_single_masked_upload_is_uniform_and_not_plain():
    aggs = clients(3, seed=8)
    values = np.random.default_rng(9).normal(0, 50.0, 1 << 16)  # 512 KiB of upload
    plain = secure.encode(values, reporters=3)
    masked = aggs[1].upload(values, 4, "encoder", [0, 1, 2])
    assert byte_pvalue(masked) > 1e-3  # indistinguishable from uniform bytes
    assert byte_pvalue(plain) < 1e-100  # the plain encoding is far from it
    assert np.mean(masked == plain) < 1e-3  # and the upload hides every value
    # the federator decoding one upload gets noise, not the client's values
    assert np.max(np.abs(secure.decode(masked) - values)) > 1e6


# --- (c) exact cancellation, overflow, reporters, mask separation ------------------------


def test_masks_cancel_exactly():
    num, n = 5, 4096
    aggs = clients(num, seed=10)
    rng = np.random.default_rng(11)
    values = [rng.normal(0, 3.0, n) for _ in range(num)]
    reporters = [0, 2, 3, 4]
    masked = reduce_sum([aggs[k].upload(values[k], 7, "bottleneck", reporters) for k in reporters])
    plain = reduce_sum([secure.encode(values[k], reporters=len(reporters)) for k in reporters])
    assert np.array_equal(masked, plain)  # integer equality, not approximate
    zeros = [
        secure.mask_inplace(np.zeros(n, np.uint64), k, reporters, aggs[k].secrets, 7, "bottleneck")
        for k in reporters
    ]
    assert not np.any(reduce_sum(zeros)) and all(np.any(z) for z in zeros)


def test_pair_secrets_are_symmetric_and_bound_to_the_run():
    a, b, c = clients(3, seed=12)
    assert a.secrets[1] == b.secrets[0] and b.secrets[2] == c.secrets[1]
    assert len({a.secrets[1], a.secrets[2], b.secrets[2]}) == 3
    other = clients(3, seed=12, run_id="run-other")
    assert other[0].secrets[1] != a.secrets[1]
    assert set(a.secrets) == {1, 2}  # no secret with itself


def test_masks_differ_per_round_and_region():
    a = clients(2, seed=13)[0]
    s = a.secrets[1]
    base = secure.mask_stream(s, 1, "encoder", 1024).copy()
    assert not np.array_equal(base, secure.mask_stream(s, 2, "encoder", 1024))
    assert not np.array_equal(base, secure.mask_stream(s, 1, "decoder", 1024))
    assert np.array_equal(base, secure.mask_stream(s, 1, "encoder", 1024))  # deterministic
    assert np.array_equal(base[:100], secure.mask_stream(s, 1, "encoder", 100))  # a prefix


def test_overflow_check_raises_with_the_fix():
    with pytest.raises(SecureAggError, match=r"fed\.secure_frac_bits to 21 or less"):
        secure.encode(np.array([0.5, -1e12]), frac_bits=DEFAULT_FRAC_BITS, reporters=4)
    # the boundary is exact: the largest frac_bits that fits passes, one more fails
    max_abs, m = 1e8, 6000
    fit = secure.max_frac_bits(max_abs, m)
    secure.check_overflow(max_abs, m, fit)
    with pytest.raises(SecureAggError, match="would overflow"):
        secure.check_overflow(max_abs, m, fit + 1)
    # documented default headroom: n_k = 1e6, |theta| = 100, 5497 reporters
    secure.check_overflow(1e8, 5497, DEFAULT_FRAC_BITS)
    with pytest.raises(SecureAggError):
        secure.check_overflow(1e8, 5498, DEFAULT_FRAC_BITS)
    with pytest.raises(SecureAggError, match="at any fed.secure_frac_bits"):
        secure.check_overflow(2.0**62, 2, DEFAULT_FRAC_BITS)
    with pytest.raises(SecureAggError, match="non-finite"):
        secure.encode(np.array([1.0, np.nan]))
    # an upload is checked against its share of the range for its region's reporters
    agg = clients(2, seed=14)[0]
    with pytest.raises(SecureAggError, match=r"client 0, region 'decoder', round 3"):
        agg.upload(np.array([2.0**38]), 3, "decoder", [0, 1])


def test_fewer_than_two_reporters_is_refused():
    with pytest.raises(SecureAggError, match=r"region 'encoder' in round 2 has 1 reporter"):
        secure.check_reporters("encoder", 2, [1])
    secure.check_reporters("encoder", 2, [0, 1])
    secure.check_reporters("encoder", 2, [1], min_reporters=1)  # explicit opt-out
    secure.check_reporters("encoder", 2, [])  # a region nobody reports is not aggregated
    plan = methods.make_plan("usplit", 1, 2, seed=0)  # USPLIT at K = 2: one reporter each
    with pytest.raises(SecureAggError, match="USPLIT at K = 2"):
        for region in REGIONS:
            secure.check_reporters(region, 1, plan.uploaders(region))


def test_missing_secret_and_bad_public_key():
    agg = clients(2, seed=15)[0]
    with pytest.raises(SecureAggError, match="no pair secret with client 5"):
        agg.upload(np.ones(4), 1, "encoder", [0, 1, 5])
    with pytest.raises(SecureAggError, match="has 31 bytes"):
        secure.derive_secrets(secure.make_keypair(), 0, {1: bytes(31)}, RUN)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(16)
    for dtype in (np.float32, np.float64):
        values = rng.normal(0, 100.0, 300_000).astype(dtype)  # > numpy's cast buffer
        enc = secure.encode(values)
        assert enc.dtype == np.uint64
        err = np.abs(secure.decode(enc) - values.astype(np.float64))
        assert np.max(err) <= 2.0 ** -(DEFAULT_FRAC_BITS + 1)
    assert secure.encode(np.array([-1.0]))[0] == np.uint64(2**64 - 2**DEFAULT_FRAC_BITS)


def test_ring_of_neighbours_cancels_and_is_symmetric():
    num, n = 9, 2048
    aggs = clients(num, seed=17)
    reporters = [0, 1, 3, 4, 5, 7, 8]  # 7 of 9 report this region
    for k in (1, 2):
        peers = {r: secure.mask_peers(r, reporters, neighbors=k) for r in reporters}
        assert all(len(p) == 2 * k for p in peers.values())
        assert all(r in peers[p] for r in reporters for p in peers[r])  # both ends agree
    assert secure.mask_peers(3, reporters, neighbors=1) == [1, 4]
    assert secure.mask_peers(0, reporters, neighbors=1) == [1, 8]  # wraps around
    assert secure.mask_peers(0, reporters, neighbors=3) == [1, 3, 4, 5, 7, 8]  # 2k >= m - 1: all
    rng = np.random.default_rng(18)
    values = {r: rng.normal(0, 1.0, n) for r in reporters}
    uploads = {
        r: aggs[r].upload(values[r], 2, "decoder", reporters, neighbors=1) for r in reporters
    }
    plain = reduce_sum([secure.encode(values[r], reporters=len(reporters)) for r in reporters])
    assert np.array_equal(reduce_sum(list(uploads.values())), plain)
    assert byte_pvalue(uploads[4]) > 1e-3
    # any partial sum short of the whole set stays masked (the ring is connected)
    partial = reduce_sum([uploads[r] for r in reporters[:-1]])
    assert byte_pvalue(partial) > 1e-3


# --- set-up checks of a run (pure: every rank runs them identically) -------------------


def test_secure_plans_checked_for_every_round_at_setup():
    from fedmpi.config import ConfigError, load_config
    from fedmpi.fl.aggregate import check_secure_plans
    from fedmpi.fl.population import Population

    def cfg(method, **more):
        return load_config(
            None, {"fed.method": method, "fed.secure": True, "fed.rounds": 5, **more}
        )

    def one_per_rank(k):
        return Population.place([1] * k, k)

    with pytest.raises(ConfigError, match=r"USPLIT at K = 2.*usplit, 2 clients on 2 ranks"):
        check_secure_plans(cfg("usplit"), one_per_rank(2))
    with pytest.raises(ConfigError, match="has 1 reporter"):  # odd K: one region has 1 reporter
        check_secure_plans(cfg("usplit"), one_per_rank(3))
    for k in (4, 5, 10):
        check_secure_plans(cfg("usplit"), one_per_rank(k))
    for method in ("full", "udec", "ulatdec"):
        check_secure_plans(cfg(method), one_per_rank(2))
    check_secure_plans(cfg("usplit", **{"fed.secure_min_reporters": 1}), one_per_rank(2))
    check_secure_plans(load_config(None, {"fed.method": "usplit"}), one_per_rank(2))  # no check
    # a rank is the trust domain: 4 clients on 2 ranks report as 2 reporters at most
    with pytest.raises(ConfigError, match="usplit, 4 clients on 2 ranks"):
        check_secure_plans(cfg("usplit"), Population.place([1] * 4, 2))
    # with client sampling the rounds are drawn at run time: nothing to check here
    check_secure_plans(cfg("usplit"), Population.place([1] * 2, 2, participation=0.5))


def test_secure_with_central_dp_is_a_config_error():
    from fedmpi.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="privacy.mode=distributed"):
        load_config(None, {"fed.secure": True, "privacy.dp": True})
    cfg = load_config(None, {"fed.secure": True, "privacy.dp": True, "privacy.mode": "distributed"})
    assert cfg.fed.secure_frac_bits == DEFAULT_FRAC_BITS  # the config default is the module's


def test_fedavg_upload_scales_without_a_float_copy():
    """upload_fedavg = encode([n_k theta, n_k]) + masks; n_k theta rounded once, in float64."""
    aggs = clients(3, seed=19)
    theta = np.random.default_rng(20).normal(0, 0.2, 1001).astype(np.float32)
    n_k = 4321.0
    out = np.empty(theta.size + 1, np.uint64)
    masked = aggs[0].upload_fedavg(theta, n_k, 2, "decoder", [0, 1, 2], out=out)
    assert masked is out
    # client 0 is the lower id of both its pairs: it added both masks; take them off
    unmasked = masked.copy()
    for peer in (1, 2):
        unmasked -= secure.mask_stream(aggs[0].secrets[peer], 2, "decoder", out.size)
    plain = secure.encode(np.append(theta.astype(np.float64) * n_k, n_k), reporters=3)
    assert np.array_equal(unmasked, plain)
    assert (
        np.max(np.abs(secure.decode(plain)[:-1] / n_k - theta))
        <= 1.01 * 2.0 ** -(DEFAULT_FRAC_BITS + 1) / n_k
    )


def test_analytical_table_knows_the_secure_upload_width(capsys):
    """The ledger's expectation for fed.secure: uploads 8 * (P + 1), downloads 4 * P."""
    import fedmpi.cli.comm as comm
    import fedmpi.fl.ledger as ledger

    sizes = {"encoder": 100, "bottleneck": 50, "decoder": 70}
    plain = ledger.analytical_rows("ulatdec", 3, 2, sizes, 0)
    wide = ledger.analytical_rows("ulatdec", 3, 2, sizes, 0, ledger.SECURE_VALUE_BYTES)
    assert len(plain) == len(wide)
    for p, w in zip(plain, wide):
        assert w["bytes"] == (2 * p["bytes"] if p["direction"] == "up" else p["bytes"])
        assert w["bytes"] == (8 * (w["params"] + 1) if w["direction"] == "up" else 4 * w["params"])
    a = ledger.comparison("udec", 3, 2, sizes, 0)
    b = ledger.comparison("udec", 3, 2, sizes, 0, ledger.SECURE_VALUE_BYTES)
    assert (
        b["moved"]["params"] == a["moved"]["params"] and b["moved"]["bytes"] > a["moved"]["bytes"]
    )
    assert b["moved"]["reduction_vs_full"] == a["moved"]["reduction_vs_full"]
    assert comm.main(["--config", "tests/configs/tiny.yaml", "--clients", "2", "--secure"]) == 0
    out = capsys.readouterr().out
    assert "uploads uint64 (8 bytes/value)" in out and "MB (secure)" in out
