"""Re-scoring a finished run's checkpoints in one process (`python -m fedmpi.evaluate`).

Owns `rescore`: the checkpoint of one round (epoch) is read through RunFolder, each of its
models is scored by `Evaluator.score_model` with the seeds training used (so a re-score
with the run's own eval settings reproduces its eval.csv rows), the scores are printed
as a table and written to RUN_DIR/rescore_<extractor>[_reference][_local]_round_<N>.csv
(eval.preprocess=reference, eval.personal=local); eval.csv is left alone. Global models
(FULL, USPLIT, centralized): the federator's (or model.pt's) model. Personal models (UDEC,
ULATDEC): every client_NNN.pt at the scoring point eval.personal names (local: the client's
model right after its local training; aggregated: its personal regions with the averaged
shared ones), then mean and sample std.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedmpi.config import Config, ConfigError
from fedmpi.eval.evaluate import Evaluator
from fedmpi.store.runfolder import RunFolder
from fedmpi.store.tables import format_table

# the columns of a re-score row that are not scores
_NOT_SCORES = ("round", "client", "checkpoint", "num_samples", "sampler", "ddim_steps", "seconds")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


def _rescore_table(rows: list[dict], keys: list[str]) -> str:
    """The re-scored models, one row each (a rule before the mean and std rows)."""
    head = ["client"] + keys + ["seconds"]
    body = []
    for r in rows:
        if r["client"] == "mean":
            body.append(None)
        body.append(
            [r["client"]]
            + [_fmt(r.get(k, "")) for k in keys]
            + [_fmt(r["seconds"]) if "seconds" in r else ""]
        )
    return format_table(head, body, align="r" * len(head))


def _checkpoint_index(run: RunFolder, index: int | None) -> int:
    """`index`, or the latest complete checkpoint; ConfigError when there is none."""
    done = run.complete_checkpoints()
    if not done:
        raise ConfigError(
            f"{run} has no complete checkpoint (checkpoints/round_*/COMPLETE); nothing to re-score"
        )
    if index is None:
        return done[-1]
    if index not in done:
        raise ConfigError(
            f"{run} has no complete checkpoint for round {index}; "
            f"complete: {', '.join(map(str, done))}"
        )
    return index


def _models(run: RunFolder, index: int, cfg: Config) -> tuple[str, bool, list[tuple[str, Path]]]:
    """(method, personal, [(client label, path)]) of the models to score in checkpoint `index`."""
    from fedmpi.fl.methods import personal_regions

    centralized, files = run.checkpoint_models(index)
    if not files:
        raise ConfigError(
            f"{run.checkpoint_dir(index)} holds no model.pt, federator.pt or client_NNN.pt"
        )
    method = "centralized" if centralized else cfg.fed.method
    personal = not centralized and bool(personal_regions(method))
    ranks = sum(label != "global" for label, _ in files)
    if personal and len(run.read_placement()) > ranks:
        raise ConfigError(
            f"{run} ran {len(run.read_placement())} clients on {ranks} ranks: their "
            f"personal models live in the run's state/ files, which re-scoring does not read "
            f"yet; the run's own eval.csv scores them (eval.clients)"
        )
    if personal:
        files = [f for f in files if f[0] != "global"]
        if not files:
            raise ConfigError(
                f"{method} keeps personal models but round {index}'s checkpoint "
                f"has no client_NNN.pt"
            )
    elif files[0][0] != "global":
        raise ConfigError(f"round {index}'s checkpoint has no federator.pt")
    else:
        files = files[:1]
    return method, personal, files


def _load(model, path: Path, personal: bool, device, local: bool = False) -> None:
    """Load a checkpoint's weights into `model` (the EMA weights when training kept them).
    Tensors and primitives only: never runs code. A client file holds its personal
    regions; the shared ones are the federator's average (eval.personal=aggregated) or,
    with `local` (eval.personal=local), the client's own from right after its local
    training, before the averaging (its `local_model` entries)."""
    from fedmpi.store.checkpoint import client_state, load_checkpoint

    if personal:
        state, ckpt = client_state(path.parent, path.name, device)
        if local:
            if ckpt.get("local_model") is None:
                raise ConfigError(
                    f"{path} holds no model from before the round's averaging (the run "
                    f"was trained with eval.personal=aggregated, or by an older fedmpi): "
                    f"re-score the averaged model with --eval.personal=aggregated"
                )
            state.update(ckpt["local_model"])
    else:
        ckpt = load_checkpoint(path, device)
        state = ckpt["model"]
    try:
        model.load_state_dict(state)
        if ckpt.get("ema") is not None:  # train.ema_decay: training scored the EMA weights
            model.load_state_dict(ckpt["ema"]["shadow"], strict=False)
    except (RuntimeError, KeyError) as err:
        detail = " ".join(str(err).split())
        raise ConfigError(
            f"{path} does not fit the model of the run's config "
            f"(model.* overridden?): {detail[:400]}"
        ) from None


def _mean_std_rows(rows: list[dict], keys: list[str]) -> tuple[dict, dict, dict]:
    """(mean row, std row, {key_mean, key_std}) over the clients' rows (sample std)."""
    first = rows[0]
    mean = dict(
        round=first["round"],
        client="mean",
        checkpoint="",
        num_samples=first["num_samples"],
        sampler=first["sampler"],
        ddim_steps=first["ddim_steps"],
    )
    std = dict(mean, client="std")
    summary = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        mean[k] = float(vals.mean())
        std[k] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        summary[f"{k}_mean"], summary[f"{k}_std"] = mean[k], std[k]
    return mean, std, summary


