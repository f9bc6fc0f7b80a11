"""What a round leaves behind on the federator: its metrics rows, its log line, the ledger's
rows in comm.csv, and at the end the communication summary and the last line."""

from __future__ import annotations

import time

import numpy as np

from fedmpi.config import Config
from fedmpi.fl.ledger import FIELDS, client_rows, deployment_bytes, run_summary, typed_rows
from fedmpi.fl.privacy import ADJACENCY, epsilon_fields, epsilon_text
from fedmpi.model.regions import region_sizes


def gather(job, r: int, stats=None):
    """One gather per round: every rank's stats and ledger rows of this round; the
    federator appends the rows to comm.csv and returns (stats, bytes it moved)."""
    mine = job.ledger.pop_round(r)  # sent once: the ledger does not grow with R
    gathered = job.world.gather((stats, mine))
    if not job.world.is_federator:
        return None
    rows = [row for _, rows in gathered for row in rows]
    if rows:  # a federation of one moves nothing (and writes no comm.csv)
        job.run_dir.append_comm(client_rows(rows), FIELDS)  # not the federator's mirror rows
    return [s for s, _ in gathered], sum(row["bytes"] for row in mine)


def upload_stats_to_rows(rows, exchanged: dict, single: bool) -> None:
    """The rank's upload statistics (fed.compress's norms) into its clients' metrics rows:
    the one client's row with one client per rank; with several, the rank uploads their
    mean, so each of its clients' rows carries the rank's, as `rank_<name>`."""
    if not rows or not exchanged:
        return
    if single:
        rows[0].update(exchanged)
        return
    for row in rows:
        row.update({f"rank_{k}": v for k, v in exchanged.items()})


def record(job, r: int, stats: dict, scores, nonfinite: list[int], times: dict, plan) -> None:
    """The federator's metrics rows and one log line for round `r`."""
    per_client = stats.pop("per_client", [])
    gathered = gather(job, r, per_client)
    if not job.world.is_federator:
        return
    client_stats, round_bytes = gathered
    round_s = time.perf_counter() - times.pop("t_round")
    if job.solo:
        _record_epoch(job, r, client_stats[0][0] if client_stats[0] else {}, scores, round_s, times)
        return
    rows = [s for rank in client_stats for s in rank]  # the clients that trained, 1..N
    losses = [s.get("loss", float("nan")) for s in rows]
    good = [x for x in losses if np.isfinite(x)]
    # the slowest rank's local training: the sum over the clients it trained this round
    t_train = max((sum(s.get("train_s", 0.0) for s in rank) for rank in client_stats), default=0.0)
    row = dict(
        kind="round",
        round=r,
        method=job.method,
        loss=float(np.mean(good)) if good else float("nan"),
        client_loss=losses,
        nonfinite_clients=nonfinite,
        train_s=t_train,
        **times,
        round_s=round_s,
        bytes=round_bytes,
        images_per_s=[s.get("images_per_s") for s in rows],
        participants=sum(1 for u in plan.uploads if u),
        **deployment_bytes(plan, region_sizes(job.model), job.aggregator.upload_format),
    )
    row.update(scores or {})
    epsilon = job.aggregator.epsilon(r)  # privacy.dp: the guarantee after round r
    if epsilon is not None:
        row.update(epsilon_fields(epsilon, job.cfg.privacy.delta))
    job.metrics.write(**row)
    for s in rows:
        for step, loss in s.pop("step_losses", ()):  # train.log_every
            job.metrics.write(kind="step", round=r, client=s["client"], step=step, loss=loss)
        job.metrics.write(kind="client", round=r, **s)
    score_txt = score_text(scores) + (
        f" | {epsilon_text(epsilon, job.cfg.privacy.delta)}" if epsilon is not None else ""
    )
    span = f"clients {min(good):.4f}..{max(good):.4f}" if good else "no finite client"
    nan_txt = (
        f" | NaN: client{'s' if len(nonfinite) > 1 else ''} "
        f"{', '.join(map(str, nonfinite))} skipped"
        if nonfinite
        else ""
    )
    job.log(
        f"[round {r}/{job.schedule.rounds}] loss {row['loss']:.4f} ({span}){nan_txt} | "
        f"train {t_train:.1f}s agg {times['agg_s']:.2f}s eval {times['eval_s']:.1f}s "
        f"ckpt {times['ckpt_s']:.1f}s | {round_bytes / 1e6:.2f} MB{score_txt}"
    )


def _record_epoch(job, r: int, s: dict, scores, round_s: float, times: dict) -> None:
    """The baseline's row and line: one per epoch, as the reference counts them."""
    step = job.schedule.per_round * (r - 1) + s.get("steps", 0)
    for at, loss in s.get("step_losses", ()):  # train.log_every
        job.metrics.write(kind="step", epoch=r, step=at, loss=loss)
    job.metrics.write(
        kind="epoch",
        epoch=r,
        step=step,
        loss=s["loss"],
        images_per_s=s["images_per_s"],
        train_s=s["train_s"],
        eval_s=times["eval_s"],
        epoch_s=round_s,
        **(scores or {}),
    )
    job.log(
        f"[epoch {r}/{job.schedule.rounds}] step {step} loss {s['loss']:.4f} | "
        f"{s['images_per_s']:.0f} img/s | {round_s:.1f}s{score_text(scores)}"
    )


