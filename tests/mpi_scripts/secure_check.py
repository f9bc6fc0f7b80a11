"""Under mpirun: fed.secure and privacy.dp through the real Aggregator and transport.

usage: mpirun -n W python tests/mpi_scripts/secure_check.py BACKEND

For every method whose plans allow secure aggregation at this K, from identical random
client models (unequal n_k), rank 0 checks:
- the secure average equals the exact (float64) FedAvg within the fixed-point resolution
  m * 2^-(F+1) / sum(n_k) plus the float32 rounding of the result, and the plain
  (float32) average within that plus the plain path's own float32 rounding, (m + 2)
  ulps of the largest |theta_k|; personal regions stay untouched;
- the masks cancel exactly: the reduced uint64 sum equals the sum of the clients'
  unmasked encodings (gathered for the test only), and no masked upload equals its
  plain encoding;
- the ledger holds 8 * (P + 1) bytes per upload;
- masking with a ring of neighbours (fed.secure_neighbors=1) gives the same average.
Then DP-FedAvg with every client's update far outside the clip ball: the average moves
by the mean clipped update plus noise whose std on the sum is z * C (central, plain;
distributed, secure), within a chi-square interval; the same with one client left out
(its size 0): z * C on the sum of the others, and with fed.secure below
fed.secure_min_reporters reporters no region averaged (Aggregator.withheld).
Prints "SECURE OK <method>" / "DP OK <mode>" on rank 0; exits non-zero on a mismatch.
"""

import math
import sys

import numpy as np
import torch
from scipy import stats

import fedmpi.fl.secure as secure
from fedmpi.config import load_config
from fedmpi.dist.world import World
from fedmpi.fl.aggregate import Aggregator
from fedmpi.fl.ledger import Ledger
from fedmpi.fl.methods import METHODS, fedavg, make_plan
from fedmpi.model.regions import REGIONS, flatten
from fedmpi.model.unet import UNet

world = World(sys.argv[1])
world.start_backend(torch.device("cpu"))


def _abort_on_error(*exc_info):  # an exception on one rank must not leave the others waiting
    sys.__excepthook__(*exc_info)
    sys.stderr.flush()
    world.abort(1)


sys.excepthook = _abort_on_error
K, F = world.num_clients, secure.DEFAULT_FRAC_BITS
ROUND = 3


def fail(msg, code=3):
    print(f"MISMATCH {msg}", flush=True)
    world.abort(code)


def fresh_model(seed):
    torch.manual_seed(seed)
    return UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)


def allowed(method):
    plan = make_plan(method, ROUND, K, seed=11)
    return all(len(plan.uploaders(r)) != 1 for r in REGIONS), plan


