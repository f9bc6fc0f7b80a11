"""A round's non-finite models: stop the job, or leave those clients out of the round.

After local training the round's flag collective tells every rank how many of each
rank's clients ended with NaN / inf weights. `fed.on_nonfinite: abort` (always for the
baseline) stops the job on every rank, keeping the last good checkpoint; `skip` leaves
those clients out of the round's averages (FedAvg size 0) and restarts them from the
round's start.
"""

from __future__ import annotations

from fedmpi.train import checkpointing
from fedmpi.train.stop import NonFiniteError


def nonfinite_clients(job, r: int, plan, flags, stats: dict) -> list[int]:
    """The clients (numbered 1..N) whose model is not finite: stop the job
    (fed.on_nonfinite=abort, always for the baseline) or leave them out of this round
    (skip)."""
    world, cfg, unit = job.world, job.cfg, job.schedule.unit
    if not flags[:, 1].any():
        return []
    mine = [c + 1 for c in stats.get("nonfinite", ())]
    nonfinite = sorted(c for part in world.allgather(mine) for c in part)
    who = ", ".join(f"client {k}" for k in nonfinite)
    everyone = len(nonfinite) == int(flags[:, 3].sum())  # skipping leaves nothing to train
    if cfg.fed.on_nonfinite == "abort" or everyone:
        if world.is_federator:
            kept = checkpointing.settled_latest(job)
            whose = "the model" if job.solo else f"the model of {who}"
            if job.solo:
                skip = ""
            elif everyone and cfg.fed.on_nonfinite == "skip":
                skip = " Every client diverged, so fed.on_nonfinite=skip has none left to average."
            else:
                skip = " fed.on_nonfinite=skip leaves such clients out of a round instead."
            job.log(
                f"error: {unit} {r}: {whose} is not finite (NaN / inf: diverged? lower "
                f"train.lr). Stopped before aggregation; "
                + (
                    f"the last good checkpoint is {unit} {kept} (--resume {job.run_dir})"
                    if kept
                    else "no checkpoint was written yet"
                )
                + "."
                + skip
            )
        raise NonFiniteError(f"{unit} {r}: non-finite model ({who})")
    if world.is_federator:
        job.log(
            f"warning: round {r}: {who} not finite: left out of this round's averages "
            f"(fed.on_nonfinite=skip); their models restart from the round's start"
        )
        sampled = [c for c in range(len(plan.uploads)) if plan.uploads[c]]
        withheld = job.aggregator.withheld(plan, job.population.round_sizes(sampled, nonfinite))
        if withheld:
            job.log(
                f"warning: round {r}: region(s) {', '.join(withheld)} not averaged "
                f"this round: without {who}, fewer than fed.secure_min_reporters="
                f"{cfg.fed.secure_min_reporters} clients report them, and their "
                f"secure sum would show the federator an upload in the clear"
            )
    single = job.pool is not None and job.pool.single
    if single and world.client + 1 in nonfinite:  # uploads with weight 0, restarts from
        job.round_start.restore(job.trainer)  # the round's start
    return nonfinite
