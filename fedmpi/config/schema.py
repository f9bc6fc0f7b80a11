"""Run configuration: frozen dataclasses are the schema, YAML is the input format.

`load_config(path, overrides)` reads a YAML file, applies dotted command-line
overrides (`--train.lr=2e-4`, `--fed.method=udec`), checks every key and type
against the dataclasses below, checks value ranges, and returns a frozen `Config`.
Any problem raises `ConfigError` naming the key and the file, before anything heavy
(data, model, MPI collectives) starts.

Every numeric key has an entry in `RANGES` (tests/test_config.py fails for a new numeric
key without one), every free-text choice an entry in `CHOICES`; numbers must be finite.
YAML files are read strictly: an empty file and a key repeated in one mapping are errors,
and `1e-4` is a number as in YAML 1.2 (PyYAML's YAML 1.1 would read it as a string).
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user-fixable problem with a config file or override."""


@dataclass(frozen=True)
class RunCfg:
    name: str = "run"
    out_dir: str = "runs"          # run folders are created under this
    seed: int = 2023
    device: str = "auto"           # auto | cpu | cuda
    # seconds between a client's progress reports to the federator, which shows the
    # round's live progress (0: no live progress); results do not depend on it
    progress_every: float = 2.0


@dataclass(frozen=True)
class DataCfg:
    dataset: str = "fashion_mnist"  # fashion_mnist | mnist | cifar10
    root: Optional[str] = None      # None: auto-detect (Debian package, ./data, torchvision layout)
    download: bool = True           # allow torchvision's downloader when files are missing
    shards: Optional[str] = None    # HDF5 file written by `python -m fedmpi.data split`
    train_subset: Optional[int] = None  # use the first N training images (quick runs)
    test_subset: Optional[int] = None   # use the first N test images


@dataclass(frozen=True)
class SplitCfg:
    kind: str = "iid"               # iid | label_skew | quantity_skew | shards
    beta: float = 0.5               # Dirichlet concentration (label_skew, quantity_skew)
    min_size: int = 10              # label_skew / quantity_skew: redraw until every client has this many
    classes_per_client: int = 2     # shards
    num_clients: Optional[int] = None  # None: taken from the MPI world size (W - 1)
    seed: Optional[int] = None      # None: run.seed
    rng: str = "default"            # default (numpy Generator) | numpy_legacy (the reference's exact draws)


@dataclass(frozen=True)
class ModelCfg:
    dim: int = 28
    init_dim: Optional[int] = None  # None: dim // 3 * 2 (the paper's model)
    dim_mults: tuple = (1, 2, 4)
    channels: Optional[int] = None  # None: from the dataset
    image_size: Optional[int] = None  # None: from the dataset
    convnext_mult: int = 2
    attn_heads: int = 4
    attn_dim_head: int = 32


@dataclass(frozen=True)
class DiffusionCfg:
    timesteps: int = 1000
    schedule: str = "linear"        # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: str = "huber"             # huber (reference code) | mse (DDPM default)
    # Per-timestep loss weight (recipe for short runs, none in configs/paper): min_snr is
    # Min-SNR-gamma (Hang et al. 2023), min(SNR_t, gamma) / SNR_t for epsilon prediction:
    # the easy low-noise steps count less, so the coarse structure is learnt sooner.
    weighting: str = "none"         # none | min_snr
    snr_gamma: float = 5.0


@dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-4
    batch_size: int = 128
    epochs: int = 15                # centralized baseline epochs
    max_steps: Optional[int] = None  # centralized: stop after this many optimizer steps
    log_every: int = 50             # steps between metrics rows
    num_workers: int = 0
    precision: str = "fp32"         # fp32 | bf16 | fp16: autocast of forward/backward (weights stay fp32)
    compile: bool = False           # torch.compile the UNet for training and sampling
    # torch.compile mode: default | reduce-overhead (each call replayed as CUDA graphs: one
    # launch instead of ~1,500 kernels per step; CUDA only, the default mode on a CPU) |
    # max-autotune
    compile_mode: str = "default"
    channels_last: bool = False     # NHWC activations: faster convolutions (CPU oneDNN, tensor cores)
    # centralized: Adam re-created at every epoch, as the reference's baseline (FULL with
    # K = 1, E = 1 per round) does
    reset_optimizer_every_epoch: bool = False
    # Recipe for short runs (fedmpi.trainer; all off in configs/paper): the learning rate
    # warms up linearly over warmup_steps, then stays (constant) or decays along a half
    # cosine to lr_min at the run's last step (cosine); steps are counted over the whole
    # run (federated: rounds x local steps of the client).
    warmup_steps: int = 0
    lr_schedule: str = "constant"   # constant | cosine
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
    method: str = "full"            # full | usplit | udec | ulatdec
    rounds: int = 15
    local_epochs: int = 5
    local_steps: Optional[int] = None  # if set, overrides local_epochs
    backend: str = "mpi"            # mpi | torch
    reset_optimizer: bool = True    # re-create Adam every round (paper)
    freeze_unshared: bool = False   # only train regions this client reports
    # What to do when a client's update or the aggregate is not finite (NaN/inf):
    # abort the job keeping the last good checkpoint, or skip those clients this round.
    on_nonfinite: str = "abort"     # abort | skip
    # Seconds the waiting ranks give the slowest rank to reach the next collective
    # before aborting with a message (0: wait forever).
    round_timeout: float = 0.0
    # Secure aggregation (fedmpi.secure): pairwise-masked fixed-point uploads reduced
    # with an integer SUM; the federator sees only each region's sum. Uploads cost 8
    # bytes per value instead of 4.
    secure: bool = False
    secure_frac_bits: int = 24      # fixed-point fraction bits (resolution 2^-frac_bits)
    secure_min_reporters: int = 2   # 1: accept regions with a single reporter, in the clear
    secure_neighbors: Optional[int] = None  # mask with k ring neighbours each side (None: all)


@dataclass(frozen=True)
class EvalCfg:
    every: int = 0                  # rounds (federated) or epochs (centralized); 0: only at the end
    num_samples: int = 1000
    sampler: str = "ddim"           # ddim | ddpm
    ddim_steps: int = 100
    eta: float = 0.0
    batch_size: int = 250
    extractor: str = "classifier"   # classifier | inception | none
    inception_weights: Optional[str] = None  # path to pt_inception-2015-12-05-6726825d.pth
    classifier_weights: Optional[str] = None  # fd_classifier file; None: train on the test split
    cache_dir: Optional[str] = None  # None: ~/.cache/fedmpi
    grid: int = 64                  # images in each PNG sample grid (0: none)
    # UDEC / ULATDEC: score each client's model right after its local training, before
    # the round's aggregation (local: its own decoder, as the reference scores), or after
    # it (aggregated: personal encoder + the averaged shared regions)
    personal: str = "aggregated"


@dataclass(frozen=True)
class PrivacyCfg:
    # Client-level DP-FedAvg (fedmpi.privacy): each client's update of the shared regions
    # is clipped to L2 norm `clip`, uploads are weighted uniformly, and Gaussian noise of
    # std noise_multiplier * clip is added to each region's sum.
    dp: bool = False
    clip: float = 1.0               # C: L2 bound of one client's update (all shared regions)
    noise_multiplier: float = 1.0   # z: noise std on the sum = z * C
    delta: float = 1.0e-5           # the delta of the reported (epsilon, delta)
    mode: str = "central"           # central (federator adds noise) | distributed (clients do)


@dataclass(frozen=True)
class CheckpointCfg:
    every: int = 1                  # rounds (federated) or epochs (centralized); 0: only at the end
    keep: int = 2                   # most recent checkpoints kept (0: keep all)
    # federated: the federator's file and the marker written by a thread while the next
    # round runs (fedmpi.checkpoint.BackgroundWriter); the last round's always at once
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

    def replace(self, dotted: dict[str, Any]) -> "Config":
        """A copy with dotted keys replaced (values already typed), re-validated."""
        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, key, value, "<replace>")
        return from_dict(data, "<replace>")


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "data.dataset": ("fashion_mnist", "mnist", "cifar10"),
    "split.kind": ("iid", "label_skew", "quantity_skew", "shards"),
    "split.rng": ("default", "numpy_legacy"),
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.loss": ("huber", "mse"),
    "diffusion.weighting": ("none", "min_snr"),
    "fed.method": ("full", "usplit", "udec", "ulatdec"),
    "fed.backend": ("mpi", "torch"),
    "fed.on_nonfinite": ("abort", "skip"),
    "train.lr_schedule": ("constant", "cosine"),
    "eval.sampler": ("ddim", "ddpm"),
    "eval.extractor": ("classifier", "inception", "none"),
    "eval.personal": ("aggregated", "local"),
    "train.precision": ("fp32", "bf16", "fp16"),
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
        return ((self.lo < v if self.lo_open else self.lo <= v)
                and (v < self.hi if self.hi_open else v <= self.hi))

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return (f"in {'(' if self.lo_open else '['}{self.lo}, "
                f"{self.hi}{')' if self.hi_open else ']'}")


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
UNIT_OPEN = Range(0, 1, lo_open=True, hi_open=True)