def rescore(run_dir: Path, index: int | None, cfg: Config, device=None, log=print) -> dict:
    """Score the checkpoint of round (epoch) `index` (None: the latest complete one).

    Returns {"round", "method", "rows" (per model), "summary" (personal: mean / std),
    "csv" (path written)}; raises ConfigError for user errors."""
    from fedmpi.model.summary import model_shape
    from fedmpi.model.unet import build_unet
    from fedmpi.runtime import pick_device

    run = RunFolder(run_dir)
    index = _checkpoint_index(run, index)
    method, personal, files = _models(run, index, cfg)
    device = device or pick_device(cfg.run.device)
    channels, size = model_shape(cfg)
    model = build_unet(cfg.model, channels, size).to(device)
    model.channels_last = cfg.train.channels_last  # sampling as the run trained
    e = cfg.eval
    log(
        f"re-scoring {run_dir}: {method.upper() if method != 'centralized' else method}, "
        f"checkpoint of {'epoch' if method == 'centralized' else 'round'} {index}, "
        f"{len(files)} model{'s' if len(files) > 1 else ''} x {e.num_samples} samples "
        f"({e.sampler}{f' {e.ddim_steps} steps' if e.sampler == 'ddim' else ''}), "
        f"extractor {e.extractor} ({e.preprocess} preprocessing), "
        + (f"personal models {e.personal}, " if personal else "")
        + f"device {device}"
    )
    evaluator = None
    rows = []
    local = personal and e.personal == "local"
    for client, path in files:
        _load(model, path, personal, device, local)
        if evaluator is None:  # after the first checkpoint loaded: no extractor work for nothing
            evaluator = Evaluator(cfg, None, run_dir, device)
        t0 = time.perf_counter()
        rank = int(client) if personal else 0  # the seeds training used (see score_model)
        scores = evaluator.score_model(model, index, rank)
        rows.append(
            dict(
                round=index,
                client=client if personal else "global",
                checkpoint=path.name,
                num_samples=e.num_samples,
                sampler=e.sampler,
                ddim_steps=e.ddim_steps,
                **scores,
                seconds=round(time.perf_counter() - t0, 2),
            )
        )
    keys = [k for k in rows[0] if k not in _NOT_SCORES]
    summary, out_rows = {}, list(rows)
    if personal:
        mean, std, summary = _mean_std_rows(rows, keys)
        out_rows += [mean, std]
    log(_rescore_table(out_rows, keys))
    if personal and keys:
        k = keys[0]
        log(
            f"{k}: {summary[k + '_mean']:.3f} +- {summary[k + '_std']:.3f} "
            f"(mean +- sample std over {len(rows)} clients)"
        )
    # what was scored, in the file's name: rescore_classifier[_reference][_local]_round_N
    tag = e.extractor + ("_reference" if e.preprocess == "reference" else "")
    csv_path = run.write_rescore(out_rows, tag + ("_local" if local else ""), index)
    log(f"wrote {csv_path}")
    return {
        "round": index,
        "method": method,
        "rows": rows,
        "summary": summary,
        "csv": str(csv_path),
    }
