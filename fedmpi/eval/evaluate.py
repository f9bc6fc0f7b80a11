"""Distributed evaluation: sampling, feature statistics, Frechet distances, sample grids.

- Global model (FULL, USPLIT, centralized): every rank generates its share of the
  `eval.num_samples` images, accumulates feature statistics, and the statistics (one
  float64 buffer) and predicted-class histograms are reduced to the federator, which
  scores them against the reference statistics of the global test set.
- Personal models (UDEC, ULATDEC): each client generates `eval.num_samples` images from
  its own model and scores them against reference statistics the federator broadcast
  (clients receive statistics, never test images); the federator reports mean and
  sample standard deviation over clients plus the per-client table.
- Precision and recall (`eval.precision_recall_k`, `manifold.py`): the generated
  features go to the federator, which holds the real features and their k-NN radii and
  scores every model (a personal model's too: clients never receive real features).

The metric is named by the extractor: `fid` only for pytorch-fid's Inception features,
`fd_classifier` for the offline classifier. Scores go to the run folder's eval.csv and
the sample grids to its samples/ (through RunFolder). `python -m fedmpi.evaluate RUN_DIR`
re-scores a finished run's checkpoints (`rescore.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from fedmpi.config import Config
from fedmpi.data import dataset_info, load_arrays, load_test_data, to_float
from fedmpi.eval.fid import FeatureStats, class_distribution, frechet_distance
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.unet import compile_unet
from fedmpi.runtime import all_cpu_threads, autocast_for, derive_seed
from fedmpi.store.runfolder import RunFolder


def _share(n: int, parts: int, index: int) -> int:
    return n // parts + (1 if index < n % parts else 0)


class Evaluator:
    """Owned by every rank of a job (world=None: a single process)."""

    def __init__(self, cfg: Config, world, run_dir: Path, device: torch.device):
        self.cfg, self.world, self.run_dir, self.device = cfg, world, Path(run_dir), device
        self.folder = RunFolder(run_dir)
        self.rank = world.rank if world else 0
        self.size = world.size if world else 1
        self.diffusion = Diffusion.from_config(cfg.diffusion)
        self.num_classes = dataset_info(cfg.data.dataset)[2]
        self.extractor = None
        self._compiled = {}  # id(model) -> (model, compiled model) for train.compile
        self.ref_mu = self.ref_sigma = None
        self.pr_k = cfg.eval.precision_recall_k if cfg.eval.extractor != "none" else 0
        self.ref_feats = self.ref_radii = None  # the federator's, for precision / recall
        if cfg.eval.extractor == "none":
            return
        from fedmpi.eval.extractors import build_extractor, default_cache_dir, reference_set

        def load_test_split():
            # The federator owns the test split only: the classifier learns from all of
            # it (data.test_subset limits the reference statistics), never from the
            # clients' training data, which rank 0 must not read.
            x, y = load_arrays(dataclasses.replace(cfg.data, test_subset=None), "test")
            return to_float(x), torch.from_numpy(y)

        # The federator builds (and, for the classifier, trains or loads) the extractor
        # first and fills the cache; the other ranks then receive its weights and read
        # no data for evaluation at all.
        if self.rank == 0:
            # in a job the other ranks sleep meanwhile: this rank may use every core
            with all_cpu_threads() if world is not None else contextlib.nullcontext():
                self.extractor = build_extractor(
                    cfg.eval, cfg.data.dataset, load_test_split, device
                )
                test_x, _ = load_test_data(cfg)
                real = to_float(test_x)
                key = f"{cfg.data.dataset}-test{len(real)}"
                cache = default_cache_dir(cfg.eval)
                ref, manifold = reference_set(self.extractor, real, cache, key, self.pr_k)
                if manifold is not None:
                    self.ref_feats, self.ref_radii = manifold
            self.ref_mu, self.ref_sigma = ref.mean(), ref.cov()
        if world is not None:
            world.wait_all()
            state = world.bcast_obj(self.extractor.payload() if self.rank == 0 else None)
            if self.rank != 0:
                from fedmpi.eval.extractors import extractor_from_payload

                self.extractor = extractor_from_payload(state, device)
            dim = self.extractor.dim
            if self.rank != 0:
                self.ref_mu, self.ref_sigma = np.empty(dim), np.empty((dim, dim))
            world.bcast_array(self.ref_mu)
            world.bcast_array(self.ref_sigma)

    # ---------------------------------------------------------------------------
    def _generate(self, model, n: int, seed: int):
        """n samples in batches; yields float tensors in [-1, 1]."""
        e = self.cfg.eval
        channels = model.channels
        size = self.cfg.model.image_size or dataset_info(self.cfg.data.dataset)[1]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        net = self._sampling_net(model)
        done = 0
        while done < n:
            b = min(e.batch_size, n - done)
            # under the training precision: bf16 / fp16 activations, the sampler's own
            # arithmetic in float32
            with autocast_for(self.cfg.train.precision, self.device):
                x = self.diffusion.sample(
                    net,
                    (b, channels, size, size),
                    self.device,
                    e.sampler,
                    e.ddim_steps,
                    e.eta,
                    generator=gen,
                )
            yield x.float()
            done += b

    def _sampling_net(self, model):
        """The model as sampling calls it: compiled once per model object when
        train.compile is on (the weights are read at each call, so the in-place updates
        of later rounds and the EMA swap need no recompilation)."""
        if not self.cfg.train.compile:
            return model
        if id(model) not in self._compiled:  # the model is kept so its id stays its own
            self._compiled[id(model)] = (model, compile_unet(model, self.cfg.train.compile_mode))
        return self._compiled[id(model)][1]

    def _score_local(self, model, n: int, seed: int, keep: int):
        """Stats, class histogram, the first `keep` images and (for precision / recall)
        the features of n local samples."""
        stats = FeatureStats(self.extractor.dim) if self.extractor else None
        hist = np.zeros(self.num_classes, dtype=np.float64)
        kept, feats = [], []
        with torch.no_grad():
            for x in self._generate(model, n, seed):
                have = sum(len(k) for k in kept)
                if have < keep:
                    kept.append(x[: keep - have].cpu())
                if self.extractor is not None:
                    f = self.extractor.features(x)
                    stats.update(f)
                    if self.pr_k:
                        feats.append(torch.as_tensor(f).float().cpu())
                    if hasattr(self.extractor, "predict"):
                        hist += np.bincount(
                            self.extractor.predict(x).cpu().numpy(), minlength=self.num_classes
                        )[: self.num_classes]
        images = torch.cat(kept) if kept else torch.zeros(0)
        return stats, hist, images, torch.cat(feats) if feats else None

    def _manifold(self, feats) -> dict:
        """Precision and recall of generated features against the real ones (federator)."""
        from fedmpi.eval.manifold import precision_recall

        if not self.pr_k or feats is None or len(feats) <= self.pr_k:
            return {}
        return precision_recall(self.ref_feats, feats, self.pr_k, self.ref_radii)

    def _scores(self, stats: FeatureStats, hist: np.ndarray) -> dict:
        out = {}
        if stats is not None and stats.n > 1:
            out[self.extractor.name] = frechet_distance(
                stats.mean(), stats.cov(), self.ref_mu, self.ref_sigma
            )
        if hist.sum() > 0:
            labels = np.repeat(np.arange(self.num_classes), hist.astype(np.int64))
            cd = class_distribution(labels, self.num_classes)
            out.update(
                classes_present=cd["classes_present"],
                classes_present_1pct=cd["classes_present_1pct"],
                kl_from_uniform=cd["kl_from_uniform"],
            )
        return out

    def run(self, index: int, model, personal: bool, clients=None) -> dict | None:
        """Score `model` after round (or epoch) `index`; returns the federator's summary.
        `clients` (personal models, several clients per rank): this rank's (client,
        apply) pairs to score, apply() loading that client's personal regions into
        `model`; None: the rank's one client."""
        was_training = model.training
        if personal:
            result = self._run_personal(index, model, clients)
        else:
            result = self._run_global(index, model)
        model.train(was_training)
        return result

    def _run_global(self, index: int, model) -> dict | None:
        e = self.cfg.eval
        n_local = _share(e.num_samples, self.size, self.rank)
        keep = _share(e.grid, self.size, self.rank)
        stats, hist, images, feats = self._score_local(model, n_local, self._seed(self.rank), keep)
        if self.world is not None:
            self.world.wait_all()
            if stats is not None:
                total = self.world.reduce_array(stats.to_array())
                stats = FeatureStats.from_array(total, stats.dim) if self.rank == 0 else None
            hist = self.world.reduce_array(hist)
            grids = self.world.gather(images)
            parts = self.world.gather(feats) if self.pr_k else None
            if self.rank != 0:
                return None
            images = (
                torch.cat([g for g in grids if len(g)]) if any(len(g) for g in grids) else images
            )
            if parts is not None:
                feats = torch.cat([p for p in parts if p is not None])
        if e.grid and len(images):
            self.folder.save_round_grid(images, index)
        scores = {**self._scores(stats, hist), **self._manifold(feats)}
        self.folder.append_eval(
            [dict(round=index, client="global", num_samples=e.num_samples, **scores)]
        )
        return scores

    def _run_personal(self, index: int, model, clients=None) -> dict | None:
        e = self.cfg.eval
        mine = []
        if self.rank != 0:
            for client, apply in clients if clients is not None else [(self.rank - 1, None)]:
                if apply is not None:
                    apply()
                stats, hist, images, feats = self._score_local(
                    model, e.num_samples, self._seed(client + 1), e.grid
                )
                mine.append((client, self._scores(stats, hist), images, feats))
        self.world.wait_all()
        gathered = self.world.gather(mine)
        if self.rank != 0:
            return None
        rows = sorted(
            ((c, {**s, **self._manifold(f)}, imgs) for part in gathered for c, s, imgs, f in part),
            key=lambda r: r[0],
        )
        for client, _, imgs in rows:
            if e.grid and len(imgs):
                self.folder.save_round_grid(imgs, index, client + 1)
        self.folder.append_eval(
            [dict(round=index, client=c + 1, num_samples=e.num_samples, **s) for c, s, _ in rows]
        )
        out = {}
        if rows and rows[0][1]:
            for key in rows[0][1]:
                vals = np.array([s[key] for _, s, _ in rows], dtype=np.float64)
                out[f"{key}_mean"] = float(vals.mean())
                out[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            out["per_client"] = {str(c + 1): s for c, s, _ in rows}
            out["scored_clients"] = len(rows)
        return out

    def _seed(self, rank: int) -> int:
        """The sampling noise of a rank (of client k's personal model: k + 1, its rank when
        every client has its own): the same after every round (and epoch), so the grids
        of successive rounds show the same samples getting better, and the scores of
        successive rounds differ by the model only. Repeat r > 0 of a run draws other
        noise (run.repeat: the reference's sampler is unseeded)."""
        run = self.cfg.run
        return derive_seed(run.seed, rank, 77, *((run.repeat,) if run.repeat else ()))

    def score_model(self, model, index: int, rank: int = 0) -> dict:
        """Scores of eval.num_samples samples of `model`, in this process alone, written
        nowhere (for `python -m fedmpi.evaluate`). Seeded as rank `rank` is after round
        `index` in training, so a personal model (rank = client number) or a centralized
        model re-scored with the run's own eval settings reproduces its eval.csv row."""
        was_training = model.training
        stats, hist, _, feats = self._score_local(
            model, self.cfg.eval.num_samples, self._seed(rank), 0
        )
        model.train(was_training)
        return {**self._scores(stats, hist), **self._manifold(feats)}

    def close(self) -> None:
        pass
