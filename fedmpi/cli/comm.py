"""`python -m fedmpi.comm`: the analytical communication table of a config."""

from __future__ import annotations

import sys

from fedmpi.store.tables import format_table


def comm_table(results: list[dict], rule: str = "paper", unit: str = "fp32") -> str:
    """The comparison of every method (fedmpi.fl.ledger.comparison) as a text table."""
    head = ["method", "clients", "rounds", "parameters", f"MB ({unit})", "vs FULL"]
    rows = []
    for res in results:
        t = res[rule]
        rows.append(
            [
                res["method"].upper(),
                res["clients"],
                res["rounds"],
                f"{t['params']:,}",
                f"{t['bytes'] / 1e6:.1f}",
                f"{-100 * t['reduction_vs_full']:+.1f}%",
            ]
        )
    return format_table(head, rows)


def main(argv=None) -> int:
    """`python -m fedmpi.comm`: the analytical communication table."""
    import argparse

    from fedmpi.config import ConfigError, load_config
    from fedmpi.fl.ledger import UploadFormat, comparison
    from fedmpi.fl.methods import METHODS
    from fedmpi.model.summary import model_region_sizes

    p = argparse.ArgumentParser(prog="python -m fedmpi.comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rounds", type=int, default=None, help="default: fed.rounds")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--rule",
        choices=("paper", "moved"),
        default="paper",
        help="paper: initial model + R uploads + R-1 downloads; "
        "moved: what a fedmpi run moves (one more download)",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="uploads as fed.secure sends them: uint64 fixed point, 8 bytes per "
        "value instead of 4 (also implied by fed.secure: true in the config)",
    )
    p.add_argument(
        "--compress",
        choices=("none", "bf16", "int8", "topk"),
        default=None,
        help="uploads compressed as fed.compress sends them (default: the config's; "
        "top-k keeps fed.topk_fraction of the values)",
    )
    args, rest = p.parse_known_args(argv)
    # as config overrides, so the loader refuses what training refuses (bf16 + secure)
    rest += ["--fed.secure=true"] if args.secure else []
    rest += [f"--fed.compress={args.compress}"] if args.compress else []
    try:
        cfg = load_config(args.config, rest)
        sizes = model_region_sizes(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rounds = args.rounds or cfg.fed.rounds
    fmt = UploadFormat.of(cfg.fed)
    results = [
        comparison(m, args.clients, rounds, sizes, cfg.run.seed, fmt)
        for m in args.methods.split(",")
    ]
    unit = {"none": "fp32", "topk": f"top-{fmt.topk_fraction:g}"}.get(fmt.compress, fmt.compress)
    if fmt.secure:
        unit = "secure" if fmt.compress == "none" else f"{unit} secure"
    notes = {
        "secure": ", secure: uploads uint64 (8 bytes/value), downloads fp32",
        "bf16": ", uploads bf16 (2 bytes/value), downloads fp32",
        "int8": ", uploads int8 (1 byte/value + a 4-byte scale per 1,024 values each way), downloads fp32",
    }
    note = notes.get(unit.replace("int8 secure", "int8"), "")
    if fmt.compress == "topk":
        note = f", uploads the top {fmt.topk_fraction:.1%} values (8 bytes each), downloads fp32"
    print(f"parameters exchanged, K={args.clients}, R={rounds}, rule={args.rule}{note}")
    print(comm_table(results, args.rule, unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