# Every numeric key (int, float, Optional ones: null is always allowed for those; the
# elements of model.dim_mults) -> its allowed range. Checked by _validate.
RANGES = {
    "run.seed": Range(0, 2**63 - 1),          # numpy SeedSequence needs >= 0; HDF5 attr int64
    "run.progress_every": NON_NEGATIVE,       # 0: off
    "data.train_subset": POSITIVE,
    "data.test_subset": POSITIVE,
    "split.beta": POSITIVE,                   # Dirichlet concentration
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
    "diffusion.beta_start": UNIT_OPEN,        # variances: alpha = 1 - beta must stay in (0, 1)
    "diffusion.beta_end": UNIT_OPEN,
    "diffusion.snr_gamma": POSITIVE,
    "train.lr": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.epochs": NON_NEGATIVE,
    "train.max_steps": POSITIVE,
    "train.log_every": POSITIVE,
    "train.num_workers": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.lr_min": NON_NEGATIVE,             # must also be <= train.lr (_validate)
    "train.ema_decay": Range(0, 1, hi_open=True),  # 0: off
    "train.grad_clip": NON_NEGATIVE,          # 0: off
    "fed.rounds": POSITIVE,
    "fed.local_epochs": NON_NEGATIVE,         # 0 only together with fed.local_steps
    "fed.local_steps": POSITIVE,
    "fed.round_timeout": NON_NEGATIVE,        # 0: off
    "fed.secure_frac_bits": Range(1, 62),     # the int64 sum needs >= 1 integer bit
    "fed.secure_min_reporters": Range(1, 2),  # 2: every region needs 2 reporters; 1: opt-out
    "fed.secure_neighbors": POSITIVE,
    "privacy.clip": POSITIVE,
    "privacy.noise_multiplier": POSITIVE,     # 0 would give epsilon = infinity
    "privacy.delta": UNIT_OPEN,
    "eval.every": NON_NEGATIVE,
    "eval.num_samples": POSITIVE,
    "eval.ddim_steps": POSITIVE,
    "eval.eta": Range(0, 1),                  # 0: deterministic DDIM, 1: DDPM-like noise
    "eval.batch_size": POSITIVE,
    "eval.grid": NON_NEGATIVE,
    "checkpoint.every": NON_NEGATIVE,
    "checkpoint.keep": NON_NEGATIVE,          # 0: keep all (checkpoint.mark_complete)
}


def _to_plain(obj):
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _set_dotted(data: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"{source}: unknown config key '{key}'")
        node = node[p]
    node[parts[-1]] = value


