"""Round plans for FULL / USPLIT / UDEC / ULATDEC and FedAvg (fedmpi.fl.methods)."""

from collections import Counter

import numpy as np
import pytest

from fedmpi.fl.methods import (
    METHODS,
    Plan,
    fedavg,
    fedavg_weights,
    make_plan,
    pack_upload,
    personal_regions,
    usplit_assignment,
)
from fedmpi.model.regions import REGIONS

ALL = frozenset(REGIONS)
ENC, BOT, DEC = "encoder", "bottleneck", "decoder"
ROUNDS = range(1, 9)
SEEDS = (0, 2023)


@pytest.mark.parametrize(
    "method,shared",
    [
        ("full", {ENC, BOT, DEC}),
        ("udec", {DEC}),
        ("ulatdec", {BOT, DEC}),
    ],
)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_fixed_plans(method, shared, k):
    for r in (1, 2, 15):
        plan = make_plan(method, r, k, seed=7)
        assert plan.round == r and plan.num_clients == k
        assert plan.uploads == tuple(frozenset(shared) for _ in range(k))
        assert plan.downloads == plan.uploads
        for region in REGIONS:
            expect = list(range(k)) if region in shared else []
            assert plan.uploaders(region) == expect
            assert plan.receivers(region) == expect


def test_make_plan_rejects_bad_input():
    with pytest.raises(ValueError):
        make_plan("fedprox", 1, 3, 0)
    with pytest.raises(ValueError):
        make_plan("full", 1, 0, 0)


def test_personal_regions():
    assert set(personal_regions("full")) == set()
    assert set(personal_regions("usplit")) == set()
    assert set(personal_regions("udec")) == {ENC, BOT}
    assert set(personal_regions("ulatdec")) == {ENC}
    # personal regions are exactly those never uploaded
    for m in ("full", "udec", "ulatdec", "usplit"):
        plan = make_plan(m, 1, 4, 0)
        uploaded = set().union(*plan.uploads)
        assert set(personal_regions(m)) == set(REGIONS) - uploaded


def _check_usplit(ups, k):
    assert len(ups) == k
    for u in ups:
        assert u, "a client uploads nothing"
        assert u <= ALL
    for region in REGIONS:
        assert any(region in u for u in ups), f"nobody uploads {region}"
    if k == 1:
        assert ups[0] == ALL
        return
    n_enc = sum(ENC in u for u in ups)
    n_dec = sum(DEC in u for u in ups)
    n_bot = sum(BOT in u for u in ups)
    for u in ups:
        assert not (ENC in u and DEC in u), "a client uploads both encoder and decoder"
        assert (ENC in u) or (DEC in u), "a client uploads only the bottleneck"
        assert len(u) <= 2
    assert n_enc + n_dec == k
    if k % 2 == 0:
        assert n_enc == k // 2 and n_dec == k // 2
        assert n_bot == k // 2
    else:
        # (K-1)/2 pairs, each with one bottleneck, plus the last client with the bottleneck
        # and one of encoder / decoder
        assert {n_enc, n_dec} == {k // 2, k // 2 + 1}
        assert n_bot == k // 2 + 1
        # the extra client is on the majority side and carries the bottleneck
        major = ENC if n_enc > n_dec else DEC
        assert any(u == frozenset({major, BOT}) for u in ups)


@pytest.mark.parametrize("k", range(1, 8))
def test_usplit_pairing_rules(k):
    for seed in SEEDS:
        for r in ROUNDS:
            plan = make_plan("usplit", r, k, seed)
            _check_usplit(plan.uploads, k)
            # every client downloads the full model
            assert plan.downloads == tuple(ALL for _ in range(k))


@pytest.mark.parametrize("k", [2, 3, 4, 6, 7])
def test_usplit_redrawn_each_round_and_reproducible(k):
    plans = [usplit_assignment(k, r, 2023) for r in range(1, 31)]
    assert len({tuple(p) for p in plans}) > 1, "assignment never changes between rounds"
    for r in (1, 5, 30):
        assert make_plan("usplit", r, k, 2023) == make_plan("usplit", r, k, 2023)
        assert usplit_assignment(k, r, 2023) == plans[r - 1]
    other = [usplit_assignment(k, r, 99) for r in range(1, 31)]
    assert other != plans, "seed has no effect"


def test_usplit_randomness_covers_all_roles():
    """Over many rounds: every client plays every role, the bottleneck coin goes both ways,
    and for odd K the last client's extra part is sometimes encoder, sometimes decoder."""
    per_client = {k: set() for k in range(4)}
    for r in range(1, 101):
        ups = usplit_assignment(4, r, 1)
        for k, u in enumerate(ups):
            per_client[k].add(u)
    for k in range(4):
        assert per_client[k] == {
            frozenset({ENC}),
            frozenset({DEC}),
            frozenset({ENC, BOT}),
            frozenset({DEC, BOT}),
        }
    odd_extra = Counter()
    for r in range(1, 101):
        ups = usplit_assignment(5, r, 1)
        n_enc = sum(ENC in u for u in ups)
        odd_extra["enc" if n_enc == 3 else "dec"] += 1
    assert odd_extra["enc"] > 20 and odd_extra["dec"] > 20


def _rng_bufs(k, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n).astype(np.float32) for _ in range(k)]


def test_fedavg_weighted_average():
    bufs = _rng_bufs(5, 101)
    sizes = [529, 14, 46087, 11898, 1473]
    out = fedavg(bufs, sizes)
    assert out.dtype == np.float32 and out.shape == (101,)
    expect = np.average(np.stack(bufs).astype(np.float64), axis=0, weights=sizes)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-7)
    # invariant to scaling the weights; equal weights give the plain mean
    np.testing.assert_allclose(fedavg(bufs, [3 * s for s in sizes]), out, rtol=1e-6)
    np.testing.assert_allclose(
        fedavg(bufs, [1] * 5), np.mean(np.stack(bufs), axis=0), rtol=1e-6, atol=1e-7
    )
    # inputs are not modified
    np.testing.assert_array_equal(bufs[0], _rng_bufs(5, 101)[0])


def test_fedavg_renormalises_over_subset():
    """USPLIT: a region is averaged over its uploaders only, weights renormalised there."""
    bufs = _rng_bufs(6, 33, seed=3)
    sizes = np.array([10, 200, 35, 1, 700, 54])
    ups = usplit_assignment(6, 4, 2023)
    for region in REGIONS:
        who = [k for k in range(6) if region in ups[k]]
        out = fedavg([bufs[k] for k in who], [sizes[k] for k in who])
        w = sizes[who] / sizes[who].sum()
        expect = sum(wi * bufs[k].astype(np.float64) for wi, k in zip(w, who))
        np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-7)
        # not the same as the average over everyone with unnormalised subset weights
        wrong = sum(sizes[k] * bufs[k].astype(np.float64) for k in who) / sizes.sum()
        assert not np.allclose(out, wrong)


def test_fedavg_single_and_identical():
    b = _rng_bufs(1, 17)[0]
    np.testing.assert_array_equal(fedavg([b], [42]), b)
    np.testing.assert_allclose(fedavg([b, b, b], [1, 5, 9]), b, rtol=1e-7)


def test_fedavg_accumulates_in_high_precision():
    # cancellation: 3 * (-9999999) is not a float32, so a float32 running sum gives
    # 0.33 or 0.67 here instead of 0.5 (the docstring promises float64 accumulation)
    bufs = [np.array([1e7, 2.0], dtype=np.float32), np.array([-9999999.0, 4.0], dtype=np.float32)]
    naive = (np.float32(3) * bufs[0] + np.float32(3) * bufs[1]) / np.float32(6)
    assert abs(naive[0] - 0.5) > 0.1  # the trap is real
    np.testing.assert_allclose(fedavg(bufs, [3, 3]), [0.5, 3.0], rtol=0, atol=1e-6)


def test_fedavg_errors():
    with pytest.raises(ValueError):
        fedavg([], [])
    with pytest.raises(ValueError):
        fedavg(_rng_bufs(2, 3), [0, 0])


def test_a_left_out_client_uploads_zeros_whatever_its_weights_hold():
    """fed.on_nonfinite=skip: weight 0 and no trace of NaN / inf in the sum (a FULL client
    no longer restores the regions it gets back before it uploads)."""
    import torch

    theta = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    out = torch.full((5,), 7.0)
    pack_upload(theta, 0.0, out)
    assert torch.equal(out, torch.zeros(5))
    w = fedavg_weights([3.0, 0.0])
    assert w == [1.0, 0.0]
    good = pack_upload(torch.tensor([2.0, 4.0, 6.0, 8.0]), w[0], torch.empty(5))
    total = good + out  # the Reduce: [the average, sum of weights]
    assert torch.equal(total, torch.tensor([2.0, 4.0, 6.0, 8.0, 1.0]))
    assert fedavg_weights([0, 0]) == [0.0, 0.0]  # every reporter left out: nothing averaged


def test_pack_upload_in_place_sums_to_the_average():
    """The job packs [w_k theta_k, w_k] over the client's own weights (theta is the send
    buffer's head, `regions.region_send_buffer`); the uploads' sum is the average."""
    import torch

    rng = np.random.default_rng(5)
    sizes = [529, 14, 46087]
    thetas = [rng.normal(size=50).astype(np.float32) for _ in sizes]
    total = torch.zeros(51)
    for theta, w in zip(thetas, fedavg_weights(sizes)):
        send = torch.empty(51)
        send[:-1] = torch.from_numpy(theta)
        assert pack_upload(send[:-1], w, send) is send
        np.testing.assert_allclose(send[:-1].numpy(), w * theta, rtol=1e-6)
        total += send
    np.testing.assert_allclose(total[:-1].numpy(), fedavg(thetas, sizes), rtol=1e-5, atol=1e-7)
    assert abs(float(total[-1]) - 1.0) < 1e-6


def test_every_plan_returns_what_a_client_uploads():
    """In-place packing relies on it: a client's uploaded regions come back the same round."""
    for method in METHODS:
        for K in (1, 2, 3, 5):
            for r in (1, 2, 7):
                plan = make_plan(method, r, K, seed=3)
                assert all(up <= down for up, down in zip(plan.uploads, plan.downloads))
    with pytest.raises(ValueError, match="does not receive it back"):
        Plan(1, (frozenset({"encoder"}),), (frozenset(),))
