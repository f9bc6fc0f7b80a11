"""fedmpi.fl.strategy / secure / privacy: every aggregation strategy through the one
interface, without MPI.

Every rank is simulated in one process by its own `RegionBuffers` and strategy object;
the SUM Reduce is a loopback that adds the clients' buffers to the federator's own
summand in the buffer's dtype (float32 for plain FedAvg, uint64 modulo 2^64 for the
secure one, as MPI's SUM does), then the federator's `finish` runs as in a job.
"""

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from fedmpi.fl.fixedpoint import DEFAULT_FRAC_BITS, encode
from fedmpi.fl.masks import mask_peers, mask_stream
from fedmpi.fl.privacy import DifferentialPrivacy, PrivacyError
from fedmpi.fl.secure import SecureAggregator, SecureFedAvg
from fedmpi.fl.strategy import PlainFedAvg, RegionBuffers, RegionRound

F = DEFAULT_FRAC_BITS
REGION_SIZES = {"encoder": 300, "bottleneck": 7, "decoder": 2000}
ROUND = 4


def ranks(num_clients, thetas=None):
    """Federator + clients: each rank's zero weights, then thetas[k] into client k's."""
    out = [RegionBuffers.zeros_like_sizes(REGION_SIZES) for _ in range(num_clients + 1)]
    for k, theta in enumerate(thetas or []):
        for region, values in theta.items():
            out[k + 1].flat[region].copy_(torch.from_numpy(values))
    return out


