"""The config schema: frozen dataclasses, one per section, with every key's meaning as a
comment (`--print-config` reads those comments), the allowed `CHOICES` of free-text keys
and the `RANGES` of numeric keys.

Every numeric key has an entry in `RANGES` (tests/config/test_config.py fails for a new
numeric key without one), every free-text choice an entry in `CHOICES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


@dataclass(frozen=True)
class RunCfg:
    name: str = "run"
    out_dir: str = "runs"  # run folders are created under this
    seed: int = 2023
    # Which repeat of an experiment this run is (a sweep's `repeats`). Training draws
    # only from run.seed; the evaluation's sampling noise also from the repeat, so that
    # repeats with one fixed seed differ as the reference's (unseeded sampler) do.
    repeat: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # seconds between a client's progress reports to the federator, which shows the
    # round's live progress (0: no live progress); results do not depend on it
    progress_every: float = 2.0


@dataclass(frozen=True)
class DataCfg:
    dataset: str = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | celeba (64 x 64)
    root: str | None = None  # None: auto-detect (Debian package, ./data, torchvision layout)
    download: bool = True  # allow torchvision's downloader when files are missing
    shards: str | None = None  # HDF5 file written by `python -m fedmpi.data split`
    train_subset: int | None = None  # use the first N training images (quick runs)
    test_subset: int | None = None  # use the first N test images


@dataclass(frozen=True)
class SplitCfg:
    kind: str = "iid"  # iid | label_skew | quantity_skew | shards
    beta: float = 0.5  # Dirichlet concentration (label_skew, quantity_skew)
    min_size: int = 10  # label_skew / quantity_skew: redraw until every client has this many
    classes_per_client: int = 2  # shards
    num_clients: int | None = None  # None: taken from the MPI world size (W - 1)
    seed: int | None = None  # None: run.seed
    rng: str = "default"  # default (numpy Generator) | numpy_legacy (the reference's exact draws)


@dataclass(frozen=True)
class ModelCfg:
    dim: int = 28
    init_dim: int | None = None  # None: dim // 3 * 2 (the paper's model)
    dim_mults: tuple = (1, 2, 4)
    channels: int | None = None  # None: from the dataset
    image_size: int | None = None  # None: from the dataset
    convnext_mult: int = 2
    attn_heads: int = 4
    attn_dim_head: int = 32


@dataclass(frozen=True)
class DiffusionCfg:
    timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: str = "huber"  # huber (reference code) | mse (DDPM default) | l1
    # Per-timestep loss weight (recipe for short runs, none in configs/paper): min_snr is
    # Min-SNR-gamma (Hang et al. 2023), min(SNR_t, gamma) / SNR_t for epsilon prediction:
    # the easy low-noise steps count less, so the coarse structure is learnt sooner.
    weighting: str = "none"  # none | min_snr
    snr_gamma: float = 5.0


@dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-4
    # the clients' (and the baseline's) optimizer: adam (the paper) | sgd (with momentum)
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    batch_size: int = 128
    epochs: int = 15  # centralized baseline epochs
    max_steps: int | None = None  # centralized: stop after this many optimizer steps
    log_every: int = 50  # steps between metrics rows
    num_workers: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of forward/backward (weights stay fp32)
    compile: bool = False  # torch.compile the UNet for training and sampling
    # torch.compile mode: default | reduce-overhead (each call replayed as CUDA graphs: one
    # launch instead of ~1,500 kernels per step; CUDA only, the default mode on a CPU) |
    # max-autotune
    compile_mode: str = "default"
    channels_last: bool = False  # NHWC activations: faster convolutions (CPU oneDNN, tensor cores)
    # centralized: Adam re-created at every epoch, as the reference's baseline (FULL with
    # K = 1, E = 1 per round) does
    reset_optimizer_every_epoch: bool = False
    # Recipe for short runs (fedmpi.train.trainer; all off in configs/paper): the learning rate
    # warms up linearly over warmup_steps, then stays (constant) or decays along a half
    # cosine to lr_min at the run's last step (cosine); steps are counted over the whole
    # run (federated: rounds x local steps of the client).
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    lr_min: float = 0.0
    # EMA of the weights for sampling / scoring (0: off; e.g. 0.999 per optimizer step).
    # Federated: every rank averages the global model after each aggregation (FULL,
    # USPLIT), or each client its local training (UDEC, ULATDEC); never communicated.
    ema_decay: float = 0.0
    # Clip each step's gradient to this L2 norm (0: off), for high learning rates.
    # Not DP: client-level DP clips each client's round update (privacy.clip).
    grad_clip: float = 0.0


@dataclass(frozen=True)
class FedCfg:
    method: str = "full"  # full | usplit | udec | ulatdec
    rounds: int = 15
    local_epochs: int = 5
    local_steps: int | None = None  # if set, overrides local_epochs
    backend: str = "mpi"  # mpi | torch
    reset_optimizer: bool = True  # re-create Adam every round (paper)
    freeze_unshared: bool = False  # only train regions this client reports
    # What to do when a client's update or the aggregate is not finite (NaN/inf):
    # abort the job keeping the last good checkpoint, or skip those clients this round.
    on_nonfinite: str = "abort"  # abort | skip
    # Seconds the waiting ranks give the slowest rank to reach the next collective
    # before aborting with a message (0: wait forever).
    round_timeout: float = 0.0
    # Secure aggregation (fedmpi.fl.secure): pairwise-masked fixed-point uploads reduced
    # with an integer SUM; the federator sees only each region's sum. Uploads cost 8
    # bytes per value instead of 4.
    secure: bool = False
    secure_frac_bits: int = 24  # fixed-point fraction bits (resolution 2^-frac_bits)
    secure_min_reporters: int = 2  # 1: accept regions with a single reporter, in the clear
    secure_neighbors: int | None = None  # mask with k ring neighbours each side (None: all)
    # Virtual clients (fedmpi.fl.population): N clients spread over the client ranks
    # (None: one per client rank, the cross-silo layout), and the share of them that
    # takes part in each round: fixed draws round(C * N) clients, poisson each with
    # probability C (the form DP's accountant amplifies).
    clients: int | None = None
    participation: float = 1.0  # C
    sampling: str = "fixed"  # fixed | poisson
    # Memory (MiB) a client rank may use for its clients' personal regions (UDEC,
    # ULATDEC) between rounds; beyond it they are spilled to the run folder.
    client_state_mb: float = 2048.0
    # FedProx: (mu / 2) ||w - w_global||^2 added to each client's objective (0: off)
    prox_mu: float = 0.0
    # Server optimizer on the averaged update (Reddi et al., ICLR 2021): none is FedAvg
    server_opt: str = "none"  # none | fedavgm | fedadam | fedyogi
    server_lr: float = 1.0
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadam, fedyogi
    server_beta2: float = 0.99
    server_tau: float = 1.0e-3  # adaptivity (epsilon) of fedadam, fedyogi
    # Compressed uploads (fedmpi.fl.compress): each client sends its update (weights
    # minus the round's start) as bf16, int8 (a shared scale per 1,024 values) or its top-k
    # entries (topk_fraction of them); error feedback carries what was not sent into
    # the next round's update. Downloads stay float32.
    compress: str = "none"  # none | bf16 | int8 | topk
    topk_fraction: float = 0.01
    error_feedback: bool = True


@dataclass(frozen=True)
class EvalCfg:
    every: int = 0  # rounds (federated) or epochs (centralized); 0: only at the end
    num_samples: int = 1000
    sampler: str = "ddim"  # ddim | ddpm
    ddim_steps: int = 100
    eta: float = 0.0
    batch_size: int = 250
    extractor: str = "classifier"  # classifier | inception | none
    inception_weights: str | None = None  # path to pt_inception-2015-12-05-6726825d.pth
    classifier_weights: str | None = None  # fd_classifier file; None: train on the test split
    cache_dir: str | None = None  # None: ~/.cache/fedmpi
    grid: int = 64  # images in each PNG sample grid (0: none)
    # [-1, 1] images -> extractor input, real and generated alike: exact maps (x + 1) / 2;
    # reference writes PNGs as the reference's save_image does (below 0 clamped to black)
    preprocess: str = "exact"
    # UDEC / ULATDEC: score each client's model right after its local training, before
    # the round's aggregation (local: its own decoder, as the reference scores), or after
    # it (aggregated: personal encoder + the averaged shared regions)
    personal: str = "aggregated"
    # UDEC / ULATDEC with many clients: score this many clients' personal models, a
    # deterministic sample (None: every client)
    clients: int | None = None
    # precision and recall (Kynkaanniemi et al. 2019) on the extractor's features: k of
    # the k-NN manifolds (the paper's 3; 0: not computed)
    precision_recall_k: int = 3


@dataclass(frozen=True)
class PrivacyCfg:
    # Client-level DP-FedAvg (fedmpi.fl.privacy): each client's update of the shared regions
    # is clipped to L2 norm `clip`, uploads are weighted uniformly, and Gaussian noise of
    # std noise_multiplier * clip is added to each region's sum.
    dp: bool = False
    clip: float = 1.0  # C: L2 bound of one client's update (all shared regions)
    noise_multiplier: float = 1.0  # z: noise std on the sum = z * C
    delta: float = 1.0e-5  # the delta of the reported (epsilon, delta)
    mode: str = "central"  # central (federator adds noise) | distributed (clients do)


@dataclass(frozen=True)
class CheckpointCfg:
    every: int = 1  # rounds (federated) or epochs (centralized); 0: only at the end
    keep: int = 2  # most recent checkpoints kept (0: keep all)
    # federated: the federator's file and the marker written by a thread while the next
    # round runs (fedmpi.store.checkpoint.BackgroundWriter); the last round's always at once
    background: bool = True


@dataclass(frozen=True)
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    fed: FedCfg = field(default_factory=FedCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    privacy: PrivacyCfg = field(default_factory=PrivacyCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def dotted(self) -> dict[str, Any]:
        """Every key as 'section.key' -> value (lists for tuples)."""
        return {
            f"{section}.{key}": value
            for section, part in self.to_dict().items()
            for key, value in part.items()
        }

    def replace(self, dotted: dict[str, Any]) -> Config:
        """A copy with dotted keys replaced (values already typed), re-validated."""
        from fedmpi.config.loader import _set_dotted, from_dict

        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, key, value, "<replace>")
        return from_dict(data, "<replace>")


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "data.dataset": ("fashion_mnist", "mnist", "cifar10", "celeba"),
    "split.kind": ("iid", "label_skew", "quantity_skew", "shards"),
    "split.rng": ("default", "numpy_legacy"),
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.loss": ("huber", "mse", "l1"),
    "diffusion.weighting": ("none", "min_snr"),
    "fed.method": ("full", "usplit", "udec", "ulatdec"),
    "fed.backend": ("mpi", "torch"),
    "fed.on_nonfinite": ("abort", "skip"),
    "fed.sampling": ("fixed", "poisson"),
    "fed.server_opt": ("none", "fedavgm", "fedadam", "fedyogi"),
    "fed.compress": ("none", "bf16", "int8", "topk"),
    "train.lr_schedule": ("constant", "cosine"),
    "eval.sampler": ("ddim", "ddpm"),
    "eval.extractor": ("classifier", "inception", "none"),
    "eval.personal": ("aggregated", "local"),
    "eval.preprocess": ("exact", "reference"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.optimizer": ("adam", "sgd"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "privacy.mode": ("central", "distributed"),
}


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric key: lo..hi, each end open (excluded) or closed."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        return (self.lo < v if self.lo_open else self.lo <= v) and (
            v < self.hi if self.hi_open else v <= self.hi
        )

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return (
            f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        )


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
UNIT_OPEN = Range(0, 1, lo_open=True, hi_open=True)

# Every numeric key (int, float, Optional ones: null is always allowed for those; the
# elements of model.dim_mults) -> its allowed range. Checked by _validate.
RANGES = {
    "run.seed": Range(0, 2**63 - 1),  # numpy SeedSequence needs >= 0; HDF5 attr int64
    "run.repeat": Range(0, 10_000),
    "run.progress_every": NON_NEGATIVE,  # 0: off
    "data.train_subset": POSITIVE,
    "data.test_subset": POSITIVE,
    "split.beta": POSITIVE,  # Dirichlet concentration
    "split.min_size": NON_NEGATIVE,
    "split.classes_per_client": POSITIVE,
    "split.num_clients": POSITIVE,
    "split.seed": Range(0, 2**63 - 1),
    "model.dim": POSITIVE,
    "model.init_dim": POSITIVE,
    "model.dim_mults": POSITIVE,
    "model.channels": POSITIVE,
    "model.image_size": POSITIVE,
    "model.convnext_mult": POSITIVE,
    "model.attn_heads": POSITIVE,
    "model.attn_dim_head": POSITIVE,
    "diffusion.timesteps": POSITIVE,
    "diffusion.beta_start": UNIT_OPEN,  # variances: alpha = 1 - beta must stay in (0, 1)
    "diffusion.beta_end": UNIT_OPEN,
    "diffusion.snr_gamma": POSITIVE,
    "train.lr": POSITIVE,
    "train.momentum": Range(0, 1, hi_open=True),
    "train.batch_size": Range(1, 65536),  # a larger batch is a typo, not a recipe
    "train.epochs": NON_NEGATIVE,
    "train.max_steps": POSITIVE,
    "train.log_every": POSITIVE,
    "train.num_workers": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.lr_min": NON_NEGATIVE,  # must also be <= train.lr (_validate)
    "train.ema_decay": Range(0, 1, hi_open=True),  # 0: off
    "train.grad_clip": NON_NEGATIVE,  # 0: off
    "fed.rounds": POSITIVE,
    "fed.local_epochs": NON_NEGATIVE,  # 0 only together with fed.local_steps
    "fed.local_steps": POSITIVE,
    "fed.round_timeout": NON_NEGATIVE,  # 0: off
    "fed.secure_frac_bits": Range(1, 62),  # the int64 sum needs >= 1 integer bit
    "fed.secure_min_reporters": Range(1, 2),  # 2: every region needs 2 reporters; 1: opt-out
    "fed.secure_neighbors": POSITIVE,
    "fed.clients": Range(1, 1_000_000),
    "fed.participation": Range(0, 1, lo_open=True),
    "fed.client_state_mb": NON_NEGATIVE,
    "fed.prox_mu": NON_NEGATIVE,
    "fed.server_lr": POSITIVE,
    "fed.server_momentum": Range(0, 1, hi_open=True),
    "fed.server_beta1": Range(0, 1, hi_open=True),
    "fed.server_beta2": Range(0, 1, hi_open=True),
    "fed.server_tau": POSITIVE,
    "fed.topk_fraction": Range(0, 1, lo_open=True),
    "privacy.clip": POSITIVE,
    "privacy.noise_multiplier": POSITIVE,  # 0 would give epsilon = infinity
    "privacy.delta": UNIT_OPEN,
    "eval.every": NON_NEGATIVE,
    "eval.num_samples": POSITIVE,
    "eval.ddim_steps": POSITIVE,
    "eval.eta": Range(0, 1),  # 0: deterministic DDIM, 1: DDPM-like noise
    "eval.batch_size": Range(1, 65536),
    "eval.grid": NON_NEGATIVE,
    "eval.clients": POSITIVE,
    "eval.precision_recall_k": Range(0, 100),
    "checkpoint.every": NON_NEGATIVE,
    "checkpoint.keep": NON_NEGATIVE,  # 0: keep all (checkpoint.mark_complete)
}


def _to_plain(obj):
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj
