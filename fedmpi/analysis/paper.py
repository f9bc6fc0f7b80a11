"""The paper's published numbers and the report's cells.

Owns the paper's values (Inception FID on 1,000 samples, /work/shared/PAPER.md: the main
table, the K x E study, the centralized baseline, the parameters exchanged), when a
table's setting is the paper's (`paper_value`), and a cell of a table (`Cell`: mean +-
sample std over runs, or over every client of every run for personal models, with the
runs that did not finish or have no score named).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmpi.analysis.report import RunResult, Table

# ---------------------------------------------------------------- the paper's numbers

# The paper's published numbers (Inception FID on 1,000 samples, /work/shared/PAPER.md).
PAPER_MAIN = {  # (K, split) -> method -> (mean, std); R = 15, E = 5
    (2, "iid"): {
        "full": (38.5, 1.8),
        "usplit": (37.2, 3.1),
        "udec": (49.0, 16.3),
        "ulatdec": (44.7, 13.4),
    },
    (2, "label_skew"): {
        "full": (32.9, 1.1),
        "usplit": (37.6, 4.0),
        "udec": (49.4, 5.3),
        "ulatdec": (48.6, 4.5),
    },
    (2, "quantity_skew"): {
        "full": (33.2, 3.3),
        "usplit": (54.8, 3.6),
        "udec": (78.5, 47.9),
        "ulatdec": (54.0, 24.3),
    },
    (5, "iid"): {
        "full": (39.4, 4.2),
        "usplit": (40.7, 5.1),
        "udec": (51.1, 14.6),
        "ulatdec": (52.6, 14.9),
    },
    (5, "label_skew"): {
        "full": (42.8, 3.7),
        "usplit": (61.4, 5.2),
        "udec": (74.9, 30.9),
        "ulatdec": (72.0, 30.5),
    },
    (5, "quantity_skew"): {
        "full": (22.8, 4.6),
        "usplit": (38.8, 9.0),
        "udec": (139.0, 135.0),
        "ulatdec": (121.7, 138.2),
    },
    (10, "iid"): {
        "full": (60.5, 1.7),
        "usplit": (62.1, 3.1),
        "udec": (71.5, 20.0),
        "ulatdec": (70.2, 14.2),
    },
    (10, "label_skew"): {
        "full": (64.4, 2.8),
        "usplit": (69.6, 7.6),
        "udec": (98.0, 66.5),
        "ulatdec": (100.8, 83.3),
    },
    (10, "quantity_skew"): {
        "full": (75.7, 11.2),
        "usplit": (86.8, 19.0),
        "udec": (146.2, 119.4),
        "ulatdec": (136.8, 125.2),
    },
}
PAPER_K_BY_E = {  # FULL, IID, R = 15: K -> E -> FID (single values, no std published)
    2: {1: 65.7, 2: 40.8, 3: 35.4, 5: 28.2, 8: 31.8},
    5: {1: 105.3, 2: 56.2, 3: 48.9, 5: 39.0, 8: 32.3},
    10: {1: 147.0, 2: 110.9, 3: 70.9, 5: 58.1, 8: 47.8},
}
PAPER_CENTRALIZED = (42.5, 1.1)  # K = 1, 15 epochs
PAPER_PARAMS_K10_R15 = {"full": 898.9e6, "usplit": 674.2e6, "udec": 237.7e6, "ulatdec": 527.5e6}


# What a run must have for its score to stand beside the paper's (PAPER.md; the reference's
# code): key -> (the paper's value, what it is). A personal model is scored right after
# the client's local training (eval.personal local); a global one after the averaging.
PAPER_SETTING = {
    "data.dataset": ("fashion_mnist", "dataset"),
    "data.train_subset": (None, "training set (all 60,000 images)"),
    "data.test_subset": (1000, "reference set (the first 1,000 test images)"),
    "model.dim": (28, "UNet width"),
    "model.dim_mults": ([1, 2, 4], "UNet levels"),
    "diffusion.timesteps": (1000, "diffusion steps"),
    "diffusion.loss": ("huber", "loss"),
    "diffusion.weighting": ("none", "loss weighting"),
    "train.lr": (1e-4, "learning rate"),
    "train.batch_size": (128, "batch size"),
    "train.ema_decay": (0.0, "EMA of the weights (none)"),
    "eval.extractor": ("inception", "features (Inception: FID)"),
    "eval.preprocess": ("reference", "image preprocessing (PNG clamp)"),
    "eval.sampler": ("ddpm", "sampler (1,000-step DDPM)"),
    "eval.num_samples": (1000, "sample count"),
}
PAPER_FED = {"fed.rounds": (15, "rounds"), "fed.local_steps": (None, "local epochs, not steps")}
PAPER_PERSONAL = {"eval.personal": ("local", "scoring point of personal models")}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and list(a) == list(b)
    return a == b


def paper_differences(table: Table, method: str | None = None) -> list[str]:
    """The settings of `table` (and, for a personal `method`, its scoring point) that
    are not the paper's, as 'what: key = value (paper: value)'; [] when all match."""
    s = table.setting
    want = dict(PAPER_SETTING)
    if any(not r.centralized for r in table.runs):
        want.update(PAPER_FED)
    if method in ("udec", "ulatdec"):
        want.update(PAPER_PERSONAL)
    out = []
    for key, (paper, what) in want.items():
        if key in s and not _same(s[key], paper):
            out.append(f"{what}: {key} = {_text(s[key])} (paper: {_text(paper)})")
    return out


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def paper_setting(s: dict) -> bool:
    """Whether a setting is the paper's model and data (for the parameter counts)."""
    return all(
        _same(s.get(k), PAPER_SETTING[k][0])
        for k in ("data.dataset", "model.dim", "model.dim_mults", "diffusion.timesteps")
    )