def random_thetas(num_clients, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return [
        {r: rng.normal(0, scale, n).astype(np.float32) for r, n in REGION_SIZES.items()}
        for _ in range(num_clients)
    ]


def secure_strategies(num_clients, seed=0, neighbors=None):
    """The federator's SecureFedAvg and each client's, after a (simulated) key relay."""
    rng = np.random.default_rng(seed)
    clients = [
        SecureAggregator(k, F, X25519PrivateKey.from_private_bytes(rng.bytes(32)))
        for k in range(num_clients)
    ]
    publics = {c.client_id: c.public_bytes() for c in clients}
    for c in clients:
        c.establish(publics, "run-strategies")
    return [SecureFedAvg(None, F)] + [SecureFedAvg(c, F, neighbors) for c in clients]


def loopback_sum(dst, own, uploads) -> None:
    """The root's `dst` becomes its own summand (`own`, or dst itself when None) plus
    every upload: a SUM Reduce in the buffers' dtype."""
    if isinstance(dst, np.ndarray):  # uint64 arrays wrap modulo 2^64, as MPI.UINT64_T
        acc = (dst if own is None else own).copy()
        for u in uploads:
            acc += u
        dst[...] = acc
    else:
        acc = (dst if own is None else own).clone()
        for u in uploads:
            acc += u
        dst.copy_(acc)


def run_round(strategies, bufs, uploaders, sizes, starts=None):
    """One round of every region through the strategy interface, in the order a job
    calls it. `uploaders`: per region, the reporting clients; `sizes`: every client's
    n_k. Returns, per rank, prepare_client's and begin_round's statistics and its weights
    after them (float64
    copies: what a client uploads, before plain FedAvg packs over them), and per region
    finish's answer."""
    sizes = strategies[0].fedavg_sizes([float(n) for n in sizes])
    jobs = {
        region: RegionRound(region, ROUND, list(ups), [sizes[k] for k in ups])
        for region, ups in uploaders.items()
    }
    round_stats, weights = [], []
    for rank, (strategy, b) in enumerate(zip(strategies, bufs)):
        client = None if rank == 0 else rank - 1
        mine = [job for job in jobs.values() if client in job.uploaders]
        start = starts[rank] if starts is not None else None
        stats = {}
        if client is not None:  # the client step after local training (DP: the clipping)
            stats = strategy.prepare_client(b, [job.region for job in mine], start)
        stats.update(strategy.begin_round(b, ROUND, client, mine, start))
        round_stats.append(stats)
        weights.append({r: t.numpy().astype(np.float64) for r, t in b.flat.items()})
    checked = {}
    for region, job in jobs.items():
        uploads = [strategies[k + 1].upload(bufs[k + 1], job, k) for k in job.uploaders]
        dst, own = strategies[0].receive(bufs[0], job)
        loopback_sum(dst, own, uploads)
        checked[region] = strategies[0].finish(bufs[0], job, dst)
    return round_stats, weights, checked


def exact_average(thetas, sizes, ups, region):
    """sum n_k theta_k / sum n_k in float64."""
    total = sum(sizes[k] for k in ups)
    return sum(sizes[k] * thetas[k][region].astype(np.float64) for k in ups) / total


def federator(bufs, region):
    return bufs[0].flat[region].numpy().astype(np.float64)


ALL = {r: [0, 1, 2] for r in REGION_SIZES}


# --- plain FedAvg ----------------------------------------------------------------------


def test_plain_is_the_exact_weighted_average():
    """Weights 1/4, 1/4, 1/2 and eighths below 16: every product and partial sum of the
    float32 Reduce is exact, so the federator holds the weighted average bit for bit."""
    rng = np.random.default_rng(3)
    thetas = [
        {r: (rng.integers(-128, 128, n) / 8).astype(np.float32) for r, n in REGION_SIZES.items()}
        for _ in range(3)
    ]
    sizes = [10, 10, 20]
    strategies = [PlainFedAvg() for _ in range(4)]
    bufs = ranks(3, thetas)
    round_stats, _, checked = run_round(strategies, bufs, ALL, sizes)
    assert round_stats == [{}] * 4
    assert checked == dict.fromkeys(REGION_SIZES, True)  # a float average: checked for overflow
    for region in REGION_SIZES:
        expect = exact_average(thetas, sizes, [0, 1, 2], region)
        assert np.array_equal(federator(bufs, region), expect)
        assert bufs[0].send[region][-1].item() == 1.0  # the weights summed to 1
    assert strategies[0].value_bytes == 4


def test_plain_random_sizes_subsets_and_left_out():
    """Unequal n_k and per-region reporter subsets: the float32 average within the plain
    path's rounding; a region whose reporters were all left out keeps the federator's
    weights (the sum lands in scratch) and needs no overflow check."""
    thetas = random_thetas(4, seed=5)
    sizes = [123, 4567, 89, 0]  # client 3 left out everywhere
    uploaders = {"encoder": [0, 2], "bottleneck": [1, 2, 3], "decoder": [3]}
    bufs = ranks(4, thetas)
    bufs[0].flat["decoder"].fill_(0.25)  # the federator's previous average
    _, _, checked = run_round([PlainFedAvg() for _ in range(5)], bufs, uploaders, sizes)
    assert checked == {"encoder": True, "bottleneck": True, "decoder": False}
    for region in ("encoder", "bottleneck"):
        ups = uploaders[region]
        expect = exact_average(thetas, sizes, ups, region)
        big = np.max([np.abs(thetas[k][region]) for k in ups], axis=0)
        tol = (len(ups) + 2) * np.spacing(big).astype(np.float64)
        assert np.all(np.abs(federator(bufs, region) - expect) <= tol)
    assert torch.equal(bufs[0].flat["decoder"], torch.full((2000,), 0.25))


# --- secure FedAvg ---------------------------------------------------------------------


@pytest.mark.parametrize("neighbors", [None, 1])
def test_secure_decodes_to_plain_within_its_bound(neighbors):
    """fixedpoint's bound: |secure - exact| <= m 2^-(F+1) / sum n_k (+ the final float32
    rounding), |secure - plain| <= that + (m + 2) ulp(max |theta_k|); the uploads are
    masked, and the masks cancel: the uint64 sum is the sum of the plain encodings."""
    K = 5
    thetas = random_thetas(K, seed=7, scale=0.3)
    sizes = [150, 9000, 4321, 77, 12000]
    secure_bufs, plain_bufs = ranks(K, thetas), ranks(K, thetas)
    strategies = secure_strategies(K, seed=8, neighbors=neighbors)
    uploaders = {r: list(range(K)) for r in REGION_SIZES}
    _, _, checked = run_round(strategies, secure_bufs, uploaders, sizes)
    run_round([PlainFedAvg() for _ in range(K + 1)], plain_bufs, uploaders, sizes)
    assert checked == dict.fromkeys(REGION_SIZES, False)  # integer sums: nothing to overflow
    assert strategies[0].value_bytes == 8 and strategies[0].min_reporters == 2
    ups = list(range(K))
    resolution = K * 2.0 ** -(F + 1) / sum(sizes)
    for region, n in REGION_SIZES.items():
        plain_sum = np.zeros(n + 1, np.uint64)
        for k in ups:
            enc = np.empty(n + 1, np.uint64)
            encode(thetas[k][region], F, K, out=enc[:-1], scale=float(sizes[k]))
            encode(np.array([float(sizes[k])]), F, K, out=enc[-1:])
            masks = np.zeros(n + 1, np.uint64)  # the pairs' masks of this round and region
            for peer in mask_peers(k, ups, neighbors):
                stream = mask_stream(strategies[k + 1].client.secrets[peer], ROUND, region, n + 1)
                masks = masks + stream if k < peer else masks - stream
            assert np.array_equal(strategies[k + 1].words[region], enc + masks)
            assert np.mean(strategies[k + 1].words[region] == enc) < 1e-2  # masked
            plain_sum += enc
        assert np.array_equal(strategies[0].words[region], plain_sum)  # masks cancel
        got, exact = federator(secure_bufs, region), exact_average(thetas, sizes, ups, region)
        ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(got - exact) <= resolution + 0.5 * ulp + 1e-15)
        big = np.max([np.abs(thetas[k][region]) for k in ups], axis=0)
        plain_tol = resolution + (K + 2) * np.spacing(big).astype(np.float64)
        assert np.all(np.abs(got - federator(plain_bufs, region)) <= plain_tol)


