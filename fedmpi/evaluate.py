"""Distributed evaluation: sampling, feature statistics, Frechet distances, sample grids.

- Global model (FULL, USPLIT, centralized): every rank generates its share of the
  `eval.num_samples` images, accumulates feature statistics, and the statistics (one
  float64 buffer) and predicted-class histograms are reduced to the federator, which
  scores them against the reference statistics of the global test set.
- Personal models (UDEC, ULATDEC): each client generates `eval.num_samples` images from
  its own model and scores them against reference statistics the federator broadcast
  (clients receive statistics, never test images); the federator reports mean and
  sample standard deviation over clients plus the per-client table.

The metric is named by the extractor: `fid` only for pytorch-fid's Inception features,
`fd_classifier` for the offline classifier. `python -m fedmpi.evaluate RUN_DIR`
re-scores a finished run's checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError, load_config
from .data import DataError, dataset_info, load_arrays, load_test_data, to_float
from .diffusion import Diffusion
from .fid import FeatureStats, class_distribution, frechet_distance
from .metrics import append_csv, save_grid
from .trainer import derive_seed


def _cache_dir(cfg: Config) -> Path:
    return Path(cfg.eval.cache_dir or Path.home() / ".cache" / "fedmpi").expanduser()


def _share(n: int, parts: int, index: int) -> int:
    return n // parts + (1 if index < n % parts else 0)


class Evaluator:
    """Owned by every rank of a job (world=None: a single process)."""

    def __init__(self, cfg: Config, world, run_dir: Path, device: torch.device):
        self.cfg, self.world, self.run_dir, self.device = cfg, world, Path(run_dir), device
        self.rank = world.rank if world else 0
        self.size = world.size if world else 1
        self.diffusion = Diffusion.from_config(cfg.diffusion)
        self.num_classes = dataset_info(cfg.data.dataset)[2]
        self.extractor = None
        self.ref_mu = self.ref_sigma = None
        if cfg.eval.extractor == "none":
            return
        from .extractors import build_extractor, reference_stats

        def load_data():
            # the classifier always learns from the full real training set
            full = dataclasses.replace(cfg.data, train_subset=None, test_subset=None)
            tr_x, tr_y = load_arrays(full, "train")
            te_x, te_y = load_arrays(full, "test")
            return (to_float(tr_x), torch.from_numpy(tr_y), to_float(te_x), torch.from_numpy(te_y))

        # The federator builds (and, for the classifier, trains or loads) the extractor
        # first and fills the cache; the other ranks then receive its weights.
        if self.rank == 0:
            self.extractor = build_extractor(cfg.eval, cfg.data.dataset, load_data, device)
            test_x, _ = load_test_data(cfg)
            ref = reference_stats(self.extractor, to_float(test_x), _cache_dir(cfg),
                                  f"{cfg.data.dataset}-test{len(test_x)}")
            self.ref_mu, self.ref_sigma = ref.mean(), ref.cov()
        if world is not None:
            state = world.bcast_obj(self.extractor.payload() if self.rank == 0 else None)
            if self.rank != 0:
                from .extractors import extractor_from_payload
                self.extractor = extractor_from_payload(state, device)
            dim = self.extractor.dim
            if self.rank != 0:
                self.ref_mu, self.ref_sigma = np.empty(dim), np.empty((dim, dim))
            world.comm.Bcast(self.ref_mu, root=0)
            world.comm.Bcast(self.ref_sigma, root=0)

    # ---------------------------------------------------------------------------
    def _generate(self, model, n: int, seed: int):
        """n samples in batches; yields float tensors in [-1, 1]."""
        e = self.cfg.eval
        channels = model.channels
        size = self.cfg.model.image_size or dataset_info(self.cfg.data.dataset)[1]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        done = 0
        while done < n:
            b = min(e.batch_size, n - done)
            yield self.diffusion.sample(model, (b, channels, size, size), self.device,
                                        e.sampler, e.ddim_steps, e.eta, generator=gen)
            done += b

    def _score_local(self, model, n: int, seed: int, keep: int):
        """Stats, class histogram and the first `keep` images of n local samples."""
        stats = FeatureStats(self.extractor.dim) if self.extractor else None
        hist = np.zeros(self.num_classes, dtype=np.float64)
        kept = []
        with torch.no_grad():
            for x in self._generate(model, n, seed):
                have = sum(len(k) for k in kept)
                if have < keep:
                    kept.append(x[:keep - have].cpu())
                if self.extractor is not None:
                    stats.update(self.extractor.features(x))
                    if hasattr(self.extractor, "predict"):
                        hist += np.bincount(self.extractor.predict(x).cpu().numpy(),
                                            minlength=self.num_classes)[:self.num_classes]
        images = torch.cat(kept) if kept else torch.zeros(0)
        return stats, hist, images

    def _scores(self, stats: FeatureStats, hist: np.ndarray) -> dict:
        out = {}
        if stats is not None and stats.n > 1:
            out[self.extractor.name] = frechet_distance(stats.mean(), stats.cov(),
                                                        self.ref_mu, self.ref_sigma)
        if hist.sum() > 0:
            labels = np.repeat(np.arange(self.num_classes), hist.astype(np.int64))
            cd = class_distribution(labels, self.num_classes)
            out.update(classes_present=cd["classes_present"],
                       classes_present_1pct=cd["classes_present_1pct"],
                       kl_from_uniform=cd["kl_from_uniform"])
        return out

    def run(self, index: int, model, personal: bool) -> Optional[dict]:
        """Score `model` after round (or epoch) `index`; returns the federator's summary."""
        e = self.cfg.eval
        was_training = model.training
        if personal:
            result = self._run_personal(index, model)
        else:
            result = self._run_global(index, model)
        model.train(was_training)
        return result

    def _run_global(self, index: int, model) -> Optional[dict]:
        e = self.cfg.eval
        n_local = _share(e.num_samples, self.size, self.rank)
        keep = _share(e.grid, self.size, self.rank)
        stats, hist, images = self._score_local(model, n_local,
                                                derive_seed(self.cfg.run.seed, index, self.rank, 77),
                                                keep)
        if self.world is not None:
            if stats is not None:
                total = self.world.reduce_array(stats.to_array())
                stats = FeatureStats.from_array(total, stats.dim) if self.rank == 0 else None
            hist = self.world.reduce_array(hist)
            grids = self.world.gather(images)
            if self.rank != 0:
                return None
            images = torch.cat([g for g in grids if len(g)]) if any(len(g) for g in grids) else images
        if e.grid and len(images):
            save_grid(images, self.run_dir / "samples" / f"round_{index:04d}.png")
        scores = self._scores(stats, hist)
        append_csv(self.run_dir / "eval.csv", [dict(round=index, client="global",
                                                     num_samples=e.num_samples, **scores)])
        return scores

    def _run_personal(self, index: int, model) -> Optional[dict]:
        e = self.cfg.eval
        mine = {}
        images = torch.zeros(0)
        if self.rank != 0:
            stats, hist, images = self._score_local(
                model, e.num_samples, derive_seed(self.cfg.run.seed, index, self.rank, 77), e.grid)
            mine = self._scores(stats, hist)
        rows = self.world.gather((self.rank - 1, mine, images))
        if self.rank != 0:
            return None
        rows = [r for r in rows if r[0] >= 0]
        for client, _, imgs in rows:
            if e.grid and len(imgs):
                save_grid(imgs, self.run_dir / "samples" / f"round_{index:04d}_client_{client + 1:03d}.png")
        append_csv(self.run_dir / "eval.csv", [dict(round=index, client=c + 1,
                                                     num_samples=e.num_samples, **s)
                                                for c, s, _ in rows])
        out = {}
        if rows and rows[0][1]:
            for key in rows[0][1]:
                vals = np.array([s[key] for _, s, _ in rows], dtype=np.float64)
                out[f"{key}_mean"] = float(vals.mean())
                out[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            out["per_client"] = {str(c + 1): s for c, s, _ in rows}
        return out

    def close(self) -> None:
        pass
