"""Writing a checkpoint as one job: every rank its own file, then the federator's marker.

Every rank writes its file (`state.rank_state`); the federator marks the round COMPLETE
(with each file's sha256) only when every rank wrote a finite model, then prunes older
rounds. A write error on any rank stops every rank together with the OS message.
"""

from __future__ import annotations

from fedmpi.errors import DiskError
from fedmpi.model.regions import all_finite, finite
from fedmpi.store.checkpoint import atomic_save
from fedmpi.train import state
from fedmpi.train.stop import CheckpointWriteError, NonFiniteError


def write(job, index: int, final: bool = True, on_complete=None) -> None:
    """Checkpoint round (epoch) `index` of `job` on every rank.

    With a background writer (checkpoint.background) and `final=False`, the federator's
    own file and then the marker are written by the writer's thread after this returns;
    the caller must not change the federator's model (nor, in the baseline, its optimizer)
    before `writer.join()` (the round loop joins at the start of the next round). A failure
    is reported by the next call, or at the end. `on_complete`: called on the federator
    once the marker is written (the SIGTERM note)."""
    cfg, world, run, writer = job.cfg, job.world, job.run_dir, job.writer
    d, name = run.checkpoint_dir(index), state.file_name(world)
    steps = sum(job.schedule.steps(i) for i in range(1, index + 1))

    def contents() -> dict:
        obj = state.rank_state(cfg, world, index, job.model, job.trainer, job.ema, steps)
        return state.add_job_state(obj, job)

    background = world.is_federator and writer.enabled and not final
    obj = None if background else contents()  # background: built by the thread
    # the federator's whole model; a client's own entries (after an abandoned round its
    # shared regions hold that round's training, which is not written)
    finite_now = (
        all_finite(job.model)
        if world.is_federator
        else finite(*[t for t in obj["model"].values() if t.is_floating_point()])
    )
    mine = {"name": name, "sha256": None, "error": writer.wait(), "finite": finite_now}
    if mine["finite"] and not mine["error"] and not background:
        try:
            mine["sha256"] = atomic_save(obj, d / name)
        except DiskError as e:
            mine["error"] = str(e)
    if mine["sha256"] and not world.is_federator:
        state.collect_client_states(job)  # personal-region files no checkpoint refers to
    world.wait_all("checkpoint")
    results = world.allgather(mine)
    errors = [f"rank {rank}: {r['error']}" for rank, r in enumerate(results) if r["error"]]
    if errors:
        job.log(
            f"error: could not write a checkpoint: {'; '.join(errors)}. Earlier checkpoints "
            f"are intact; free space (or fix the folder) and resume with --resume {run}"
        )
        raise CheckpointWriteError(errors[0])
    bad = [rank for rank, r in enumerate(results) if not r["finite"]]
    if bad:  # never mark (and so never prune for) a checkpoint holding NaN / inf
        job.log(
            f"error: {job.schedule.unit} {index}: the model of rank(s) {bad} is not finite; "
            f"checkpoint not written, earlier checkpoints kept"
        )
        raise NonFiniteError(f"non-finite model at checkpoint of {job.schedule.unit} {index}")
    if world.is_federator:
        files = {r["name"]: r["sha256"] for r in results}

        def finish():
            if background:
                files[name] = atomic_save(contents(), d / name)
            run.mark_complete(index, cfg.checkpoint.keep, files)
            if on_complete is not None:
                on_complete()

        if background:
            writer.submit(finish)
        else:
            finish()


def settled_latest(job):
    """The federator's newest complete checkpoint once any write in flight has finished
    (a failed one is logged and leaves its round incomplete)."""
    error = job.writer.wait()
    if error:
        job.log(f"warning: a background checkpoint write failed ({error})")
    return job.run_dir.latest_complete()


def latest_complete_bcast(job):
    """`settled_latest` on every rank (the caller writes that round again if it failed)."""
    world = job.world
    return world.bcast_obj(settled_latest(job) if world.is_federator else None)
