"""bench/comm.py --quick under mpirun at W=3: the byte ledger matches the analytical rows
for every method and the summary table lists the four methods (< 60 s on 2 cores)."""

from __future__ import annotations

import csv

import pytest
from mpihelp import mpirun

pytestmark = pytest.mark.mpi

METHODS = ("full", "usplit", "udec", "ulatdec")


def test_comm_bench_quick_w3(tmp_path):
    # the paper's UNet at --quick sizes, one timed repeat: the bytes do not depend on timing
    res = mpirun(
        3,
        ["bench/comm.py", "--quick", "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path)],
        timeout=110,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "bytes check: PASS" in res.stdout, out
    summary = res.stdout.split("## summary", 1)[1]
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert {line.split("|")[1].strip() for line in rows[1:]} >= set(METHODS), summary
    with open(tmp_path / "comm_mpi_W3.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == list(METHODS)
    assert all(r["bytes_check"] == "PASS" for r in table)
    assert all(float(r["bytes_per_round"]) == float(r["expected_bytes_per_round"]) for r in table)
    assert (tmp_path / "comm_mpi_W3.png").stat().st_size > 0