def _check_type(value, tp, key: str, source: str):
    """Return value coerced to tp (int->float, list->tuple) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key, source)
    if tp is tuple:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{source}: '{key}' must be a list of integers, got {value!r}")
        return tuple(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer literal with hundreds of digits
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r} "
                              f"(.inf, .nan and values beyond 1.8e308 such as 1e400 are "
                              f"not allowed)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. --run.name=2023
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp} for {key}")


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from a nested dict (missing keys take defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    hints_cfg = typing.get_type_hints(Config)
    sections = {}
    for name, section in data.items():
        if name not in hints_cfg:
            raise ConfigError(f"{source}: unknown section '{name}' "
                              f"(known: {', '.join(hints_cfg)})")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        cls = hints_cfg[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in section.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown config key '{name}.{key}' "
                                  f"(known in '{name}': {', '.join(hints)})")
            kwargs[key] = _check_type(value, hints[key], f"{name}.{key}", source)
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _validate(cfg, source)
    return cfg


def get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _validate(cfg: Config, source: str) -> None:
    for key, options in CHOICES.items():
        if get(cfg, key) not in options:
            raise ConfigError(f"{source}: '{key}' is {get(cfg, key)!r}; "
                              f"choose one of {', '.join(options)}")
    for key, allowed in RANGES.items():
        v = get(cfg, key)
        for x in (v if isinstance(v, tuple) else (v,)):
            if x is not None and x not in allowed:
                raise ConfigError(f"{source}: '{key}' must be {allowed}, got {v!r}")
    d = cfg.diffusion
    if not d.beta_start < d.beta_end:
        raise ConfigError(f"{source}: need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
                          f"got {d.beta_start} and {d.beta_end}")
    if cfg.train.lr_min > cfg.train.lr:
        raise ConfigError(f"{source}: 'train.lr_min' ({cfg.train.lr_min}) must not exceed "
                          f"'train.lr' ({cfg.train.lr}): the cosine schedule decays from lr "
                          f"to lr_min")
    if not cfg.model.dim_mults:
        raise ConfigError(f"{source}: 'model.dim_mults' must not be empty")
    if cfg.eval.ddim_steps > d.timesteps:
        raise ConfigError(f"{source}: 'eval.ddim_steps' ({cfg.eval.ddim_steps}) cannot exceed "
                          f"'diffusion.timesteps' ({d.timesteps})")
    if cfg.fed.secure and cfg.privacy.dp and cfg.privacy.mode != "distributed":
        raise ConfigError(f"{source}: 'privacy.mode' is 'central' but 'fed.secure' is on: the "
                          f"federator would add the noise to a sum it sees noise-free; set "
                          f"--privacy.mode=distributed (each client adds its share of the "
                          f"noise before masking)")
    if cfg.train.compile_mode != "default" and not cfg.train.compile:
        raise ConfigError(f"{source}: 'train.compile_mode' is {cfg.train.compile_mode!r} but "
                          f"'train.compile' is false, so nothing is compiled; set "
                          f"--train.compile=true (or leave compile_mode at 'default')")
    if cfg.fed.local_steps is None and cfg.fed.local_epochs == 0:
        raise ConfigError(f"{source}: set 'fed.local_epochs' > 0 or 'fed.local_steps'")
    if cfg.eval.extractor == "inception" and cfg.eval.inception_weights is not None \
            and not Path(cfg.eval.inception_weights).expanduser().is_file():
        raise ConfigError(
            f"{source}: 'eval.inception_weights' points to {cfg.eval.inception_weights}, which "
            f"does not exist. Download pt_inception-2015-12-05-6726825d.pth from "
            f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            f"pt_inception-2015-12-05-6726825d.pth on a machine with internet and copy it there.")
    if cfg.eval.extractor == "classifier" and cfg.eval.classifier_weights is not None \
            and not Path(cfg.eval.classifier_weights).expanduser().is_file():
        raise ConfigError(
            f"{source}: 'eval.classifier_weights' points to {cfg.eval.classifier_weights}, which "
            f"is not a file. Give the file printed by `python -m fedmpi.extractors "
            f"train-classifier`, or leave it unset to train the classifier on the test split.")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one
    silently) and reads YAML 1.2 floats without a dot or exponent sign (1e-4, 1e400)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may override keys
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


# Copy the resolver table before adding to it: it is shared with yaml.SafeLoader.
_StrictLoader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_StrictLoader)


def _parse_value(text: str):
    """Command-line values are YAML scalars: 2e-4, true, null, [1, 2, 4], udec."""
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--train.lr=2e-4', '--fed.method', 'udec'] -> {'train.lr': 2e-4, 'fed.method': 'udec'}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"command line: cannot read '{arg}'; overrides look like "
                              f"--section.key=value (e.g. --train.lr=2e-4)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: '{arg}' needs a value")
            key, text = arg[2:], args[i + 1]
            i += 1
        out[key] = _parse_value(text)
        i += 1
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str] | dict] = None
                ) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply overrides."""
    source = str(path) if path else "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        try:
            data = _yaml_load(p.read_text())
        except _DuplicateKey as e:
            raise ConfigError(f"{source}: key '{e.key}' is written twice at the same level "
                              f"(line {e.first} and line {e.line}); keep one of them") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if data is None:
            raise ConfigError(f"{source}: the file is empty (no settings); a config names "
                              f"sections such as 'fed:' and 'train:' -- see configs/ for "
                              f"examples (configs/quickstart.yaml)")
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        for key, value in overrides.items():
            section = key.split(".")[0]
            if section not in typing.get_type_hints(Config):
                raise ConfigError(f"command line: unknown section in '--{key}'")
            data.setdefault(section, {})
            if data[section] is None:
                data[section] = {}
            _set_dotted(data, key, value, "command line")
        source = f"{source} (with command-line overrides)"
    return from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    from .atomic import atomic_write
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
