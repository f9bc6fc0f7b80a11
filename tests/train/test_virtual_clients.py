"""Virtual clients on real mpirun: more clients than ranks, sampled each round.

- fed.clients at its default (one client per rank) reproduces, bit for bit, runs written
  before virtual clients existed (tests/train/data/one_client_per_rank.json);
- placement does not change the result: the same N clients, seed and sampling give the
  same models on 3 ranks and on 5 ranks, for every method;
- a run with several clients per rank (personal regions spilled to the run folder)
  resumes bit-exactly;
- DP with Poisson sampling reports the subsampled accountant's epsilon and keeps its
  sampling key secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from mpihelp import train, train_and_resume

from fedmpi.fl.privacy import epsilon
from fedmpi.model.regions import REGIONS
from fedmpi.store.runfolder import RunFolder

pytestmark = pytest.mark.mpi
STORED = Path(__file__).parent / "data" / "one_client_per_rank.json"


def tensor_digest(obj) -> str:
    """sha256[:16] over every tensor of a checkpoint's model, optimizer and EMA, by path."""
    h = hashlib.sha256()

    def walk(o, pre=""):
        if torch.is_tensor(o):
            h.update(pre.encode())
            h.update(o.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{pre}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{pre}[{i}]")

    walk({k: obj.get(k) for k in ("model", "optimizer", "ema")})
    return h.hexdigest()[:16]


def load(run: Path, index: int) -> dict:
    d = RunFolder(run).checkpoint_dir(index)
    return {f.name: torch.load(f, weights_only=False) for f in sorted(d.glob("*.pt"))}


def client_regions(run: Path, files: dict) -> dict:
    """client id -> its personal regions: every rank's checkpoint file indexes its
    clients' state files (state/rank_NNN/client_CCCCCC_rRRRRRR.pt, sha256 checked)."""
    out = {}
    for name, obj in files.items():
        if not name.startswith("client_"):
            continue
        folder = RunFolder(run).client_state_dir(int(name[7:10]))
        for c, (v, sha) in (obj.get("client_states") or {}).items():
            path = folder / f"client_{c:06d}_r{v:06d}.pt"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
            out[c] = torch.load(path, weights_only=True)
    return out


@pytest.mark.parametrize("method", ["full", "udec"])
def test_default_clients_reproduce_the_stored_run(method, tmp_path):
    run = tmp_path / method
    opts = ["--fed.reset_optimizer=false", "--train.ema_decay=0.9", f"--fed.method={method}"]
    res = train(4, run, *opts)
    assert res.returncode == 0, res.stdout + res.stderr
    stored = json.loads(STORED.read_text())["runs"][method]
    got = {name: tensor_digest(obj) for name, obj in load(run, 2).items()}
    assert got == stored


@pytest.mark.parametrize("method", ["full", "usplit", "udec", "ulatdec"])
def test_placement_does_not_change_the_result(method, tmp_path):
    """6 clients, 3 sampled per round, 2 rounds, on 2 client ranks and on 4: the same global model
    and the same personal regions, to float32 rounding (a rank averages its clients
    first, so the sums are added in another order)."""
    opts = [f"--fed.method={method}", "--fed.clients=6", "--fed.participation=0.5"]
    runs = {}
    for n in (3, 5):
        runs[n] = tmp_path / f"n{n}"
        res = train(n, runs[n], *opts)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "N=6 clients on" in res.stdout
    a, b = load(runs[3], 2), load(runs[5], 2)
    fa, fb = a["federator.pt"]["model"], b["federator.pt"]["model"]
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-6)
    before = load(runs[3], 1)["federator.pt"]["model"]
    assert any(not torch.equal(fa[k], before[k]) for k in fa)  # round 2 did train
    pa, pb = client_regions(runs[3], a), client_regions(runs[5], b)
    if method in ("udec", "ulatdec"):
        assert pa.keys() == pb.keys() and len(pa) >= 3  # the clients that trained
        for c in pa:
            for r in pa[c]:
                torch.testing.assert_close(pa[c][r], pb[c][r], rtol=1e-5, atol=1e-6)
    placement = RunFolder(runs[3]).read_placement()
    assert sorted(int(r["rank"]) for r in placement) == [1, 1, 1, 2, 2, 2]