def finish(job) -> dict:
    R, summary = job.schedule.rounds, {}
    if job.world.is_federator and job.aggregator is not None:
        cfg = job.cfg
        extra = {"secure": cfg.fed.secure}
        if cfg.privacy.dp:
            extra["privacy"] = dict(
                cfg.to_dict()["privacy"],
                rounds=R,
                epsilon=job.aggregator.epsilon(R),
                adjacency=ADJACENCY,
            )
        summary = run_summary(
            typed_rows(job.run_dir.read_comm()),
            job.method,
            job.world.num_clients,
            R,
            region_sizes(job.model),
            cfg.run.seed,
            job.aggregator.upload_format,
            extra,
            job.population,
            job.sampling_key,
            job.aggregator.strategy.released_every_round(job.aggregator.shared),
        )
        job.run_dir.write_summary(summary)
        moved = summary["measured"]["moved"]
        saved = ""
        if "float32_bytes" in summary:  # fed.compress
            saved = f", {summary['float32_bytes'] / moved['bytes']:.2f}x fewer bytes than float32"
        job.log(
            f"done: moved {moved['params']:,} parameters ({moved['bytes'] / 1e6:.1f} MB), "
            f"{100 * summary['moved']['reduction_vs_full']:.1f}% less than FULL would{saved}; "
            f"ledger matches the analytical table: {summary['matches_analytical']}"
        )
    if job.world.is_federator:
        grids = job.run_dir.grids(R)
        more = f" (+{len(grids) - 1} more)" if len(grids) > 1 else ""
        job.log((f"samples: {grids[0]}{more} | " if grids else "") + f"run folder: {job.run_dir}")
    if job.evaluator is not None:
        job.evaluator.close()
    job.relay.close()
    return summary


def headline(job) -> str:
    """The federated job's start line (the baseline's: its data and epochs)."""
    cfg, s = job.cfg, job.schedule
    if job.solo:
        return (
            f"fedmpi centralized: {int(job.n_k)} images | {s.rounds} epochs x {s.per_round} "
            f"steps | device {job.device} | run {job.run_dir}"
        )
    pop = job.population
    if pop.one_per_slot and pop.everyone:
        who = f"K={pop.num_clients} clients"
    else:
        each = (
            f"{pop.fixed_count()} per round"
            if pop.sampling == "fixed" or pop.everyone
            else f"Poisson q={pop.participation:g}"
        )
        adam = "" if cfg.fed.reset_optimizer or pop.one_per_slot else ", a fresh Adam each"
        who = f"N={pop.num_clients} clients on {pop.slots} ranks ({each}{adam})"
    return (
        f"fedmpi: {job.method.upper()} | {who} | R={s.rounds} rounds | "
        f"{job.world.describe()} | device {job.device} | run {job.run_dir}"
        + upload_text(cfg)
        + privacy_text(cfg)
    )


def upload_text(cfg) -> str:
    """How uploads are encoded, when not plain float32 FedAvg (the start line)."""
    f, parts = cfg.fed, []
    if f.compress != "none":
        what = f"top {f.topk_fraction:.2%} of values" if f.compress == "topk" else f.compress
        ef = ", error feedback" if f.error_feedback else ""
        parts.append(f"uploads {what} of the update{ef}")
    return "".join(f" | {p}" for p in parts)


def warn_withheld(job, r: int, plan, sizes) -> None:
    """fed.secure with sampling: the regions too few ranks reported in round `r`."""
    held = job.aggregator.withheld(plan, sizes)
    if held:
        job.log(
            f"warning: round {r}: region(s) {', '.join(held)} reported by fewer than "
            f"fed.secure_min_reporters={job.cfg.fed.secure_min_reporters} ranks: not "
            f"averaged this round (their sum would show one rank's upload)"
        )


def privacy_text(cfg: Config) -> str:
    """The secure aggregation / DP settings for the start line ('' when both are off)."""
    parts = []
    if cfg.fed.secure and cfg.fed.compress == "int8":
        parts.append("secure aggregation (int8 masked modulo 2^8)")
    elif cfg.fed.secure:
        parts.append(f"secure aggregation (uint64, 2^-{cfg.fed.secure_frac_bits})")
    if cfg.privacy.dp:
        p = cfg.privacy
        parts.append(
            f"DP {p.mode} C={p.clip:g} z={p.noise_multiplier:g} delta={p.delta:g} ({ADJACENCY})"
        )
    return "".join(f" | {x}" for x in parts)


def score_text(scores: dict | None) -> str:
    """The headline scores for the one-line progress report."""
    if not scores:
        return ""
    parts = []
    for name in ("fid", "fd_classifier", "precision", "recall", "classes_present"):
        if name in scores:
            parts.append(f"{name} {scores[name]:.2f}")
        elif f"{name}_mean" in scores:
            n = scores.get("scored_clients")
            over = f" over {n} clients" if n else ""
            parts.append(f"{name} {scores[name + '_mean']:.2f}+-{scores[name + '_std']:.2f}{over}")
    return "".join(f" | {p}" for p in parts)
