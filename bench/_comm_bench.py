"""The per-rank measurement of bench/comm.py: `CommBench` times R real aggregation rounds
of each method (fedmpi's `Aggregator.exchange`, the floor, with --secure the secure
exchange on the same weights) and collects the round and summary rows on rank 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from _exchange import (
    RawCollectives,
    count_host_copies,
    floor_once,
    host_once,
    ledger_check,
    secure_host_once,
    secure_refusal,
)

# what one repeat measures, in the order of the buffer reduced over ranks
KEYS = (
    "agg",
    "inner",
    "floor",
    "setup",
    "host",
    "secure",
    "secure_inner",
    "secure_host",
    "secure_host_sum",
)


class CommBench:
    """One launch's measurement, on every rank: the configured UNet bound to flat region
    buffers as a run binds it, the `Aggregator` a run uses (with --secure a second one,
    fed.secure, on the same weights), the floor's buffers; rows collect on rank 0."""

    def __init__(self, args, overrides, world):
        import torch

        from fedmpi.config import load_config
        from fedmpi.model.regions import bind_flat, region_sizes
        from fedmpi.model.summary import model_shape
        from fedmpi.model.unet import build_unet
        from fedmpi.runtime import derive_seed, pick_device, share_cpu_threads

        self.args, self.overrides, self.world = args, overrides, world
        self.W, self.K = world.size, world.num_clients
        cfg = self.cfg = load_config(args.config, overrides)
        device = self.device = pick_device(args.device or cfg.run.device, world.local_rank)
        if device.type == "cpu":
            share_cpu_threads(max(1, world.local_clients))
        channels, size = model_shape(cfg)
        torch.manual_seed(derive_seed(cfg.run.seed, 0xBE7C, world.rank))
        self.model = build_unet(cfg.model, channels, size).to(device)
        bind_flat(self.model)  # as fedmpi.train.loop does
        self.sizes = region_sizes(self.model)
        self.seed = cfg.run.seed
        self.trainer, self.n_k = self._client_trainer()
        if world.is_federator:
            self.n_k = 0.0
        # every client's n_k, as the round's flags carry it
        self.sizes_all = world.allgather(self.n_k)[1:]
        world.start_backend(device)
        self._aggregators()
        if world.is_federator:
            self._print_header()
        self.raw = RawCollectives(world, self.sizes)
        self.profiler = None
        if args.profile and world.rank in (0, 1):
            import cProfile

            self.profiler = cProfile.Profile()
        self.round_rows, self.summary_rows, self.all_ok = [], [], True

    def _client_trainer(self):
        """(LocalTrainer or None, n_k): a trainer on the client's data with --local-steps."""
        world, cfg = self.world, self.cfg
        n_k = float(100 + 10 * world.client)  # unequal client weights
        if not (self.args.local_steps and not world.is_federator):
            return None, n_k
        from fedmpi.data import load_client_data
        from fedmpi.model.diffusion import Diffusion
        from fedmpi.train.trainer import LocalTrainer

        images, _ = load_client_data(cfg, world.client, self.K)
        trainer = LocalTrainer(
            self.model,
            Diffusion.from_config(cfg.diffusion),
            images,
            cfg.train.batch_size,
            cfg.train.lr,
            self.device,
        )
        return trainer, float(len(images))

    def _aggregators(self) -> None:
        """The aggregation a run uses; with --secure a second one on the same weights, whose
        construction runs the key agreement (a collective, timed once)."""
        from fedmpi.fl.aggregate import Aggregator
        from fedmpi.fl.ledger import Ledger

        world = self.world
        self.agg = Aggregator(world, self.model, Ledger(world.rank))
        self.sagg, self.t_keys = None, 0.0
        if self.args.secure:
            world.comm.Barrier()
            t0 = time.perf_counter()
            self.sagg = Aggregator(
                world, self.model, Ledger(world.rank), self.cfg.replace({"fed.secure": True})
            )
            self.t_keys = world.comm.allreduce(time.perf_counter() - t0, op=world.MPI.MAX)

    def _print_header(self) -> None:
        args, cfg, sizes = self.args, self.cfg, self.sizes
        C.print_environment(
            "bench/comm.py", C.environment(self.W, self.world.backend.name, self.device)
        )
        print(
            f"# model {args.config} {' '.join(self.overrides)}: "
            + ", ".join(f"{r} {n:,}" for r, n in sizes.items())
            + f", total {sum(sizes.values()):,} parameters"
        )
        print(
            f"# K={self.K} clients, R={args.rounds} rounds/method, warm-up {args.warmup} + "
            f"{args.repeats} timed repeats (median), local steps {args.local_steps}",
            flush=True,
        )
        if self.sagg is not None:
            nb = cfg.fed.secure_neighbors
            print(
                f"# secure: fed.secure_frac_bits {cfg.fed.secure_frac_bits}, masks with "
                f"{'every other reporter' if nb is None else f'{nb} ring neighbours each side'}; "
                f"key agreement {1e3 * self.t_keys:.1f} ms (once per run)",
                flush=True,
            )

    def timed(self, fn):
        """(seconds, fn()) on this rank after a barrier (profiled with --profile)."""
        self.world.comm.Barrier()
        if self.profiler is not None:
            self.profiler.enable()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if self.profiler is not None:
            self.profiler.disable()
        return dt, out

    # ------------------------------------------------------------ one method

    def method(self, method: str) -> None:
        """R rounds of `method`: timings, then its bytes against the analytical rows."""
        from fedmpi.fl.ledger import FLOAT_BYTES, SECURE_VALUE_BYTES, Ledger

        world, args = self.world, self.args
        ledger, sledger = Ledger(world.rank), Ledger(world.rank)
        self.agg.ledger = ledger
        self.agg.initial_broadcast()
        refused = (
            secure_refusal(
                method, self.K, args.rounds, self.seed, self.cfg.fed.secure_min_reporters
            )
            if self.sagg is not None
            else "not measured (--secure)"
        )
        if refused is None:  # round 0 of the secure ledger: the same broadcast
            self.sagg.ledger = sledger
            self.sagg.initial_broadcast()
        samples = {k: [] for k in KEYS}
        for r in range(1, args.rounds + 1):
            plan = self._round(method, r, ledger, sledger if refused is None else None, samples)
        if args.count_copies and self.device.type == "cuda":
            self._count_copies(method, plan, r)
        # ---- bytes: this method's ledgers against the analytical rows
        K, R, sizes, seed = self.K, args.rounds, self.sizes, self.seed
        got, want, ok = ledger_check(world, ledger, method, K, R, sizes, seed, FLOAT_BYTES)
        sok, sgot = True, None
        if refused is None:
            sgot, _, sok = ledger_check(
                world, sledger, method, K, R, sizes, seed, SECURE_VALUE_BYTES
            )
        if world.is_federator:
            self.all_ok &= ok and sok
            per_round = _round_bytes(self.round_rows, method, got, want, sgot)
            self.summary_rows.append(
                self._summary_row(method, samples, per_round, got, ok, sok, refused)
            )

    def _round(self, method: str, r: int, ledger, sledger, samples: dict):
        """Round r: --local-steps of training, then warm-up + timed repeats; its row."""
        from fedmpi.fl.methods import make_plan
        from fedmpi.runtime import derive_seed

        world, args = self.world, self.args
        plan = make_plan(method, r, self.K, self.seed)
        if self.trainer is not None:
            self.trainer.new_optimizer()
            self.trainer.run(seed=derive_seed(self.seed, r, world.client), steps=args.local_steps)
        per = {k: [] for k in KEYS}
        for rep in range(args.warmup + args.repeats):
            mx = self._repeat(plan, r, rep, ledger, sledger)
            if rep >= args.warmup:
                for key, v in zip(KEYS, mx):
                    per[key].append(float(v))
                    samples[key].append(float(v))
        if world.is_federator:
            self.round_rows.append(
                dict(
                    backend=world.backend.name.split(" (")[0],
                    W=self.W,
                    K=self.K,
                    method=method,
                    round=r,
                    **{f"{k}_ms": 1e3 * C.median(v) for k, v in per.items()},
                )
            )
        return plan

    def _repeat(self, plan, r: int, rep: int, ledger, sledger):
        """One repeat: exchange, floor (and secure exchange when `sledger`), in alternating
        order, then the local steps alone; every time the slowest rank's (the secure host
        time also summed over ranks)."""
        import numpy as np

        from fedmpi.fl.ledger import Ledger

        world, agg, sagg = self.world, self.agg, self.sagg
        secure = sledger is not None
        # rep 0 writes the ledgers (one real round); the others scratch ones
        agg.ledger = ledger if rep == 0 else Ledger(world.rank)
        timings: dict = {}
        stimings: dict = {}  # the secure exchange's region loop (after masking)
        runs = [
            ("agg", lambda: agg.exchange(plan, self.sizes_all, r, timings=timings)),
            ("floor", lambda: floor_once(world, plan, self.raw)),
        ]
        if secure:
            sagg.ledger = sledger if rep == 0 else Ledger(world.rank)
            runs.append(
                ("secure", lambda: sagg.exchange(plan, self.sizes_all, r, timings=stimings))
            )
        t = dict.fromkeys(KEYS, float("nan"))
        for name, fn in runs if rep % 2 == 0 else runs[::-1]:  # alternate order
            dt, out = self.timed(fn)
            if name == "floor":
                t["floor"], t["setup"] = out
            else:
                t[name] = dt
        t["inner"] = sum(timings.values())
        if secure:
            t["secure_inner"] = sum(stimings.values())
        t["host"] = host_once(world, plan, agg, self.sizes_all)
        if secure:
            t["secure_host"] = t["secure_host_sum"] = secure_host_once(
                world, plan, sagg, self.n_k, r
            )
        vals = np.array([t[k] for k in KEYS])
        mx, tot = np.empty_like(vals), np.empty_like(vals)
        world.comm.Allreduce(vals, mx, op=world.MPI.MAX)
        world.comm.Allreduce(vals, tot, op=world.MPI.SUM)
        mx[KEYS.index("secure_host_sum")] = tot[KEYS.index("secure_host_sum")]
        return mx

    def _count_copies(self, method: str, plan, r: int) -> None:
        world = self.world
        copies = count_host_copies(world, lambda: self.agg.exchange(plan, self.sizes_all, r))
        rows = world.comm.gather(copies, root=0)
        if world.is_federator:
            print(
                f"\n# {method}, round {r}: host<->device copies in one exchange "
                f"(torch.profiler CUDA memcpy events; {world.backend.name}; "
                f"{len(frozenset().union(*plan.uploads))} region(s) uploaded)"
            )
            print(
                C.markdown_table(
                    ["rank", "device->host", "host->device"],
                    [[i, c["DtoH"], c["HtoD"]] for i, c in enumerate(rows)],
                )
            )

    def _summary_row(self, method, samples, per_round, got, ok, sok, refused) -> dict:
        """The method's summary: medians over all rounds x repeats, bytes per round."""
        med = {k: C.median(v) for k, v in samples.items()}
        n = len(per_round)
        return dict(
            backend=self.world.backend.name.split(" (")[0],
            W=self.W,
            K=self.K,
            method=method,
            rounds=self.args.rounds,
            repeats=self.args.repeats,
            params_per_round=sum(x["params"] for x in per_round) / n,
            bytes_per_round=sum(x["bytes"] for x in per_round) / n,
            expected_bytes_per_round=sum(x["expected_bytes"] for x in per_round) / n,
            bytes_check="PASS" if ok else "FAIL",
            agg_ms=1e3 * med["agg"],
            floor_ms=1e3 * med["floor"],
            ratio=med["agg"] / med["floor"],
            setup_ms=1e3 * med["setup"],
            agg_excl_setup_ms=1e3 * med["inner"],
            ratio_excl_setup=med["inner"] / med["floor"],
            host_ms=1e3 * med["host"],
            round0_bytes=sum(x["bytes"] for x in got if x["round"] == 0),
            secure=refused or "measured",
            secure_ms=1e3 * med["secure"],
            secure_ratio=med["secure"] / med["agg"],
            secure_comm_ms=1e3 * med["secure_inner"],
            # one core (or node) per rank: the clients mask in parallel, so the round
            # costs the reduces + broadcasts plus the slowest rank's masking
            secure_core_per_rank_ratio=(med["secure_inner"] + med["secure_host"]) / med["agg"],
            secure_host_ms=1e3 * med["secure_host"],
            secure_host_sum_ms=1e3 * med["secure_host_sum"],
            secure_bytes_per_round=(sum(x["secure_bytes"] for x in per_round) / n),
            secure_bytes_check=("PASS" if sok else "FAIL") if refused is None else "-",
            key_agreement_ms=1e3 * self.t_keys,
        )


def _round_bytes(round_rows: list[dict], method: str, got, want, sgot) -> list[dict]:
    """The method's round rows, with the bytes its ledgers recorded and predicted."""
    per_round = []
    for row in round_rows:
        if row["method"] != method:
            continue
        r = row["round"]
        row["params"] = sum(x["params"] for x in got if x["round"] == r)
        row["bytes"] = sum(x["bytes"] for x in got if x["round"] == r)
        row["expected_bytes"] = sum(x["bytes"] for x in want if x["round"] == r)
        row["bytes_ok"] = row["bytes"] == row["expected_bytes"]
        row["ratio"] = row["agg_ms"] / row["floor_ms"]
        row["secure_bytes"] = (
            sum(x["bytes"] for x in sgot if x["round"] == r) if sgot is not None else float("nan")
        )
        row["secure_ratio"] = row["secure_ms"] / row["agg_ms"]
        per_round.append(row)
    return per_round
