"""fed.secure and privacy.dp under real mpirun (tiny model, 1-2 rounds, both backends).

- tests/mpi_scripts/secure_check.py at W = 3 and 5 on both backends: for every method
  whose plans allow it, the secure average equals the exact and the plain FedAvg within
  the fixed-point resolution, the masks cancel exactly in the integer reduce, and DP's
  noise on the sum has std z * C;
- whole training runs: secure = plain within the resolution, comm.csv with the doubled
  upload bytes, matches_analytical; USPLIT at K = 2 and distributed DP without fed.secure
  refused with exit 2; DP runs report epsilon per round as the accountant computes it,
  with its neighbouring relation, and every client update is clipped.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from mpihelp import load_states, mpirun, train

import fedmpi.fl.privacy as privacy
from fedmpi.fl.ledger import client_rows, read_ledger
from fedmpi.fl.secure import DEFAULT_FRAC_BITS
from fedmpi.model.regions import REGIONS

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("world,backend", [(3, "mpi"), (3, "torch"), (5, "mpi"), (5, "torch")])
def test_secure_aggregation_every_method(world, backend):
    res = mpirun(world, ["tests/mpi_scripts/secure_check.py", backend], timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    methods = ("full", "udec", "ulatdec") + (("usplit",) if world >= 5 else ())
    for method in methods:
        assert f"SECURE OK {method}" in res.stdout, res.stdout
    if world == 3:  # USPLIT at K = 2: one reporter per region, refused
        assert "SECURE SKIPPED usplit" in res.stdout
    assert "DP OK central" in res.stdout and "DP OK distributed" in res.stdout
    # client 1 left out: K - 1 reporters; at K = 2 the secure sum would be one upload
    left = "1 reporter left: every region withheld" if world == 3 else "3 reporters; noise"
    assert f"DP OK distributed (secure=True, {left}" in res.stdout, res.stdout
    # regions of one reporter let through: the K - 1 others' shares still add up to z C
    left = f"secure_min_reporters=1, {world - 2} reporter"
    assert f"DP OK distributed (secure=True, {left}" in res.stdout, res.stdout


def _region(state: dict, region: str):
    """The region's weights in a checkpoint's state dict (None where the file holds none:
    clients store only their personal regions)."""
    parts = [v.numpy().ravel() for k, v in state.items() if k.startswith(region + ".")]
    return np.concatenate(parts).astype(np.float64) if parts else None


@pytest.mark.parametrize("world,backend,method", [(3, "mpi", "udec"), (5, "torch", "usplit")])
def test_secure_run_equals_plain(world, backend, method, tmp_path):
    K = world - 1
    runs = {}
    for secure in (False, True):
        run = runs[secure] = tmp_path / f"secure_{secure}"
        res = train(
            world,
            run,
            f"--fed.method={method}",
            f"--fed.backend={backend}",
            "--fed.rounds=1",
            f"--fed.secure={str(secure).lower()}",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        summary = json.loads((run / "comm_summary.json").read_text())
        assert summary["matches_analytical"] is True
        assert summary["secure"] is secure and summary["upload_value_bytes"] == (8 if secure else 4)
    assert "secure aggregation (uint64, 2^-24)" in res.stdout

    # the same training, so the only difference is the aggregation's rounding: the
    # fixed-point resolution m 2^-(F+1) / sum n_k plus the plain path's float32 rounding
    n_total = 240  # tests/configs/tiny.yaml data.train_subset, split over the clients
    (pf, pc), (sf, sc) = load_states(runs[False], 1, K), load_states(runs[True], 1, K)
    compared = set()
    for rank, (plain, sec) in enumerate(zip([pf] + pc, [sf] + sc)):
        for region in REGIONS:
            a, b = _region(plain, region), _region(sec, region)
            assert (a is None) == (b is None)
            if a is None:
                continue
            compared.add((rank, region))
            tol = K * 2.0 ** -(DEFAULT_FRAC_BITS + 1) / n_total + (K + 2) * float(
                np.spacing(np.float32(np.abs(a).max()))
            )
            assert np.max(np.abs(a - b)) <= tol, (rank, region, np.max(np.abs(a - b)), tol)
    assert {region for rank, region in compared if rank == 0} == set(REGIONS)

    # comm.csv: every upload row exactly doubled (8 bytes per value), downloads unchanged
    def rows(run):
        return {
            (r["round"], r["client"], r["region"], r["direction"]): r
            for r in client_rows(read_ledger(run / "comm.csv"))
        }

    plain_rows, secure_rows = rows(runs[False]), rows(runs[True])
    assert plain_rows.keys() == secure_rows.keys()
    assert any(key[3] == "up" for key in plain_rows)
    for key, row in plain_rows.items():
        up = key[3] == "up"
        assert (
            secure_rows[key]["bytes"]
            == (1 + up) * row["bytes"]
            == (1 + up) * 4 * (row["params"] + up)
        ), key


def test_secure_usplit_at_two_clients_is_refused(tmp_path):
    res = train(3, tmp_path / "run", "--fed.method=usplit", "--fed.secure=true")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "has 1 reporter(s)" in out and "USPLIT at K = 2" in out, out
    assert "fed.secure_min_reporters=1" in out, out  # the way out is named
    assert not (tmp_path / "run" / "comm.csv").exists()  # refused before any work


def test_distributed_dp_without_secure_is_refused(tmp_path):
    """Each upload would carry only its own share of the noise, in the clear."""
    res = train(3, tmp_path / "run", "--privacy.dp=true", "--privacy.mode=distributed")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "'fed.secure' is off" in out and "--fed.secure=true" in out, out
    assert not (tmp_path / "run" / "comm.csv").exists()


@pytest.mark.parametrize(
    "backend,mode,secure", [("mpi", "central", False), ("torch", "distributed", True)]
)
def test_dp_run_reports_epsilon_and_clips(backend, mode, secure, tmp_path):
    C, z, delta, R, K = 0.05, 0.8, 1e-5, 2, 2
    run = tmp_path / "run"
    res = train(
        K + 1,
        run,
        f"--fed.backend={backend}",
        "--fed.method=udec",
        f"--fed.secure={str(secure).lower()}",
        "--privacy.dp=true",
        f"--privacy.clip={C}",
        f"--privacy.noise_multiplier={z}",
        f"--privacy.delta={delta}",
        f"--privacy.mode={mode}",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_round = [r for r in rows if r["kind"] == "round"]
    assert [r["round"] for r in per_round] == list(range(1, R + 1))
    for r in per_round:  # the accountant's epsilon for (q = 1, z, r rounds, delta)
        assert r["epsilon"] == pytest.approx(privacy.epsilon(z, r["round"], delta), rel=1e-12)
        assert r["dp_adjacency"] == privacy.ADJACENCY == "add/remove one client"
        assert f"eps {r['epsilon']:.3g} (delta {delta:g}, add/remove one client)" in res.stdout
    assert f"delta={delta:g} (add/remove one client)" in res.stdout  # the start line
    clients = [r for r in rows if r["kind"] == "client"]
    assert len(clients) == K * R
    for c in clients:  # every client update was clipped (the tiny run moves far more than C)
        assert c["dp_update_norm"] > C and c["dp_clipped_norm"] <= C, c
    summary = json.loads((run / "comm_summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(privacy.epsilon(z, R, delta), rel=1e-12)
    assert summary["privacy"]["mode"] == mode and summary["matches_analytical"] is True
    assert summary["privacy"]["adjacency"] == "add/remove one client"
    assert summary["upload_value_bytes"] == (8 if secure else 4)
    # UDEC: the personal encoder + bottleneck never left the clients (no noise, no upload)
    assert {r["region"] for r in read_ledger(run / "comm.csv") if r["direction"] == "up"} == {
        "decoder"
    }


def test_comm_bench_secure_vs_plain(tmp_path):
    """bench/comm.py --secure runs the real Aggregator both ways on the same weights."""
    res = mpirun(
        3,
        [
            "bench/comm.py",
            "--quick",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--secure",
            "--config",
            "tests/configs/tiny.yaml",
            "--out-dir",
            str(tmp_path),
        ],
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bytes check: PASS" in res.stdout and "## secure vs plain aggregation" in res.stdout
    assert "secure aggregation target (secure <= 2.5x plain)" in res.stdout
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "comm_mpi_W3.csv"))}
    assert rows["usplit"]["secure"] == "a region has one reporter at K=2"  # refused, not timed
    for method in ("full", "udec", "ulatdec"):
        r = rows[method]
        assert r["secure"] == "measured" and r["secure_bytes_check"] == "PASS"
        assert float(r["secure_ms"]) > 0 and float(r["secure_ratio"]) > 0
        # uploads twice as wide, downloads the same. These methods download what they
        # upload (P values down, P + 1 up per transfer), so the plain upload bytes are
        # (plain + 4 * transfers up) / 2, and secure = plain + that
        plain, secure = float(r["bytes_per_round"]), float(r["secure_bytes_per_round"])
        ups = 2 * {"full": 3, "udec": 1, "ulatdec": 2}[method]  # K = 2 clients x regions
        assert secure == plain + (plain + 4 * ups) / 2, (method, plain, secure)
