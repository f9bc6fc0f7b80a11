"""Reading a config: strict YAML, dotted command-line overrides, type and range checks.

`load_config(path, overrides)` reads a YAML file, applies dotted command-line
overrides (`--train.lr=2e-4`, `--fed.method=udec`), checks every key and type
against the schema's dataclasses, checks value ranges, and returns a frozen `Config`.
Any problem raises `ConfigError` naming the key and the file, before anything heavy
(data, model, MPI collectives) starts. Numbers must be finite. YAML files are read
strictly: an empty file and a key repeated in one mapping are errors, and `1e-4` is a
number as in YAML 1.2 (PyYAML's YAML 1.1 would read it as a string).
"""

from __future__ import annotations

import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fedmpi.config.schema import CHOICES, RANGES, Config
from fedmpi.errors import ConfigError


def _set_dotted(data: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"{source}: unknown config key '{key}'")
        node = node[p]
    node[parts[-1]] = value


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 60, 60


def _show(value) -> str:
    """`value` for an error message, cut short: a YAML alias bomb (a few hundred bytes that
    expand to millions of strings) must not be expanded to be printed."""
    return _SHORT.repr(value)


def _check_type(value, tp, key: str, source: str):
    """Return value coerced to tp (int->float, list->tuple) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key, source)
    if tp is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{source}: '{key}' must be a list of integers, got {_show(value)}")
        return tuple(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer literal with hundreds of digits
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(
                f"{source}: '{key}' must be a finite number, got {_show(value)} "
                f"(.inf, .nan and values beyond 1.8e308 such as 1e400 are "
                f"not allowed)"
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {_show(value)}")
        return value
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. --run.name=2023
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {_show(value)}")
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
            raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(hints_cfg)})")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        cls = hints_cfg[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in section.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: unknown config key '{name}.{key}' "
                    f"(known in '{name}': {', '.join(hints)})"
                )
            kwargs[key] = _check_type(value, hints[key], f"{name}.{key}", source)
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _validate(cfg, source)
    return cfg


def get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


def _check_run_name(name: str, source: str) -> None:
    """run.name names a folder inside run.out_dir: one plain path component, never a path
    ('../x', '/abs', 'a/b') that would write outside it."""
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{source}: 'run.name' is {_show(name)}; it names a folder inside run.out_dir, so "
            f"use letters, digits and . _ + = - only (no '/', no '..', at most 128 characters); "
            f"to write elsewhere set run.out_dir"
        )


def _validate(cfg: Config, source: str) -> None:
    for key, options in CHOICES.items():
        if get(cfg, key) not in options:
            raise ConfigError(
                f"{source}: '{key}' is {_show(get(cfg, key))}; choose one of {', '.join(options)}"
            )
    for key, allowed in RANGES.items():
        v = get(cfg, key)
        for x in v if isinstance(v, tuple) else (v,):
            if x is not None and x not in allowed:
                raise ConfigError(f"{source}: '{key}' must be {allowed}, got {_show(v)}")
    _check_run_name(cfg.run.name, source)
    d = cfg.diffusion
    if not d.beta_start < d.beta_end:
        raise ConfigError(
            f"{source}: need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
            f"got {d.beta_start} and {d.beta_end}"
        )
    if cfg.train.lr_min > cfg.train.lr:
        raise ConfigError(
            f"{source}: 'train.lr_min' ({cfg.train.lr_min}) must not exceed "
            f"'train.lr' ({cfg.train.lr}): the cosine schedule decays from lr "
            f"to lr_min"
        )
    if not cfg.model.dim_mults:
        raise ConfigError(f"{source}: 'model.dim_mults' must not be empty")
    if cfg.eval.ddim_steps > d.timesteps:
        raise ConfigError(
            f"{source}: 'eval.ddim_steps' ({cfg.eval.ddim_steps}) cannot exceed "
            f"'diffusion.timesteps' ({d.timesteps})"
        )
    _check_privacy(cfg, source)
    _check_compression(cfg, source)
    if cfg.train.compile_mode != "default" and not cfg.train.compile:
        raise ConfigError(
            f"{source}: 'train.compile_mode' is {cfg.train.compile_mode!r} but "
            f"'train.compile' is false, so nothing is compiled; set "
            f"--train.compile=true (or leave compile_mode at 'default')"
        )
    if cfg.fed.local_steps is None and cfg.fed.local_epochs == 0:
        raise ConfigError(f"{source}: set 'fed.local_epochs' > 0 or 'fed.local_steps'")
    if (
        cfg.eval.extractor == "inception"
        and cfg.eval.inception_weights is not None
        and not Path(cfg.eval.inception_weights).expanduser().is_file()
    ):
        raise ConfigError(
            f"{source}: 'eval.inception_weights' points to {cfg.eval.inception_weights}, which "
            f"does not exist. Download pt_inception-2015-12-05-6726825d.pth from "
            f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            f"pt_inception-2015-12-05-6726825d.pth on a machine with internet and copy it there."
        )
    if (
        cfg.eval.extractor == "classifier"
        and cfg.eval.classifier_weights is not None
        and not Path(cfg.eval.classifier_weights).expanduser().is_file()
    ):
        raise ConfigError(
            f"{source}: 'eval.classifier_weights' points to {cfg.eval.classifier_weights}, which "
            f"is not a file. Give the file printed by `python -m fedmpi.extractors "
            f"train-classifier`, or leave it unset to train the classifier on the test split."
        )


def _check_compression(cfg: Config, source: str) -> None:
    """fed.compress changes the upload's arithmetic: secure aggregation's masks need a
    modular integer sum (int8 has one; bf16 and top-k do not), and DP's guarantee rests
    on the clipped update's norm, which compression and error feedback change."""
    f = cfg.fed
    if f.compress == "none":
        return
    if f.secure and f.compress != "int8":
        raise ConfigError(
            f"{source}: 'fed.compress' {f.compress} with 'fed.secure': pairwise masks "
            f"cancel only in a modular integer sum, and {f.compress} uploads are summed "
            f"in float by the federator; use --fed.compress=int8 (a uint8 sum that the "
            f"masks fit) or --fed.secure=false"
        )
    if cfg.privacy.dp:
        raise ConfigError(
            f"{source}: 'fed.compress' {f.compress} with 'privacy.dp': the noise is "
            f"calibrated to the clipped update's norm, which compression (and error "
            f"feedback's residual) would change; set --fed.compress=none with DP"
        )