secure_cfg = load_config(None, {"fed.secure": True})
for m_index, method in enumerate(METHODS):
    ok, plan = allowed(method)
    if not ok:
        if world.is_federator:
            print(f"SECURE SKIPPED {method} (a region has one reporter at K={K})", flush=True)
        continue
    seed = 1000 * m_index + world.rank  # every rank a different model
    n_k = 0.0 if world.is_federator else float(10 + 7 * world.rank)
    sizes = [float(10 + 7 * (k + 1)) for k in range(K)]  # every client's n_k, on every rank
    plain_model, secure_model = fresh_model(seed), fresh_model(seed)
    before = {r: flatten(plain_model, r) for r in REGIONS}
    uploads = world.comm.gather((before, n_k), root=0)
    Aggregator(world, plain_model, Ledger(world.rank)).exchange(plan, sizes, ROUND)
    ledger = Ledger(world.rank)
    agg = Aggregator(world, secure_model, ledger, secure_cfg)  # key agreement: collective
    agg.exchange(plan, sizes, ROUND)
    if method == "full":  # a ring of 1 neighbour each side: other masks, the same integer sum
        ring_model = fresh_model(seed)
        Aggregator(
            world, ring_model, Ledger(world.rank), secure_cfg.replace({"fed.secure_neighbors": 1})
        ).exchange(plan, sizes, ROUND)
        if not all(
            np.array_equal(flatten(ring_model, r), flatten(secure_model, r)) for r in REGIONS
        ):
            fail(f"rank {world.rank}: secure_neighbors=1 gave another average than all pairs")

    # ledger: uint64 uploads, float32 downloads, for the regions this rank takes part in
    expect = 0
    for region in REGIONS:
        n = agg.sizes[region]
        if world.is_federator:
            expect += 8 * (n + 1) * len(plan.uploaders(region)) + 4 * n * len(
                plan.receivers(region)
            )
        else:
            expect += 8 * (n + 1) * (region in plan.uploads[world.client])
            expect += 4 * n * (region in plan.downloads[world.client])
    if sum(r["bytes"] for r in ledger.pop_round(ROUND)) != expect:
        fail(f"ledger {method} rank {world.rank}", 4)

    # exact cancellation: each client's unmasked encoding (for the test only) vs the sum
    mine = {}
    for region in REGIONS:
        ups = plan.uploaders(region)
        if not world.is_federator and world.client in ups:
            plain_enc = np.empty(agg.sizes[region] + 1, np.uint64)
            secure.encode(before[region], F, len(ups), out=plain_enc[:-1], scale=n_k)
            secure.encode(np.array([n_k]), F, len(ups), out=plain_enc[-1:])
            # the upload again (same round and region: the same masks); the buffer that was
            # sent may hold a partial sum by now (gloo reduces through the senders' buffers)
            masked = agg.secure.client.upload_fedavg(
                before[region], n_k, ROUND, region, ups, out=np.empty_like(plain_enc)
            )
            if np.mean(masked == plain_enc) > 1e-3:
                fail(f"{method} client {world.client} region {region}: upload not masked")
            mine[region] = plain_enc
    encodings = world.comm.gather(mine, root=0)
    results = world.comm.gather({r: flatten(secure_model, r) for r in REGIONS}, root=0)
    plain_results = world.comm.gather({r: flatten(plain_model, r) for r in REGIONS}, root=0)
    if world.is_federator:
        for region in REGIONS:
            ups = plan.uploaders(region)
            if not ups:  # personal everywhere (UDEC's encoder): not aggregated
                continue
            total = np.sum([encodings[k + 1][region] for k in ups], axis=0, dtype=np.uint64)
            if not np.array_equal(total, agg.secure.words[region]):
                fail(f"{method} region {region}: masks did not cancel exactly")
            sizes = [uploads[k + 1][1] for k in ups]
            exact = sum(
                s * uploads[k + 1][0][region].astype(np.float64) for k, s in zip(ups, sizes)
            ) / sum(sizes)
            plain = fedavg([uploads[k + 1][0][region] for k in ups], sizes)
            resolution = len(ups) * 2.0 ** -(F + 1) / sum(sizes)
            ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
            # the plain path rounds n_k * theta_k and the float32 partial sums: its error
            # scales with the largest term, not with the (possibly cancelling) average
            big = np.max([np.abs(uploads[k + 1][0][region]) for k in ups], axis=0)
            plain_tol = resolution + (len(ups) + 2) * np.spacing(big).astype(np.float64)
            for k in [-1] + list(range(K)):  # the federator and every client
                got = results[k + 1][region]
                if k >= 0 and region not in plan.downloads[k]:  # personal: untouched
                    if not np.array_equal(got, uploads[k + 1][0][region]):
                        fail(f"{method} client {k} personal region {region} changed")
                    continue
                err = np.abs(got - exact)
                if np.any(err > resolution + 0.5 * ulp + 1e-15):
                    fail(
                        f"{method} rank {k + 1} region {region}: secure vs exact "
                        f"{err.max():.3g} > {resolution:.3g} + ulp/2"
                    )
                diff = np.abs(got - plain_results[k + 1][region])
                if np.any(diff > plain_tol):
                    i = int(np.argmax(diff - plain_tol))
                    fail(
                        f"{method} rank {k + 1} region {region}: secure vs plain "
                        f"{diff[i]:.3g} > {plain_tol[i]:.3g}"
                    )
        print(
            f"SECURE OK {method} (K={K}, resolution {2.0 ** -(F + 1) * K:.2g}/sum n_k)", flush=True
        )

