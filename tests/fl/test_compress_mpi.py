"""fed.compress under real mpirun.

- tests/mpi_scripts/compress_check.py: every scheme's aggregate equals the
  decompress-then-average of what the clients sent (int8 bit-exactly, also masked under
  fed.secure; bf16 and top-k within float32 accumulation), with error feedback's
  residuals checked on every client, on both backends and every method;
- the ledger against Open MPI's own count (pml monitoring): the bytes of 3 more rounds
  of exchanges, as the ledger records them and as the PML counts them, for every scheme;
- a training run with int8 + error feedback resumes bit-exactly (the residuals are in the
  client checkpoints) and its comm.csv matches the analytical table.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from mpihelp import mpirun, train_and_resume

from fedmpi.store.runfolder import RunFolder

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize(
    "backend,scheme,secure,method",
    [
        ("mpi", "int8", "plain", "full"),
        ("mpi", "int8", "plain noef", "udec"),
        ("mpi", "int8", "secure", "usplit"),
        ("torch", "int8", "secure", "udec"),
        ("mpi", "bf16", "plain", "udec"),
        ("torch", "bf16", "plain", "full"),
        ("mpi", "topk", "plain", "ulatdec"),
        ("torch", "topk", "plain", "usplit"),
    ],
)
def test_aggregate_is_the_average_of_the_decompressed_uploads(backend, scheme, secure, method):
    secure, *flags = secure.split()
    args = ["tests/mpi_scripts/compress_check.py", backend, scheme, secure, method, "3", *flags]
    res = mpirun(5, args, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"COMPRESS OK {scheme} {method} secure={secure == 'secure'} rounds=3" in res.stdout


def _monitored(tmp_path, scheme: str, secure: str, rounds: int) -> tuple[int, int]:
    """(ledger bytes, Open MPI's PML count of bytes sent) of one monitored launch."""
    prefix = tmp_path / f"{scheme}_{secure}_{rounds}"
    args = [
        "--mca",
        "pml_monitoring_enable",
        "2",
        "--mca",
        "pml_monitoring_enable_output",
        "3",
        "--mca",
        "pml_monitoring_filename",
        str(prefix),
    ]
    script = ["tests/mpi_scripts/compress_check.py", "mpi", scheme, secure, "full"]
    res = mpirun(5, script + [str(rounds), "wire"], timeout=240, mpirun_args=args)
    assert res.returncode == 0, res.stdout + res.stderr
    ledger = int(re.search(r"LEDGER BYTES (\d+)", res.stdout).group(1))
    wire = 0
    for f in tmp_path.glob(f"{prefix.name}.*.prof"):
        for line in f.read_text().splitlines():
            fields = line.split("\t")
            if fields[0] in ("E", "I"):  # external and internal (collective) messages
                wire += int(fields[3].split()[0])
    assert wire > 0, "pml monitoring wrote no counts"
    return ledger, wire


@pytest.mark.parametrize(
    "scheme,secure", [("none", "plain"), ("bf16", "plain"), ("int8", "secure"), ("topk", "plain")]
)
def test_ledger_matches_open_mpi_wire_count(scheme, secure, tmp_path):
    """Launches of 1 and 4 rounds differ only by 3 rounds of exchanges: the ledger's
    difference and Open MPI's must agree within [1.00, 1.02]."""
    l1, w1 = _monitored(tmp_path, scheme, secure, 1)
    l4, w4 = _monitored(tmp_path, scheme, secure, 4)
    ratio = (w4 - w1) / (l4 - l1)
    assert 1.0 <= ratio <= 1.02, (scheme, l4 - l1, w4 - w1)


def test_int8_error_feedback_resumes_bit_exactly(tmp_path):
    """int8 + error feedback (under FedAvgM, a wrapper around it), 3 client ranks:
    stopping after round 1 and resuming gives the uninterrupted run's models (the
    residuals are in the client checkpoints) and the ledger matches the analytical table."""
    opts = ["--fed.compress=int8", "--fed.error_feedback=true", "--fed.server_opt=fedavgm"]
    full, part = train_and_resume(4, tmp_path, *opts)
    for name in ("federator.pt", "client_001.pt", "client_003.pt"):
        a = torch.load(RunFolder(full).checkpoint_dir(2) / name, weights_only=False)
        b = torch.load(RunFolder(part).checkpoint_dir(2) / name, weights_only=False)
        for key in ("model", "error_feedback"):
            if key in a:
                assert a[key].keys() == b[key].keys()
                assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)
    ef = torch.load(RunFolder(full).checkpoint_dir(2) / "client_002.pt", weights_only=False)
    assert ef["error_feedback"] and all(t.abs().sum() > 0 for t in ef["error_feedback"].values())
    summary = json.loads((full / "comm_summary.json").read_text())
    assert summary["matches_analytical"] and summary["compress"] == "int8"
