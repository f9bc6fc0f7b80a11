"""The progress-relay part of bench/overhead.py: under 2 ranks, client rounds through
`LocalTrainer` with fedmpi's `ProgressRelay` off, on as configured and on at a stress
interval, alternated, while the federator polls as the round loop does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from _overhead_loops import client_trainer

OVERHEAD = Path(__file__).resolve().parent / "overhead.py"  # relaunched with --relay-worker

RELAY_MODES = (("off", 0.0), ("on", 2.0), ("stress", 0.01))  # run.progress_every per mode


def relay_worker(args, cfg, device) -> int:
    """Under mpirun -n 2: rank 1 trains rounds with each relay mode, rank 0 receives."""
    from fedmpi.dist.relay import ProgressRelay
    from fedmpi.dist.world import World

    world = World()
    relays = {name: ProgressRelay(world, every) for name, every in RELAY_MODES}
    trainer = client_trainer(args, cfg, device) if world.rank == 1 else None
    rows, received = [], 0
    for trial in range(args.trials + 1):
        order = [RELAY_MODES[(i + trial) % len(RELAY_MODES)][0] for i in range(len(RELAY_MODES))]
        for mode in order:
            relay = relays[mode]
            if trial == 0 and world.rank == 1 and mode == order[0]:
                trainer.run(seed=99, steps=1)  # warm-up (first-step allocations)
            if world.rank == 1:
                batch = trainer.batch_size

                def on_step(step, loss):
                    relay.report(trial, step + 1, args.steps, (step + 1) * batch)

                c0 = time.process_time()
                stats = trainer.run(seed=trial, steps=args.steps, on_step=on_step)
                cpu = time.process_time() - c0
                relay.finish(trial, stats["steps"], args.steps, stats["images"])
                world.flags([0])
                relay.end_round()
                row = dict(
                    trial=trial,
                    mode=mode,
                    images=stats["images"],
                    seconds=stats["train_s"],
                    images_per_s=stats["images_per_s"],
                    images_per_cpu_s=stats["images"] / cpu,
                    messages=relay.sent,
                )
            else:

                def hook():
                    nonlocal received
                    received += len(relay.poll())

                world.waiting_hook = hook
                world.flags([0])
                world.waiting_hook = None
                received += len(relay.drain())
                row = None
            row = world.allgather(row)[1]  # the client's row, on both ranks
            if trial > 0:
                rows.append(row)
    if world.rank == 0:
        print("RELAY_RESULT " + json.dumps({"rows": rows, "received": received}), flush=True)
    for relay in relays.values():
        relay.close()
    world.close()
    return 0


def _worker_argv(args) -> list[str]:
    """The options the relay worker is launched with (this run's sizes)."""
    forward = [
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--trials",
        str(args.trials),
        "--images",
        str(args.images),
    ]
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--device", args.device),
    ):
        if value is not None:
            forward += [flag, str(value)]
    if args.synthetic:
        forward.append("--synthetic")
    return forward


def _modes_table(med: dict, cpu: dict, sent: dict) -> str:
    return C.markdown_table(
        [
            "relay",
            "report every",
            "messages (run)",
            "median images/s",
            "ratio to off",
            "images per CPU-s",
            "CPU ratio",
        ],
        [
            [
                m,
                f"{every:g} s" if every else "-",
                str(sent[m]),
                f"{med[m]:.1f}",
                f"{med[m] / med['off']:.3f}",
                f"{cpu[m]:.1f}",
                f"{cpu[m] / cpu['off']:.3f}",
            ]
            for m, every in RELAY_MODES
        ],
    )


def relay_throughput(args, overrides) -> dict:
    """Launch the relay worker on 2 ranks and compare images/s of the modes."""
    proc = C.run_ranks(
        args.launcher,
        2,
        [str(OVERHEAD), "--relay-worker", *_worker_argv(args), *overrides],
        log_path=Path(args.out_dir) / "overhead_relay.log",
        timeout=3600,
        echo=False,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RELAY_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"the relay benchmark failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
        )
    data = json.loads(lines[-1].split(" ", 1)[1])
    rows = data["rows"]
    med = {m: C.median(r["images_per_s"] for r in rows if r["mode"] == m) for m, _ in RELAY_MODES}
    cpu = {
        m: C.median(r["images_per_cpu_s"] for r in rows if r["mode"] == m) for m, _ in RELAY_MODES
    }
    sent = {m: max(r["messages"] for r in rows if r["mode"] == m) for m, _ in RELAY_MODES}
    print(
        f"\n## progress relay: client rounds of {args.steps} steps, {args.trials} trials per "
        f"mode after a warm-up, alternated; the federator polls while it waits\n"
    )
    print(_modes_table(med, cpu, sent))
    ratio = med["on"] / med["off"]
    print(
        f"\nrelay (as configured) / off: {ratio:.3f} images/s; messages received by the "
        f"federator: {data['received']} (= sent: {sum(sent.values())})",
        flush=True,
    )
    return dict(
        rows=rows,
        median_images_per_s=med,
        ratio_on=ratio,
        ratio_stress=med["stress"] / med["off"],
        cpu_ratio_on=cpu["on"] / cpu["off"],
        messages=sent,
        received=data["received"],
    )
