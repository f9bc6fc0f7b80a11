"""Multi-rank tests: real mpirun launched from pytest (tiny model, 1-2 rounds)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from mpihelp import ROOT, load_states, mpi_env, mpirun, mpirun_path, train

from fedmpi.fl.ledger import analytical_rows, read_ledger, summarize
from fedmpi.model.regions import REGIONS
from fedmpi.store.runfolder import RunFolder

pytestmark = pytest.mark.mpi


def region_equal(a: dict, b: dict, region: str) -> bool:
    keys = [k for k in a if k.startswith(region + ".")]
    assert keys
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("backend", ["mpi", "torch"])
@pytest.mark.parametrize("world", [3, 4])
def test_aggregation_equals_numpy_fedavg(backend, world):
    res = mpirun(world, ["tests/mpi_scripts/aggregate_check.py", backend], timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    for method in ("full", "usplit", "udec", "ulatdec"):
        assert f"AGGREGATE OK {method}" in res.stdout.splitlines()
        assert f"STAGED AGGREGATE OK {method}" in res.stdout  # through host buffers
    assert "NONFINITE OK" in res.stdout  # the federator's check of the averages
    if world == 4:  # 6 proper subgroups through a cache of 2: evicted, freed, rebuilt
        assert "GROUP CACHE OK" in res.stdout, res.stdout


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("method", ["full", "usplit", "udec", "ulatdec"])
def test_method_run(method, world, tmp_path):
    run = tmp_path / "run"
    res = train(world, run, f"--fed.method={method}")
    assert res.returncode == 0, res.stdout + res.stderr
    K, R = world - 1, 2
    fed, clients = load_states(run, R, K)
    shared = {
        "full": REGIONS,
        "usplit": REGIONS,
        "udec": ("decoder",),
        "ulatdec": ("bottleneck", "decoder"),
    }[method]
    for region in REGIONS:
        for c in clients:
            if region in shared:  # every client holds the federator's average
                assert region_equal(c, fed, region), (method, region)
        if region not in shared:  # personal regions trained on different data differ
            assert not region_equal(clients[0], clients[1], region), (method, region)
    # the ledger is exactly the analytical table, and the summary says so
    summary = json.loads((run / "comm_summary.json").read_text())
    assert summary["matches_analytical"] is True
    cfg_seed = 7
    sizes = {r: sum(v.numel() for k, v in fed.items() if k.startswith(r + ".")) for r in REGIONS}
    expected = summarize(analytical_rows(method, K, R, sizes, cfg_seed), R)
    measured = summarize(read_ledger(run / "comm.csv"), R)
    assert measured["moved"] == expected["moved"]
    rounds = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    per_round = [r for r in rounds if r["kind"] == "round"]
    assert [r["round"] for r in per_round] == [1, 2]
    assert all(len(r["client_loss"]) == K for r in per_round)
    assert all(r["agg_s"] >= 0 and r["train_s"] > 0 for r in per_round)


def test_resume_matches_uninterrupted(tmp_path):
    """Stop after round 1, resume to round 2: same weights as one uninterrupted run
    (UDEC keeps personal regions on clients; Adam state kept across rounds; fp16, whose
    loss scale and its growth count are part of a client's state)."""
    opts = ["--fed.method=udec", "--fed.reset_optimizer=false", "--train.precision=fp16"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(3, full, *opts).returncode == 0
    first = train(3, part, *opts, "--fed.rounds=1")
    assert first.returncode == 0, first.stderr
    assert RunFolder(part).latest_complete() == 1
    second = train(3, part, *opts, "--fed.rounds=2")
    assert second.returncode == 0, second.stderr
    assert "continuing after round 1" in second.stdout
    fa, ca = load_states(full, 2, 2)
    fb, cb = load_states(part, 2, 2)
    for a, b in zip([fa, *ca], [fb, *cb]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for k in (1, 2):
        name = f"client_{k:03d}.pt"
        sa, sb = (
            torch.load(RunFolder(run).checkpoint_dir(2) / name, weights_only=True)["scaler"]
            for run in (full, part)
        )
        assert sa["_growth_tracker"] == 4 and sa == sb  # 2 rounds x 2 steps, none skipped
    rows = read_ledger(part / "comm.csv")
    assert rows == read_ledger(full / "comm.csv")  # no round counted twice


PREEMPT_OPTS = ["--fed.rounds=3", "--fed.local_steps=15", "--fed.method=full"]


@pytest.fixture(scope="module")
def preempt_reference(tmp_path_factory):
    """The uninterrupted run both preemption tests compare with (same config: one job)."""
    ref = tmp_path_factory.mktemp("preempt") / "ref"
    res = train(3, ref, *PREEMPT_OPTS)
    assert res.returncode == 0, res.stdout + res.stderr
    return ref


@pytest.mark.parametrize("how", ["signal", "file"])
def test_preemption_checkpoints_and_resumes(how, tmp_path, preempt_reference):
    """SIGUSR1 to mpirun (or the RUN_DIR/PREEMPT file) mid-run: every rank stops
    consistently with exit 75 and a resumed run ends with the same weights as an
    uninterrupted one."""
    opts = PREEMPT_OPTS
    ref, run = preempt_reference, tmp_path / "run"
    cmd = [
        mpirun_path(),
        "-n",
        "3",
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        "-m",
        "fedmpi.train",
        "--config",
        "tests/configs/tiny.yaml",
        "--run-dir",
        str(run),
        *opts,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while (
        RunFolder(run).latest_complete() is None and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.2)
    if how == "signal":
        proc.send_signal(signal.SIGUSR1)
    else:
        (run / "PREEMPT").touch()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, out + err
    done = RunFolder(run).latest_complete()
    assert done in (1, 2)
    assert "preempted" in out
    resumed = train(3, run, *opts)
    assert resumed.returncode == 0, resumed.stderr
    assert not (run / "PREEMPT").exists()
    assert f"continuing after round {done}" in resumed.stdout
    fa, ca = load_states(ref, 3, 2)
    fb, cb = load_states(run, 3, 2)
    for a, b in zip([fa, *ca], [fb, *cb]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_ledger(run / "comm.csv") == read_ledger(ref / "comm.csv")


def test_failing_rank_ends_job(tmp_path):
    start = time.time()
    res = mpirun(
        4,
        [
            "tests/mpi_scripts/fail_rank.py",
            "2",
            "--",
            "--config",
            "tests/configs/tiny.yaml",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        timeout=120,
    )
    assert res.returncode != 0
    assert "injected failure on rank 2" in res.stderr
    assert time.time() - start < 120


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    res = train(3, tmp_path / "run", "--split.num_clients=5")
    assert res.returncode == 2
    assert "split.num_clients is 5" in res.stdout and "mpirun -n 6" in res.stdout


def test_personal_models_scored_before_or_after_aggregation(tmp_path):
    """eval.personal=local samples each UDEC client's own model before the round's
    aggregation (the reference), aggregated after it: same training, other pictures."""
    runs = {}
    for mode in ("local", "aggregated"):
        run = tmp_path / mode
        res = train(
            3,
            run,
            "--fed.method=udec",
            "--fed.rounds=1",
            "--eval.grid=4",
            "--eval.num_samples=4",
            "--eval.batch_size=4",
            f"--eval.personal={mode}",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        runs[mode] = sorted((run / "samples").glob("round_0001_client_*.png"))
        assert len(runs[mode]) == 2
    fa, ca = load_states(tmp_path / "local", 1, 2)
    fb, cb = load_states(tmp_path / "aggregated", 1, 2)
    assert all(torch.equal(a[k], b[k]) for a, b in zip([fa, *ca], [fb, *cb]) for k in a)
    for a, b in zip(runs["local"], runs["aggregated"]):
        assert a.read_bytes() != b.read_bytes()
