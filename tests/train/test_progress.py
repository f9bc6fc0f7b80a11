"""Live progress (fedmpi.train.progress, fedmpi.dist.relay.ProgressRelay) and the short-run recipe of
fedmpi.train.trainer (LR schedule, EMA) in real federated jobs: progress lines in a batch log,
train.log_every step rows, one client numbering (1..K) everywhere, EMA saved and resumed
bit-exactly."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from mpihelp import mpirun, train

from fedmpi.store.runfolder import RunFolder
from fedmpi.train.progress import Progress, RoundProgress
from fedmpi.train.recipe import LRSchedule


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- displays (no MPI)


def test_batch_lines_at_most_every_30s_or_10_percent():
    clock, lines = FakeClock(), []
    p = Progress(1000, "round 1/3", lines.append, mode="lines", clock=clock)
    for done in range(1, 1001):  # 1 step per 0.1 s: 10% (100 steps) every 10 s
        clock.t += 0.1
        p.update(done)
    assert len(lines) == 9, lines  # at 10%, 20%, ... 90%; the round's own line follows 100%
    assert lines[0].startswith("round 1/3:  10% | 100/1000 steps | elapsed 0:10, ETA 1:30")
    clock2, lines2 = FakeClock(), []
    slow = Progress(1000, "epoch 1/2", lines2.append, mode="lines", clock=clock2)
    for done in range(1, 51):  # 1 step per 4 s: 5% in 200 s, so the 30 s rule decides
        clock2.t += 4.0
        slow.update(done, "8 img/s")
        slow.tick()
    assert len(lines2) == 6 and all(l.endswith("| 8 img/s") for l in lines2), lines2
    off = Progress(10, "x", lines.append, mode="off", clock=clock)
    off.update(5)
    assert off.lines == 0


def test_round_progress_totals_slowest_client_and_eta():
    clock, lines = FakeClock(), []
    rp = RoundProgress(2, 5, 3, lines.append, mode="lines", clock=clock, every_s=30.0)
    clock.t += 20.0
    rp.add(1, 100, 200, 3200)
    rp.add(3, 50, 200, 1600)
    rp.show()  # client 2 has not reported: its steps are assumed, ETA unknown
    assert rp.progress.total == 600 and rp.progress.done == 150
    assert rp.eta() is None
    rp.add(2, 40, 100, 1280)
    rp.show()
    assert rp.progress.total == 500 and rp.progress.done == 190
    assert rp.note() == "304 img/s | slowest client 3 (25%)"
    assert rp.eta() == pytest.approx(60.0)  # client 3: 150 steps left at 2.5 steps/s
    assert rp.progress.line() == (
        "round 2/5:  38% | 190/500 steps | elapsed 0:20, ETA 1:00 | "
        "304 img/s | slowest client 3 (25%)"
    )
    assert len(lines) == 1  # 25% at the first report; 38% is not 10% of the round later
    assert lines[0].endswith("slowest client 3 (25%) | 2/3 clients reporting"), lines


def test_bar_redraws_one_line_that_survives_mpirun_forwarding(capsys):
    """Bar mode: whole lines (mpirun forwards line by line), each redraw first moving
    back up over the previous bar; at most 5 draws a second."""
    clock = FakeClock()
    p = Progress(100, "epoch 1/2", mode="bar", clock=clock)
    for done in range(1, 101):
        clock.t += 0.05
        p.update(done, "9 img/s")
    p.close()
    out = capsys.readouterr().out
    draws = out.split("\n")[:-1]
    assert 20 <= len(draws) <= 27, len(draws)  # 5 s of updates: one draw per 0.2 s (+ close)
    assert draws[0].startswith("epoch 1/2:") and not draws[0].startswith("\x1b")
    assert all(d.startswith("\x1b[F\x1b[Kepoch 1/2:") for d in draws[1:])
    assert "100/100" in draws[-1] and "9 img/s" in draws[-1]


# ---------------------------------------------------------------- the relay under mpirun


@pytest.mark.mpi
@pytest.mark.parametrize("world", [3, 4])
def test_relay_delivers_every_message_within_its_round(world):
    res = mpirun(world, ["tests/mpi_scripts/relay_check.py", "3"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RELAY OK" in res.stdout, res.stdout
    polled, drained = map(int, res.stdout.split("RELAY OK")[1].split()[:2])
    assert polled > 0 and drained > 0  # both paths ran: while waiting, and at the round's end


# ---------------------------------------------------------------- real federated jobs

RECIPE = (
    "--train.ema_decay=0.99",
    "--train.lr_schedule=cosine",
    "--train.warmup_steps=4",
    "--train.lr_min=1e-4",
)


@pytest.mark.mpi
def test_batch_log_shows_progress_steps_and_one_numbering(tmp_path):
    run = tmp_path / "run"
    res = train(
        3,
        run,
        "--fed.local_steps=24",
        "--run.progress_every=0.02",
        "--train.log_every=6",
        "--eval.every=1",
        "--eval.grid=8",
        "--eval.num_samples=8",
        *RECIPE,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # batch mode (pytest's pipes are no tty): plain progress lines of every round
    for r in (1, 2):
        lines = [l for l in res.stdout.splitlines() if l.startswith(f"round {r}/2: ")]
        assert lines, res.stdout
        assert all("steps | elapsed" in l and "slowest client" in l for l in lines), lines
    # the last line names the final grid and the run folder
    last = res.stdout.strip().splitlines()[-1]
    assert last == f"samples: {run}/samples/round_0002.png | run folder: {run}", last
    assert (run / "samples" / "round_0001.png").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    # train.log_every=6: 4 rows per client per round, run-wide step numbers, clients 1..K
    assert sorted((r["round"], r["client"], r["step"]) for r in steps) == sorted(
        (rnd, c, s)
        for rnd in (1, 2)
        for c in (1, 2)
        for s in range(6 * 4 * (rnd - 1) + 6, 24 * rnd + 1, 6)
    )
    clients = [r for r in rows if r["kind"] == "client"]
    assert sorted((r["round"], r["client"]) for r in clients) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all("step_losses" not in r for r in clients)
    # the run-wide schedule (tiny.yaml: lr 1e-3): step 47 of 48, just above train.lr_min
    assert clients[-1]["lr_last"] == pytest.approx(LRSchedule(1e-3, 4, "cosine", 48, 1e-4)(47))
    assert 1e-4 < clients[-1]["lr_last"] < 1.02e-4
    with (run / "comm.csv").open() as f:
        comm = list(csv.DictReader(f))
    assert list(comm[0]) == [
        "round",
        "client",
        "src",
        "dst",
        "region",
        "direction",
        "params",
        "bytes",
    ]
    assert {r["client"] for r in comm} == {"1", "2"}
    assert all(
        (r["src"], r["dst"])
        == ((r["client"], "0") if r["direction"] == "up" else ("0", r["client"]))
        for r in comm
    )
    assert len(comm) == len({tuple(r.values()) for r in comm})  # no duplicated rows
    # the global model's EMA (every rank holds the same): saved once, with the raw weights
    d = RunFolder(run).checkpoint_dir(2)
    fed = torch.load(d / "federator.pt", weights_only=True)
    c1 = torch.load(d / "client_001.pt", weights_only=True)
    assert c1["client"] == 1 and "ema" not in c1
    assert fed["ema"]["updates"] == 48 and fed["ema"]["decay"] == 0.99
    assert any(not torch.equal(v, fed["model"][k]) for k, v in fed["ema"]["shadow"].items())


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["udec", "full"])
def test_resume_with_ema_and_schedule_is_bit_exact(tmp_path, method):
    """UDEC: each client's EMA of its local training (in its own file); FULL: the global
    model's EMA (in federator.pt, read back by every rank). The run resumed from its
    round-1 checkpoint (round 2's removed; same config: the cosine spans fed.rounds) ends
    as the uninterrupted run, EMA included."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = (
        f"--fed.method={method}",
        "--fed.local_steps=6",
        "--run.progress_every=0",
        "--checkpoint.keep=0",
        *RECIPE,
    )
    res = train(3, full, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.copytree(full, part)
    shutil.rmtree(RunFolder(part).checkpoint_dir(2))
    res = train(3, part, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resume: continuing after round 1" in res.stdout
    for name in ("federator.pt", "client_001.pt", "client_002.pt"):
        a = torch.load(RunFolder(full).checkpoint_dir(2) / name, weights_only=True)
        b = torch.load(RunFolder(part).checkpoint_dir(2) / name, weights_only=True)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        holds_ema = (name == "federator.pt") == (method == "full")
        assert ("ema" in a) == ("ema" in b) == holds_ema, name
        if holds_ema:
            assert a["ema"]["updates"] == b["ema"]["updates"] == 12
            assert all(
                torch.equal(v, b["ema"]["shadow"][k]) for k, v in a["ema"]["shadow"].items()
            ), name