# ---- DP-FedAvg: clipping bound and noise on the sum, through the transport -----------
# Then with client 1 left out (size 0, as fed.on_nonfinite=skip does): the noise on the
# sum of the m = K - 1 others must still be z * C (shown with fed.secure_min_reporters=1,
# which lets a region of one reporter through at K = 2); with fed.secure and m below
# fed.secure_min_reporters (the default 2, K = 2) every region is withheld: the federator
# keeps its weights instead of decoding one client's upload in the clear. Distributed DP
# always runs with fed.secure (the config refuses it without).
Z, C = 0.5, 0.05
for mode, sec, left_out, min_reporters in (
    ("central", False, False, 2),
    ("distributed", True, False, 2),
    ("distributed", True, True, 1),
    ("distributed", True, True, 2),
):
    cfg = load_config(
        None,
        {
            "privacy.dp": True,
            "privacy.clip": C,
            "privacy.noise_multiplier": Z,
            "privacy.mode": mode,
            "fed.secure": sec,
            "fed.secure_min_reporters": min_reporters,
        },
    )
    model = fresh_model(77)  # the same global model everywhere
    agg = Aggregator(world, model, Ledger(world.rank), cfg)
    start = {r: t.clone() for r, t in agg.flat.items()}
    plan = make_plan("full", 1, K, seed=11)
    if not world.is_federator:  # a local update far outside the clip ball
        with torch.no_grad():
            for t in agg.flat.values():
                t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(world.rank)))
    updates = {r: (agg.flat[r] - start[r]).numpy().astype(np.float64) for r in REGIONS}
    sizes = [0.0 if (left_out and k == 0) else 123.0 for k in range(K)]
    dp = {}
    if not world.is_federator:  # the client step after local training: DP's clipping
        dp = agg.strategy.prepare_client(agg, sorted(plan.uploads[world.client]), start)
    dp.update(agg.exchange(plan, sizes, 1, start=start))
    reports = world.comm.gather((dp, updates), root=0)
    what = f"DP {mode}" + (" with client 1 left out" if left_out else "")
    if world.is_federator:
        norms = [reports[k + 1][0] for k in range(K)]
        if not all(d["dp_update_norm"] > C and d["dp_clipped_norm"] <= C for d in norms):
            fail(f"{what}: clipping bound violated: {norms}", 5)
        reporters = [k for k in range(K) if sizes[k] > 0]
        m = len(reporters)
        if sec and m < cfg.fed.secure_min_reporters:
            if agg.withheld(plan, sizes) != list(REGIONS) or not all(
                torch.equal(agg.flat[r], start[r]) for r in REGIONS
            ):
                fail(f"{what}, secure, {m} reporter(s): not withheld", 7)
            print(
                f"DP OK {mode} (secure={sec}, {m} reporter left: every region withheld)", flush=True
            )
            continue
        sum_noise = []
        for r in REGIONS:
            clipped = [
                reports[k + 1][1][r] * C / reports[k + 1][0]["dp_update_norm"] for k in reporters
            ]
            mean_update = np.sum(clipped, axis=0) / m
            sum_noise.append(
                ((agg.flat[r] - start[r]).numpy().astype(np.float64) - mean_update) * m
            )
        noise = np.concatenate(sum_noise)
        ss, n = float(np.sum(noise**2)), noise.size
        lo = math.sqrt(ss / stats.chi2.ppf(1 - 1e-4, n))
        hi = math.sqrt(ss / stats.chi2.ppf(1e-4, n))
        if not lo <= Z * C <= hi:
            fail(f"{what}: noise std on the sum in [{lo:.4g}, {hi:.4g}], configured {Z * C}", 6)
        print(
            f"DP OK {mode} (secure={sec}, "
            + ("secure_min_reporters=1, " if min_reporters == 1 else "")
            + f"{m} reporters; noise std on the sum "
            f"{math.sqrt(ss / n):.4g}, configured {Z * C:.4g})",
            flush=True,
        )
world.close()