def test_several_clients_per_rank_resume_bit_exactly(tmp_path):
    """UDEC, 8 clients on 2 ranks, half of them per round, personal regions in the run
    folder's state files with a cache smaller than one client's state
    (fed.client_state_mb): stopping after round 1 and resuming gives the same checkpoint
    as the uninterrupted run; only files a checkpoint refers to are kept."""
    opts = [
        "--fed.method=udec",
        "--fed.clients=8",
        "--fed.participation=0.5",
        "--fed.client_state_mb=0.05",
    ]
    full, part = train_and_resume(3, tmp_path, *opts)
    files = {p.name for p in (part / "state").glob("rank_*/client_*_r*.pt")}
    referenced = set()
    for index in (load(part, 1), load(part, 2)):
        for obj in index.values():
            for c, (v, _) in (obj.get("client_states") or {}).items():
                referenced.add(f"client_{c:06d}_r{v:06d}.pt")
    assert files and files == referenced  # nothing else kept
    a, b = load(full, 2), load(part, 2)
    assert a.keys() == b.keys()
    for name in a:
        assert tensor_digest(a[name]) == tensor_digest(b[name]), name
    ca, cb = client_regions(full, a), client_regions(part, b)
    assert ca.keys() == cb.keys() and ca
    for c in ca:
        assert all(torch.equal(ca[c][r], cb[c][r]) for r in ca[c])
    personal = {"encoder", "bottleneck"}
    assert all(set(regions) == personal for regions in ca.values())
    assert set(REGIONS) - personal == {"decoder"}


def test_dp_with_poisson_sampling(tmp_path):
    """Central DP over 10 Poisson-sampled clients on 2 ranks: the round rows carry the
    subsampled Gaussian's epsilon, the secret sampling key is the owner's alone, and the
    ledger still matches the analytical table (drawn with that key)."""
    run = tmp_path / "dp"
    q, z = 0.3, 1.2
    res = train(
        3,
        run,
        "--fed.clients=10",
        f"--fed.participation={q}",
        "--fed.sampling=poisson",
        "--privacy.dp=true",
        f"--privacy.noise_multiplier={z}",
        "--fed.rounds=3",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    assert len(rounds) == 3
    for r in rounds:
        assert r["epsilon"] == pytest.approx(epsilon(z, r["round"], 1e-5, q), rel=1e-9)
        assert r["epsilon"] < epsilon(z, r["round"], 1e-5, 1.0)  # amplified by sampling
    key = run / "sampling.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    summary = json.loads((run / "comm_summary.json").read_text())
    assert summary["matches_analytical"] is True
    assert sum(r["participants"] for r in rounds) > 0


def test_server_optimizer_and_fedprox_resume_bit_exactly(tmp_path):
    """FedAdam on the averages and FedProx's term, 6 clients on 2 ranks: the server
    optimizer's moments are the federator's checkpoint state, so stopping after round 1
    and resuming gives the uninterrupted run's models."""
    opts = ["--fed.clients=6", "--fed.server_opt=fedadam", "--fed.server_lr=0.01"]
    opts.append("--fed.prox_mu=0.1")
    full, part = train_and_resume(3, tmp_path, *opts)
    a, b = load(full, 2)["federator.pt"], load(part, 2)["federator.pt"]
    assert tensor_digest(a) == tensor_digest(b)
    moments = a["server_opt"]["regions"]
    assert set(moments) == set(REGIONS)
    assert all(torch.equal(moments[r]["v"], b["server_opt"]["regions"][r]["v"]) for r in REGIONS)
    assert all(moments[r]["v"].abs().sum() > 0 for r in REGIONS)  # FedAdam stepped


def test_int8_with_several_clients_per_rank_resumes_bit_exactly(tmp_path):
    """int8 + error feedback, 8 sampled clients on 2 ranks: each rank compresses its
    clients' mean and keeps the residual; stopping after round 1 and resuming gives the
    same checkpoint (residuals included) as the uninterrupted run, and every trained
    client's metrics row carries its rank's upload norms."""
    opts = ["--fed.compress=int8", "--fed.clients=8", "--fed.participation=0.5"]
    full, part = train_and_resume(3, tmp_path, *opts)
    a, b = load(full, 2), load(part, 2)
    assert a.keys() == b.keys()
    for name in a:
        assert tensor_digest(a[name]) == tensor_digest(b[name]), name
        if name.startswith("client_"):  # each client rank's residuals, every region
            ea, eb = a[name]["error_feedback"], b[name]["error_feedback"]
            assert sorted(ea) == sorted(eb) == sorted(REGIONS), name
            assert all(torch.equal(ea[k], eb[k]) for k in ea), name
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r.get("kind") == "client"]
    assert clients and all(r["rank_update_norm"] > 0 for r in clients)
    assert any(r["rank_ef_residual_norm"] > 0 for r in clients if r["round"] == 2)
    assert not any("update_norm" in r for r in clients)  # a client's own: not measured