def _check_privacy(cfg: Config, source: str) -> None:
    """DP's noise mode must match the aggregation: central DP adds the noise on the
    federator, so it cannot be combined with fed.secure (the federator would still see
    the noise-free sum); distributed DP gives each upload only its 1/sqrt(m) share of
    the noise, so without fed.secure the federator would see each upload with far less
    noise than the reported epsilon assumes."""
    if not cfg.privacy.dp:
        return
    f = cfg.fed
    if f.participation < 1 and f.sampling != "poisson":
        raise ConfigError(
            f"{source}: 'privacy.dp' with 'fed.participation' {f.participation} needs "
            f"--fed.sampling=poisson: the accountant amplifies Poisson sampling only, and "
            f"would overstate the privacy of fixed-size draws"
        )
    if f.participation < 1 and cfg.privacy.mode == "distributed":
        raise ConfigError(
            f"{source}: 'privacy.mode' distributed with client sampling: a round where few "
            f"ranks (or none) report would carry less noise than the accountant assumes; "
            f"use --privacy.mode=central (without fed.secure) or --fed.participation=1"
        )
    if f.participation < 1 and f.method == "usplit":
        raise ConfigError(
            f"{source}: 'privacy.dp' with client sampling supports full, udec and ulatdec: "
            f"usplit's regions are assigned among the round's sampled clients, so their "
            f"number per region is not the fixed denominator the estimator needs; set "
            f"--fed.method=full (or --fed.participation=1)"
        )
    if cfg.fed.secure and cfg.privacy.mode != "distributed":
        raise ConfigError(
            f"{source}: 'privacy.mode' is 'central' but 'fed.secure' is on: the "
            f"federator would add the noise to a sum it sees noise-free; set "
            f"--privacy.mode=distributed (each client adds its share of the "
            f"noise before masking)"
        )
    if not cfg.fed.secure and cfg.privacy.mode == "distributed":
        raise ConfigError(
            f"{source}: 'privacy.mode' is 'distributed' but 'fed.secure' is off: each "
            f"client would upload its update with only its 1/sqrt(m) share of the noise, "
            f"in the clear to the federator (and to the clients that relay the Reduce), "
            f"so the reported epsilon would not hold; set --fed.secure=true (the shares "
            f"add up under the masks) or --privacy.mode=central (the federator adds all "
            f"the noise)"
        )


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
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


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
            raise ConfigError(
                f"command line: cannot read '{arg}'; overrides look like "
                f"--section.key=value (e.g. --train.lr=2e-4)"
            )
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


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None
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
            raise ConfigError(
                f"{source}: key '{e.key}' is written twice at the same level "
                f"(line {e.first} and line {e.line}); keep one of them"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if data is None:
            raise ConfigError(
                f"{source}: the file is empty (no settings); a config names "
                f"sections such as 'fed:' and 'train:' -- see configs/ for "
                f"examples (configs/quickstart.yaml)"
            )
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


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