def paper_value(table: Table, clients, split: str, method: str) -> tuple | None:
    """(mean, std or None) the paper published for this cell, if the table's setting is
    the paper's on every item of PAPER_SETTING (see paper_differences)."""
    if paper_differences(table, method):
        return None
    s = table.setting
    if split == "centralized":
        runs = list(table.cell_runs(clients, split, method))
        return PAPER_CENTRALIZED if runs and runs[0].cfg.train.epochs == 15 else None
    e = s.get("fed.local_epochs")
    if e == 5 and (clients, split) in PAPER_MAIN:
        return PAPER_MAIN[(clients, split)].get(method)
    if method == "full" and split == "iid" and e in PAPER_K_BY_E.get(clients, {}):
        return PAPER_K_BY_E[clients][e], None
    return None


def paper_k_by_e(table: Table, clients, e) -> tuple | None:
    """The paper's K x E value (FULL, IID; its own runs, not the main table's) for a
    table of local epochs `e` whose settings are the paper's."""
    if paper_differences(table, "full") or e not in PAPER_K_BY_E.get(clients, {}):
        return None
    return PAPER_K_BY_E[clients][e], None


# ---------------------------------------------------------------- cells


def fmt_value(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def millions(p: float) -> str:
    return f"{p / 1e6:,.1f}M" if p >= 1e7 else f"{p / 1e6:.3g}M"


@dataclass
class Cell:
    runs: list[RunResult]

    @property
    def values(self) -> list[float]:
        return [v for r in self.runs if r.scored for v in r.scores]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:  # sample std (ddof 1), as the reference reports
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        """95% confidence interval of the mean (Student's t, n - 1 degrees of freedom)."""
        n = len(self.values)
        if n < 2:
            return None
        from scipy import stats

        half = float(stats.t.ppf(0.975, n - 1)) * self.std / math.sqrt(n)
        return self.mean - half, self.mean + half

    def incomplete(self) -> list[RunResult]:
        return [r for r in self.runs if not r.progress.finished]

    def unscored(self) -> list[RunResult]:
        return [r for r in self.runs if r.progress.finished and not r.scores]

    def text(self, paper: tuple | None) -> str:
        if not self.runs:
            return ""
        parts = []
        scored = [r for r in self.runs if r.scored]
        if scored:
            n = f"{len(scored)} run{'s' if len(scored) > 1 else ''}"
            if any(r.personal for r in scored):
                n += f", n={len(self.values)}"
            sd = f" ± {fmt_value(self.std)}" if self.std is not None else ""
            ci = self.ci95
            ci = f" [{fmt_value(ci[0])}, {fmt_value(ci[1])}]" if ci else ""
            parts.append(f"{fmt_value(self.mean)}{sd}{ci} ({n})")
        if paper:
            parts.append(
                f"paper {fmt_value(paper[0])}" + (f" ± {fmt_value(paper[1])}" if paper[1] else "")
            )
        inc = self.incomplete()
        if inc:
            prog = ", ".join(f"{r.progress.done}/{r.progress.total}" for r in inc)
            unit = inc[0].progress.unit
            count = f"{len(inc)} " if scored or len(inc) > 1 else ""
            parts.append(f"{count}incomplete ({prog} {unit})")
        for note in sorted({r.note for r in self.unscored()}):
            parts.append(note)
        return "; ".join(parts)


def welch(a: Cell, b: Cell) -> tuple[float, float] | None:
    """Welch's t-test (unequal variances) of two cells' values: (t, two-sided p), or None
    with fewer than two values on a side or no spread at all."""
    x, y = a.values, b.values
    if len(x) < 2 or len(y) < 2 or (np.std(x) == 0 and np.std(y) == 0):
        return None
    from scipy import stats

    res = stats.ttest_ind(x, y, equal_var=False)
    return float(res.statistic), float(res.pvalue)
