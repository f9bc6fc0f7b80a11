"""Communication counting (fedmpi.fl.ledger): the paper's table derived from its counting
rule, the "moved" rule, the byte ledger, and `python -m fedmpi.comm`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedmpi.fl.ledger as ledger
from fedmpi.fl.ledger import Ledger, analytical_rows, comparison, summarize
from fedmpi.model.regions import REGIONS

ROOT = Path(__file__).resolve().parents[2]
# The paper's Fashion-MNIST region sizes.
SIZES = {"encoder": 1_280_642, "bottleneck": 999_376, "decoder": 716_297}
P = sum(SIZES.values())
E, B, D = SIZES["encoder"], SIZES["bottleneck"], SIZES["decoder"]
K, R = 10, 15


def expected_paper(method, k=K, r=R):
    """Initial full model to each client + R uploads + (R - 1) downloads (even K)."""
    up_per_client = {
        "full": P,
        "udec": D,
        "ulatdec": B + D,
        # USPLIT, even K: each pair sends E + D + B = P between them
        "usplit": P / 2,
    }[method]
    down_per_client = {"full": P, "udec": D, "ulatdec": B + D, "usplit": P}[method]
    return int(round(k * P + r * k * up_per_client + (r - 1) * k * down_per_client))


def expected_moved(method, k=K, r=R):
    down_per_client = {"full": P, "udec": D, "ulatdec": B + D, "usplit": P}[method]
    return expected_paper(method, k, r) + k * down_per_client


def test_full_paper_total():
    assert K * P + R * K * P + (R - 1) * K * P == 898_894_500  # the paper's 898.9M
    res = comparison("full", K, R, SIZES, seed=2023)
    assert res["paper"]["params"] == 898_894_500
    assert res["paper"]["reduction_vs_full"] == 0


@pytest.mark.parametrize("method,reduction", [("udec", 73.6), ("ulatdec", 41.3), ("usplit", 25.0)])
def test_paper_reductions(method, reduction):
    res = comparison(method, K, R, SIZES, seed=2023)
    assert res["paper"]["params"] == expected_paper(method)
    assert res["paper"]["full_params"] == expected_paper("full")
    red = 100 * (1 - expected_paper(method) / expected_paper("full"))
    assert red == pytest.approx(reduction, abs=0.05)  # the paper's figure, to 0.1 point
    assert 100 * res["paper"]["reduction_vs_full"] == pytest.approx(red, abs=1e-9)


@pytest.mark.parametrize("method", ["full", "usplit", "udec", "ulatdec"])
@pytest.mark.parametrize("k,r", [(10, 15), (2, 3), (4, 1)])
def test_moved_adds_one_round_of_downloads(method, k, r):
    res = comparison(method, k, r, SIZES, seed=5)
    assert res["paper"]["params"] == expected_paper(method, k, r)
    assert res["moved"]["params"] == expected_moved(method, k, r)
    rows = analytical_rows(method, k, r, SIZES, seed=5)
    last_down = sum(x["params"] for x in rows if x["round"] == r and x["direction"] == "down")
    assert res["moved"]["params"] - res["paper"]["params"] == last_down
    last_down_bytes = sum(x["bytes"] for x in rows if x["round"] == r and x["direction"] == "down")
    assert res["moved"]["bytes"] - res["paper"]["bytes"] == last_down_bytes == 4 * last_down


def test_bytes_carry_one_float_per_uploaded_region():
    res = summarize(analytical_rows("full", K, R, SIZES, 0), R)
    uploads = R * K * len(REGIONS)  # one buffer per region per client per round
    assert res["paper"]["bytes"] == 4 * res["paper"]["params"] + 4 * uploads
    assert res["moved"]["bytes"] == 4 * res["moved"]["params"] + 4 * uploads
    res = summarize(analytical_rows("udec", K, R, SIZES, 0), R)
    assert res["paper"]["bytes"] == 4 * res["paper"]["params"] + 4 * R * K


@pytest.mark.parametrize("k", [3, 5, 7])
def test_usplit_odd_k_rows_follow_the_plan(k):
    from fedmpi.fl.methods import make_plan

    r = 4
    rows = analytical_rows("usplit", k, r, SIZES, seed=11)
    for rnd in range(1, r + 1):
        plan = make_plan("usplit", rnd, k, 11)
        up = sum(x["params"] for x in rows if x["round"] == rnd and x["direction"] == "up")
        assert up == sum(SIZES[g] for u in plan.uploads for g in u)
        down = sum(x["params"] for x in rows if x["round"] == rnd and x["direction"] == "down")
        assert down == k * P
    # round 0: the full initial model to every client, nothing uploaded
    r0 = [x for x in rows if x["round"] == 0]
    assert all(x["direction"] == "down" for x in r0)
    assert sum(x["params"] for x in r0) == k * P
    # clients numbered 1..K (their ranks); each row names both ends, 0 = the federator
    assert {x["client"] for x in rows} == set(range(1, k + 1))
    assert all(
        (x["src"], x["dst"]) == ((x["client"], 0) if x["direction"] == "up" else (0, x["client"]))
        for x in rows
    )


def test_summary_per_client_and_round():
    res = summarize(analytical_rows("ulatdec", 4, 3, SIZES, 0), 3)
    assert set(res["per_client"]) == {1, 2, 3, 4}
    assert set(res["per_round"]) == {0, 1, 2, 3}
    for c in res["per_client"].values():
        assert c["up_params"] == 3 * (B + D)
        assert c["down_params"] == P + 3 * (B + D)
    assert res["per_round"][0] == {"up_params": 0, "down_params": 4 * P, "bytes": 16 * P}
    total = sum(c["up_params"] + c["down_params"] for c in res["per_client"].values())
    assert total == res["moved"]["params"]
    # federator rows (client -1) are not counted twice
    rows = analytical_rows("ulatdec", 4, 3, SIZES, 0)
    rows.append(ledger.transfer(1, -1, "decoder", "up", D, 4 * D))
    assert summarize(rows, 3)["moved"] == res["moved"]


def test_ledger_record_sizes():
    led = Ledger(rank=3)
    led.record(1, 2, "decoder", "up", 1000)
    led.record(1, 2, "decoder", "down", 1000)
    led.record(2, 2, "encoder", "up", 7)
    assert led.rows[0][6] == 4 * 1001  # n_k travels with the upload as one more float32
    assert led.rows[1][6] == 4 * 1000
    assert led.round_bytes(1) == 4 * 1001 + 4 * 1000
    assert led.round_bytes(2) == 4 * 8
    assert led.round_bytes(3) == 0
    d = led.dicts()[0]  # World.client 2 is client 3, rank 3
    assert d == {
        "round": 1,
        "client": 3,
        "src": 3,
        "dst": 0,
        "region": "decoder",
        "direction": "up",
        "params": 1000,
        "bytes": 4004,
    }
    assert led.dicts()[1]["src"] == 0 and led.dicts()[1]["dst"] == 3
    assert ledger.upload_bytes(0) == 4 and ledger.download_bytes(0) == 0


def test_csv_round_trip(tmp_path):
    rows = analytical_rows("usplit", 3, 2, SIZES, 1)
    ledger.write_ledger(rows, tmp_path / "comm.csv")
    assert ledger.read_ledger(tmp_path / "comm.csv") == rows


def test_comm_csv_one_row_per_transfer(tmp_path):
    """What the federator appends per round: every rank's rows; the federator's mirror
    records (client -1, one per client, identical) are not written."""
    fed, c1, c2 = Ledger(rank=0), Ledger(rank=1), Ledger(rank=2)
    for led, client in ((c1, 0), (c2, 1)):
        led.record(1, client, "decoder", "up", 10)
        led.record(1, client, "decoder", "down", 10)
    for _ in range(2):
        fed.record(1, -1, "decoder", "up", 10)
        fed.record(1, -1, "decoder", "down", 10)
    ledger.append_rows(fed.pop_round(1) + c1.pop_round(1) + c2.pop_round(1), tmp_path / "c.csv")
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines == [
        "round,client,src,dst,region,direction,params,bytes",
        "1,1,1,0,decoder,up,10,44",
        "1,1,0,1,decoder,down,10,40",
        "1,2,2,0,decoder,up,10,44",
        "1,2,0,2,decoder,down,10,40",
    ]


def test_old_comm_csv_layout_is_read_as_the_new(tmp_path):
    """Run folders written before (rank + 0-based client columns, federator rows)."""
    old = tmp_path / "old.csv"
    old.write_text(
        "round,rank,client,region,direction,params,bytes\n"
        "0,1,0,encoder,down,5,20\n0,0,-1,encoder,down,5,20\n"
        "1,2,1,decoder,up,3,16\n1,0,-1,decoder,up,3,16\n"
    )
    assert ledger.read_ledger(old) == [
        ledger.transfer(0, 1, "encoder", "down", 5, 20),
        ledger.transfer(1, 2, "decoder", "up", 3, 16),
    ]


def test_comm_cli_prints_paper_table():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmpi.comm",
            "--config",
            str(ROOT / "configs/paper/fmnist_full.yaml"),
            "--clients",
            "10",
            "--rounds",
            "15",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "898,894,500" in res.stdout
    table = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s*(FULL|USPLIT|UDEC|ULATDEC)\s+10\s+15\s+([\d,]+)", line)
        if m:
            table[m.group(1).lower()] = int(m.group(2).replace(",", ""))
    assert table == {m: expected_paper(m) for m in ("full", "usplit", "udec", "ulatdec")}
