"""What saved bytes are worth in time: fedmpi's exchange on a slow network.

Every rank runs in its own Linux network namespace, joined by a veth pair to a bridge in
a hub namespace, each client's link shaped both ways with a token bucket (tc tbf) at
--mbit (default 10, 100 and 1000 Mbit/s); Open MPI talks TCP between the namespaces
(btl tcp, no shared memory). See bench/_netns.py. This kernel has no netem: only
bandwidth is limited, no latency or loss is added, so the numbers are a lower bound for
a real WAN.

Per bandwidth, one launch of bench/_wan_exchange.py times a round's exchange (the job's
`Aggregator.exchange`, 1 federator + 2 clients, the quickstart UNet) for each method x
upload scheme: communication seconds per round and the bytes the ledger counts (and the
bytes the veths carried, TCP/IP headers included). Then one real training job
(`fedmpi.train`, FULL with int8 + error feedback, 2 rounds) runs inside the namespaces
at the middle bandwidth, to show the job itself runs there and that its per-round
aggregation time matches the exchange's.

Training seconds per round and the score after R rounds come from the quality grid
(bench/compress_quality.py, on the same config and seed, unshaped: training does not use
the network); a round's wall time at bandwidth B is train_s + comm_s(B). The report
gives, per bandwidth: round time, its speed-up over FULL uncompressed, and the time to
reach the target score (FULL uncompressed's final fd_classifier + --target-slack) within
the R rounds; and per method x scheme the highest measured bandwidth at which it is at
least 5% faster per round than FULL uncompressed (where its saved bytes start to pay).

    sudo python bench/wan.py                  # 4 methods x 4 schemes at 10, 100, 1000 Mbit/s
    sudo python bench/wan.py --reduced        # FULL and UDEC x none, int8+EF, topk+EF
Needs root (network namespaces); stops with one line without it. Removes every
namespace, link and process it made, also after a failure, and checks that none is left.
Writes wan.{md,json} to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common as C
import _netns

from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import format_table

METHODS = ("full", "usplit", "udec", "ulatdec")
SCHEMES = ("none", "bf16", "int8+EF", "topk+EF")
REDUCED = [(m, s) for m in ("full", "udec") for s in ("none", "int8+EF", "topk+EF")]
JOB = ("full", "int8+EF")  # the real training job's combination
PAYS = 0.95  # a round at most 95% of FULL uncompressed's: the saved bytes pay


def run_inside(net: _netns.Network, argv: list[str], what: str, timeout: float) -> None:
    """`python ARGV` as an MPI job with every rank in its namespace; RuntimeError naming
    `what` with the output's tails if it fails."""
    cmd, env = net.launch()
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        cmd + [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def measure(net: _netns.Network, combos, args) -> tuple[list[dict], dict]:
    """Exchange timings of every combination on this network; veth bytes per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        script = [str(ROOT / "bench" / "_wan_exchange.py")]
        script += ["--config", args.config, "--rounds", str(args.rounds), "--out", str(out)]
        script += ["--combos", ",".join(f"{m}:{s}" for m, s in combos)]
        script += ["--topk-fraction", str(args.topk_fraction)]
        before = net.wire_bytes()
        run_inside(net, script, "exchange launch", args.timeout)
        after = net.wire_bytes()
        wire = {r: after[r]["tx"] - before[r]["tx"] for r in after}
        return json.loads(out.read_text()), wire


def job_check(net: _netns.Network, args, run_dir: Path) -> dict:
    """One real training job inside the namespaces: FULL, int8 + error feedback."""
    train = ["-m", "fedmpi.train", "--config", args.config]
    train += ["--run-dir", str(run_dir), "--fed.rounds=2", "--fed.local_steps=5"]
    train += ["--fed.compress=int8", "--eval.extractor=none", "--eval.every=0"]
    train += ["--eval.grid=0", "--checkpoint.every=0", "--run.progress_every=0"]
    run_inside(net, train, "training job", args.timeout)
    rounds = [r for r in RunFolder(run_dir).read_metrics() if r.get("kind") == "round"]
    return {"agg_s": [r["agg_s"] for r in rounds], "train_s": [r["train_s"] for r in rounds]}


def quality(path: Path, runs: Path) -> tuple[dict, float | None]:
    """From the quality grid: {(method, scheme): (None, fd after R rounds, R)} and the
    quickest run's mean local training seconds per round (every run trains the same
    model, data and steps; the quickest is the least disturbed by other work)."""
    if not path.is_file():
        return {}, None
    out, train = {}, []
    for r in json.loads(path.read_text()):
        run = RunFolder(runs / f"{r['method']}_{r['scheme'].replace('+', '_')}")
        rows = (
            [m for m in run.read_metrics() if m.get("kind") == "round"] if run.path.is_dir() else []
        )
        if rows:
            train.append(sum(m["train_s"] for m in rows) / len(rows))
            out[(r["method"], r["scheme"])] = (None, r["fd_classifier"], len(rows))
    return out, (min(train) if train else None)


def report(results: dict, wire: dict, job: dict | None, q: dict, args) -> str:
    lines = [
        f"Network: 1 federator + 2 clients, each client link shaped both ways with tbf; no "
        f"added latency (no netem). Exchange timings: median of {args.rounds} rounds after "
        f"a warm-up round, slowest rank. Local training is the same work for every "
        f"combination (same model, data and steps): {args.train_s:.1f} s per round "
        f"({args.train_source}).",
        "",
    ]
    base_fd = q.get(("full", "none"), (None, None, None))[1]
    target = base_fd * (1 + args.target_slack) if base_fd else None
    if target:
        lines.append(
            f"Target: fd_classifier <= {target:.1f} (FULL uncompressed after "
            f"{q[('full', 'none')][2]} rounds, {base_fd:.1f}, + {args.target_slack:.0%})."
        )
        lines.append("")
    head = [
        "Mbit/s",
        "method",
        "scheme",
        "MB/round",
        "comm s",
        "train s",
        "round s",
        "vs FULL none",
        "fd after R",
        "time to target",
    ]
    rows, pays, wire_notes = [], {}, []
    for mbit, res in results.items():
        base = next(r for r in res if r["method"] == "full" and r["scheme"] == "none")
        base_round = args.train_s + base["comm_s"]
        ledger_total = sum(r["bytes_per_round"] for r in res) * (args.rounds + 1)
        wire_notes.append(
            f"{mbit} Mbit/s: the veths carried {sum(wire[mbit].values()) / 1e6:.1f} MB for "
            f"{ledger_total / 1e6:.1f} MB of exchanges in the ledger "
            f"({sum(wire[mbit].values()) / ledger_total:.3f}x: Ethernet, IP and TCP headers, "
            f"MPI's and PMIx's control messages)"
        )
        for r in res:
            key = (r["method"], r["scheme"])
            _, fd, R = q.get(key, (None, None, None))
            train_s = args.train_s
            round_s = train_s + r["comm_s"]
            speed = base_round / round_s
            reach = "-"
            if target and fd is not None:
                reach = f"{R * round_s:.0f} s" if fd <= target else f"not in {R} rounds"
            if round_s <= PAYS * base_round:
                pays[key] = max(pays.get(key, 0), mbit)
            rows.append(
                [
                    mbit,
                    r["method"].upper(),
                    r["scheme"],
                    f"{r['bytes_per_round'] / 1e6:.2f}",
                    f"{r['comm_s']:.2f}",
                    f"{train_s:.1f}",
                    f"{round_s:.1f}",
                    f"{speed:.2f}x",
                    f"{fd:.1f}" if fd is not None else "-",
                    reach,
                ]
            )
    lines.append(format_table(head, rows, markdown=True))
    lines += [
        "",
        "Where saved bytes start to pay (a round at least 5% faster than FULL "
        "uncompressed), highest measured bandwidth:",
        "",
    ]
    pay_rows = []
    for m, s in dict.fromkeys((r[1].lower(), r[2]) for r in rows):
        if (m, s) == ("full", "none"):
            continue
        pay_rows.append(
            [m.upper(), s, f"<= {pays[(m, s)]} Mbit/s" if (m, s) in pays else "never (measured)"]
        )
    lines.append(format_table(["method", "scheme", "pays at"], pay_rows, markdown=True))
    lines += [""] + [f"- {n}" for n in wire_notes]
    if job:
        lines += [
            "",
            f"Real job inside the namespaces (FULL, int8 + EF, {args.job_mbit} Mbit/s): "
            f"agg_s per round {', '.join(f'{v:.2f}' for v in job['agg_s'])} "
            f"(the exchange measured {job['expected']:.2f} s).",
        ]
    return "\n".join(lines)


def run_all(combos, rates, args) -> tuple[dict, dict, dict | None]:
    """Every bandwidth's measurements (and the real job at args.job_mbit), each on a
    network made for it and removed after it, also on a failure."""
    results, wire, job = {}, {}, None
    for mbit in rates:
        with _netns.Network(3, mbit=mbit) as net:
            print(f"[wan] {mbit} Mbit/s: {len(combos)} combinations", flush=True)
            results[mbit], wire[mbit] = measure(net, combos, args)
            if mbit == args.job_mbit and not args.no_job:
                with tempfile.TemporaryDirectory() as tmp:
                    job = job_check(net, args, Path(tmp) / "run")
                same = [r for r in results[mbit] if (r["method"], r["scheme"]) == JOB]
                job["expected"] = same[0]["comm_s"] if same else float("nan")
    left = _netns.leftovers()
    if left:
        raise RuntimeError(f"leftovers after the run: {left}")
    return results, wire, job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbit", default="10,100,1000", help="client link rates, Mbit/s")
    ap.add_argument(
        "--reduced", action="store_true", help="FULL and UDEC x none, int8+EF, topk+EF only"
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=2, help="timed exchanges per combination")
    ap.add_argument("--topk-fraction", type=float, default=0.01)
    ap.add_argument(
        "--quality", type=Path, default=ROOT / "bench" / "results" / "compress_quality.json"
    )
    ap.add_argument("--quality-runs", type=Path, default=ROOT / "runs" / "compress_quality")
    ap.add_argument("--target-slack", type=float, default=0.10)
    ap.add_argument("--no-job", action="store_true", help="skip the real training job")
    ap.add_argument(
        "--train-s",
        type=float,
        default=None,
        help="local training seconds per round (default: the quickest of the quality runs; "
        "e.g. a GPU's figure, to see where the bytes pay there)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from --out/wan.json (no network, no root needed)",
    )
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    q, train = quality(args.quality, args.quality_runs)
    args.train_s, args.train_source = args.train_s, "given"
    if args.train_s is None:
        args.train_s = train or 0.0
        args.train_source = (
            "the quickest quality run's mean" if train else "no quality runs found: 0 assumed"
        )
    rates = C.int_list(args.mbit)
    args.job_mbit = sorted(rates)[len(rates) // 2]
    if args.report_only:
        saved = json.loads((args.out / "wan.json").read_text())
        results = {int(k): v for k, v in saved["results"].items()}
        wire = {int(k): {int(r): b for r, b in v.items()} for k, v in saved["wire_bytes"].items()}
        args.job_mbit, args.rounds = saved.get("job_mbit", args.job_mbit), saved.get("rounds", 2)
        text = report(results, wire, saved["job"], q, args)
        print(text)
        C.save_result(args.out, "wan.md", text)
        return
    _netns.require_root()
    combos = REDUCED if args.reduced else [(m, s) for m in METHODS for s in SCHEMES]
    t0 = time.perf_counter()
    try:
        results, wire, job = run_all(combos, rates, args)
    except (RuntimeError, _netns.NetnsError, subprocess.TimeoutExpired) as e:
        left = _netns.leftovers()
        sys.exit(f"[wan] {e}\n[wan] network removed: {left or 'nothing left'}")
    text = report(results, wire, job, q, args)
    minutes = (time.perf_counter() - t0) / 60
    text += f"\n\nWhole benchmark: {minutes:.1f} min; no namespace, link or process left (checked)."
    print(text)
    C.save_result(args.out, "wan.md", text)
    result = {
        "results": {str(k): v for k, v in results.items()},
        "wire_bytes": {str(k): v for k, v in wire.items()},
        "job": job,
        "job_mbit": args.job_mbit,
        "rounds": args.rounds,
    }
    (args.out / "wan.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