def test_secure_all_left_out_keeps_the_weights():
    thetas = random_thetas(3, seed=9)
    bufs = ranks(3, thetas)
    bufs[0].flat["encoder"].fill_(-0.5)
    run_round(secure_strategies(3), bufs, {"encoder": [0, 1, 2]}, [0, 0, 0])
    assert torch.equal(bufs[0].flat["encoder"], torch.full((300,), -0.5))


# --- DP-FedAvg around either -----------------------------------------------------------


def dp_setup(K, inner, clip, z, mode, seed=11, scale=1.0):
    """Clients far outside the clip ball around a common start; DP around `inner()`."""
    rng = np.random.default_rng(seed)
    start = {r: rng.normal(0, 0.1, n).astype(np.float32) for r, n in REGION_SIZES.items()}
    deltas = [
        {r: rng.normal(0, scale, n).astype(np.float32) for r, n in REGION_SIZES.items()}
        for _ in range(K)
    ]
    thetas = [{r: start[r] + d[r] for r in REGION_SIZES} for d in deltas]
    bufs = ranks(K, thetas)
    strategies = [
        DifferentialPrivacy(inner(k), clip, z, mode, rng=np.random.default_rng(100 + k))
        for k in range(K + 1)
    ]
    starts = [{r: torch.from_numpy(start[r].copy()) for r in REGION_SIZES} for _ in range(K + 1)]
    return start, thetas, bufs, strategies, starts


def update_norm(weights, start, regions):
    """One L2 norm of weights - start over these regions."""
    return math.sqrt(sum(float(np.sum((weights[r] - start[r]) ** 2)) for r in regions))


@pytest.mark.parametrize("inner", ["plain", "secure"])
def test_dp_clipping_bounds_every_update(inner):
    """Every client's update of all the regions it uploads, one L2 norm, ends within C;
    the average is start + the uniform mean of the clipped updates (sizes ignored)."""
    K, C = 3, 0.5
    make = (lambda k: PlainFedAvg()) if inner == "plain" else None
    if inner == "secure":
        secure = secure_strategies(K, seed=12)
        make = lambda k: secure[k]
    mode = "central" if inner == "plain" else "distributed"
    start, thetas, bufs, strategies, starts = dp_setup(K, make, C, 0.0, mode)
    uploaders = {"encoder": [0, 1, 2], "decoder": [0, 2]}  # client 1 uploads one region
    round_stats, weights, _ = run_round(strategies, bufs, uploaders, [10, 2000, 5], starts)
    assert round_stats[0] == {}  # the federator clips nothing
    for k in range(K):
        mine = [r for r, ups in uploaders.items() if k in ups]
        before = math.sqrt(
            sum(float(np.sum((thetas[k][r].astype(np.float64) - start[r]) ** 2)) for r in mine)
        )
        st = round_stats[k + 1]
        assert st["dp_update_norm"] == pytest.approx(before, rel=1e-6) and before > 10 * C
        assert st["dp_clipped_norm"] <= C
        assert update_norm(weights[k + 1], start, mine) <= C * (1 + 1e-6)  # what it uploads
    for region, ups in uploaders.items():
        mean = np.mean(
            [weights[k + 1][region] - start[region] for k in ups],
            axis=0,
        )
        got = federator(bufs, region) - start[region]
        assert np.allclose(got, mean, rtol=0, atol=1e-6)
    assert strategies[0].value_bytes == (4 if inner == "plain" else 8)


