"""`--print-config`: the resolved config as YAML, every key with its meaning.

The meanings are the comments beside each field in `schema.py`, read from the source, so
the schema stays the one place that explains keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import yaml

from fedmpi.config import schema
from fedmpi.config.schema import Config


def _field_comments(cls) -> dict[str, tuple[list, str]]:
    """Key -> (comment lines above it, comment after it) in fedmpi/config/schema.py, read from
    the source so that the schema stays the one place that explains keys."""
    out, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "@", '"""')):
            out[m.group(1)] = (pending, m.group(2) or "")
        pending = []
    return out


def describe_config(cfg: Config) -> str:
    """The resolved config as YAML (loadable as a config) with every key's comment."""

    def scalar(v) -> str:
        if isinstance(v, tuple):
            v = list(v)
        return (
            yaml.safe_dump(v, default_flow_style=True, width=1000)
            .strip()
            .removesuffix("\n...")
            .strip()
        )

    lines = [
        "# fedmpi config, resolved: every key with its value. Override any key on the",
        "# command line as --section.key=value; keys are defined in fedmpi/config/schema.py.",
    ]
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        comments = _field_comments(type(part))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(part):
            key = f"{section.name}.{f.name}"
            above, note = comments.get(f.name, ([], ""))
            lines += [f"  # {c}" for c in above]
            if key in schema.CHOICES and "|" not in note:
                note = (note + "; " if note else "") + " | ".join(schema.CHOICES[key])
            if key in schema.RANGES:
                note = (note + "; " if note else "") + f"{schema.RANGES[key]}"
            lines.append(
                f"  {f.name}: {scalar(getattr(part, f.name))}" + (f"  # {note}" if note else "")
            )
    return "\n".join(lines) + "\n"
