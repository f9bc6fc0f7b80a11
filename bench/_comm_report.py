"""The tables, verdicts, plot and files of bench/comm.py (rank 0 and the --sweep driver).

`rounds_table` (per round), `summary_table` (per method), `secure_table` (secure vs
plain), the verdicts against the targets (`TARGET_RATIO`, `SECURE_TARGET`), `plot` and
`report` (one launch's printout and its CSV / PNG files).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from fedmpi.store import tables

METHOD_NAMES = ("full", "usplit", "udec", "ulatdec")


def _fmt_bytes(b: float) -> str:
    return f"{b:,.0f}" if float(b).is_integer() else f"{b:,.1f}"


def summary_table(rows: list[dict]) -> str:
    headers = [
        "method",
        "backend",
        "W",
        "params/round",
        "bytes/round",
        "agg ms",
        "floor ms",
        "ratio",
        "setup ms",
        "agg excl. setup ms",
        "ratio excl. setup",
        "host copies ms",
        "bytes check",
    ]
    body = [
        [
            r["method"],
            r["backend"],
            r["W"],
            _fmt_bytes(float(r["params_per_round"])),
            _fmt_bytes(float(r["bytes_per_round"])),
            f"{float(r['agg_ms']):.2f}",
            f"{float(r['floor_ms']):.2f}",
            f"{float(r['ratio']):.2f}",
            f"{float(r['setup_ms']):.2f}",
            f"{float(r['agg_excl_setup_ms']):.2f}",
            f"{float(r['ratio_excl_setup']):.2f}",
            f"{float(r['host_ms']):.2f}",
            r["bytes_check"],
        ]
        for r in rows
    ]
    return C.markdown_table(headers, body, align="ll" + "r" * (len(headers) - 3) + "l")


TARGET_RATIO = 1.25


def verdict(rows: list[dict]) -> str:
    """The aggregation target and where the time above the floor goes."""
    worst = max(rows, key=lambda r: float(r["ratio"]))
    met = all(float(r["ratio"]) <= TARGET_RATIO for r in rows)
    lines = [
        f"aggregation target (agg <= {TARGET_RATIO}x floor): {'MET' if met else 'NOT MET'} "
        f"(ratios {min(float(r['ratio']) for r in rows):.2f}..{float(worst['ratio']):.2f})"
    ]
    if not met:
        r = worst
        gap = float(r["agg_ms"]) - float(r["floor_ms"])
        lines.append(
            f"  worst: {r['method']} W={r['W']}: agg {float(r['agg_ms']):.1f} ms = floor "
            f"{float(r['floor_ms']):.1f} + {gap:.1f} ms, of which communicator setup "
            f"{float(r['setup_ms']):.1f} ms; the local steps alone (clients' pack_upload, "
            f"the federator's finiteness check; slowest rank) take {float(r['host_ms']):.1f} ms "
            f"and they run serially around each collective (client pack -> Reduce -> "
            f"federator check -> Bcast)"
        )
    return "\n".join(lines)


SECURE_TARGET = 2.5  # secure aggregation time / plain aggregation time (issue 13)


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("secure") == "measured"]


def secure_table(rows: list[dict]) -> str:
    headers = [
        "method",
        "backend",
        "W",
        "plain ms",
        "secure ms",
        "secure / plain",
        "secure reduce+bcast ms",
        "encode+mask CPU ms (slowest rank)",
        "encode+mask CPU ms (all ranks)",
        "projected secure / plain, a core per rank",
        "secure bytes/round",
        "plain bytes/round",
        "secure bytes check",
    ]
    body = []
    for r in rows:
        if r.get("secure") != "measured":
            body.append(
                [
                    r["method"],
                    r["backend"],
                    r["W"],
                    f"{float(r['agg_ms']):.2f}",
                    r.get("secure", "-"),
                ]
                + ["-"] * (len(headers) - 5)
            )
            continue
        body.append(
            [
                r["method"],
                r["backend"],
                r["W"],
                f"{float(r['agg_ms']):.2f}",
                f"{float(r['secure_ms']):.2f}",
                f"{float(r['secure_ratio']):.2f}",
                f"{float(r['secure_comm_ms']):.2f}",
                f"{float(r['secure_host_ms']):.1f}",
                f"{float(r['secure_host_sum_ms']):.1f}",
                f"{float(r['secure_core_per_rank_ratio']):.2f}",
                _fmt_bytes(float(r["secure_bytes_per_round"])),
                _fmt_bytes(float(r["bytes_per_round"])),
                r["secure_bytes_check"],
            ]
        )
    return C.markdown_table(headers, body, align="ll" + "r" * (len(headers) - 3) + "l")


def secure_verdict(rows: list[dict]) -> str:
    """The secure aggregation target, and what bounds the secure time on this machine."""
    rows = _measured(rows)
    if not rows:
        return "secure aggregation: no method measured"
    worst = max(rows, key=lambda r: float(r["secure_ratio"]))
    met = all(float(r["secure_ratio"]) <= SECURE_TARGET for r in rows)
    cores = C.environment(None, None)["cpu_cores"]
    W = int(worst["W"])
    lines = [
        f"secure aggregation target (secure <= {SECURE_TARGET}x plain): "
        f"{'MET' if met else 'NOT MET'} (ratios "
        f"{min(float(r['secure_ratio']) for r in rows):.2f}..{float(worst['secure_ratio']):.2f})"
    ]
    serial = float(worst["secure_host_sum_ms"]) / max(1, min(cores, W))
    lines.append(
        f"  worst: {worst['method']} W={W}: secure {float(worst['secure_ms']):.1f} ms vs plain "
        f"{float(worst['agg_ms']):.1f} ms; encoding + masking take {float(worst['secure_host_ms']):.1f} "
        f"ms of CPU on the slowest rank and {float(worst['secure_host_sum_ms']):.1f} ms summed over "
        f"the {W} ranks, i.e. >= {serial:.1f} ms of wall time on this machine's {cores} cores"
        + (
            " (more ranks than cores: the clients' masking runs one after another; with a core "
            "per rank it runs in parallel)"
            if W > cores
            else ""
        )
    )
    lines.append(
        f"  its reduces + broadcasts (after masking) take {float(worst['secure_comm_ms']):.1f} ms: "
        f"with a core per rank, the round would cost that plus the slowest rank's masking, "
        f"{float(worst['secure_core_per_rank_ratio']):.2f}x plain (a projection from this "
        f"run's parts, not a measurement)"
    )
    return "\n".join(lines)


def rounds_table(rows: list[dict]) -> str:
    headers = [
        "method",
        "W",
        "round",
        "params",
        "bytes",
        "predicted bytes",
        "agg ms",
        "floor ms",
        "ratio",
        "setup ms",
        "agg excl. setup ms",
        "host copies ms",
    ]
    body = [
        [
            r["method"],
            r["W"],
            r["round"],
            f"{r['params']:,}",
            f"{r['bytes']:,}",
            f"{r['expected_bytes']:,}",
            f"{r['agg_ms']:.2f}",
            f"{r['floor_ms']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['setup_ms']:.2f}",
            f"{r['inner_ms']:.2f}",
            f"{r['host_ms']:.2f}",
        ]
        for r in rows
    ]
    return C.markdown_table(headers, body)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = C.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    worlds = sorted({int(r["W"]) for r in rows})
    methods = [m for m in METHOD_NAMES if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        mine = {int(r["W"]): r for r in rows if r["method"] == m}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(worlds))]
        agg = [float(mine[w]["agg_ms"]) if w in mine else 0 for w in worlds]
        flo = [float(mine[w]["floor_ms"]) if w in mine else 0 for w in worlds]
        bars = ax1.bar(xs, agg, width * 0.95, label=f"{m} (fedmpi)")
        ax1.bar(
            xs,
            flo,
            width * 0.5,
            color="black",
            alpha=0.35,
            label="raw Reduce+Bcast floor" if i == 0 else None,
        )
        ax2.bar(
            xs,
            [float(mine[w]["bytes_per_round"]) / 1e6 if w in mine else 0 for w in worlds],
            width * 0.95,
            color=bars.patches[0].get_facecolor(),
            label=m,
        )
    for ax, ylabel in ((ax1, "aggregation per round [ms]"), (ax2, "MB moved per round (clients)")):
        ax.set_xticks(range(len(worlds)), [f"W={w}" for w in worlds])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, backend, W, round_rows, summary_rows, all_ok) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"comm_{backend}_W{W}"
    print(f"\n## per round (W={W}, backend {backend}; median of {args.repeats} repeats)\n")
    print(rounds_table(round_rows))
    print(f"\n## summary (W={W}, backend {backend}; median over all rounds x repeats)\n")
    print(summary_table(summary_rows))
    if args.secure:
        print(
            f"\n## secure vs plain aggregation (W={W}, backend {backend}; median over all "
            f"rounds x repeats)\n"
        )
        print(secure_table(summary_rows))
    tables.write_csv(Path(f"{stem}_rounds.csv"), round_rows)
    tables.write_csv(Path(f"{stem}.csv"), summary_rows)
    plot(
        summary_rows,
        Path(f"{stem}.png"),
        f"fedmpi aggregation vs raw MPI floor, {backend}, {args.config}, W={W}",
    )
    print("\n" + verdict(summary_rows))
    if args.secure:
        print(secure_verdict(summary_rows))
    n = len(summary_rows)
    print(
        f"\nbytes check: {'PASS' if all_ok else 'FAIL'} (ledger == analytical_rows for "
        f"{n} method{'s' if n != 1 else ''}, W={W}, rounds 0..{args.rounds})"
    )
    print(f"wrote {stem}.csv, {stem}_rounds.csv, {stem}.png", flush=True)