def test_dp_small_updates_pass_unclipped():
    K, C = 2, 100.0
    start, thetas, bufs, strategies, starts = dp_setup(
        K, lambda k: PlainFedAvg(), C, 0.0, "central", scale=1e-3
    )
    round_stats, weights, _ = run_round(
        strategies, bufs, {r: [0, 1] for r in REGION_SIZES}, [1, 1], starts
    )
    for k in range(K):
        assert round_stats[k + 1]["dp_clipped_norm"] == round_stats[k + 1]["dp_update_norm"]
        for r in REGION_SIZES:
            assert np.array_equal(weights[k + 1][r], thetas[k][r])


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_dp_noise_on_the_sum_has_std_z_times_c(mode):
    """Central: the federator's summand; distributed: every client's share. Either way
    the sum of the uploads minus the sum of the clipped updates has std z C per value,
    within a chi-square interval (seeded generators: deterministic)."""
    K, C, Z = 4, 0.05, 0.7
    start, thetas, bufs, strategies, starts = dp_setup(K, lambda k: PlainFedAvg(), C, Z, mode)
    ups = list(range(K))
    round_stats, weights, _ = run_round(
        strategies, bufs, dict.fromkeys(REGION_SIZES, ups), [5] * K, starts
    )
    clipped = [  # each client's update scaled onto the ball, as the clients clip it
        {
            r: (thetas[k][r].astype(np.float64) - start[r])
            * C
            / round_stats[k + 1]["dp_update_norm"]
            for r in REGION_SIZES
        }
        for k in ups
    ]
    noise = np.concatenate(
        [
            (federator(bufs, r) - start[r]) * K - np.sum([c[r] for c in clipped], axis=0)
            for r in REGION_SIZES
        ]
    )  # the sum (uniform weights) minus the sum of the clipped updates
    ss, n = float(np.sum(noise**2)), noise.size
    lo = math.sqrt(ss / stats.chi2.ppf(1 - 1e-4, n))
    hi = math.sqrt(ss / stats.chi2.ppf(1e-4, n))
    assert lo <= Z * C <= hi
    for k in ups:  # what each client uploads: its clipped update (+ its share, distributed)
        share = np.concatenate([weights[k + 1][r] - start[r] - clipped[k][r] for r in REGION_SIZES])
        if mode == "central":
            assert update_norm(weights[k + 1], start, REGION_SIZES) <= C * (1 + 1e-6)
            assert np.max(np.abs(share)) < 1e-6
        else:  # 1/sqrt(m) of the noise each
            assert np.std(share) == pytest.approx(Z * C / math.sqrt(K), rel=0.1)


def test_dp_wrapper_delegates_and_refuses_central_with_secure():
    secure = secure_strategies(2)[1]
    dp = DifferentialPrivacy(secure, 1.0, 1.0, "distributed", delta=1e-5)
    assert dp.value_bytes == 8 and dp.min_reporters == 2 and not dp.federator_summand
    assert dp.find(SecureFedAvg) is secure and PlainFedAvg().find(SecureFedAvg) is None
    assert dp.fedavg_sizes([3.0, 0.0, 1234.0]) == [1.0, 0.0, 1.0]  # uniform, 0 stays out
    assert PlainFedAvg().epsilon(5) is None and 0 < dp.epsilon(5) < dp.epsilon(10)
    with pytest.raises(PrivacyError, match="privacy.mode=distributed"):
        DifferentialPrivacy(secure, 1.0, 1.0, "central")
