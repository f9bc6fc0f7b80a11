"""Tables, read, written and shown one way: JSON lines, CSV files and text tables.

The one CSV reader (`read_csv`), writer (`write_csv`) and appender (`append_csv`), the
JSON-lines reader and writers (`read_jsonl`, `write_jsonl`, `JsonlWriter`) and the one
table formatter (`format_table`: aligned plain text or markdown) of fedmpi; the run
folder (`runfolder.py`), the ledger, the reports, evaluate and the benchmarks use them.

Rows are appended and flushed as they happen, so a killed job loses nothing; a crash in
the middle of a write can leave a partial last line, which the readers drop (with a
warning) instead of failing. Files rewritten as a whole (on resume, tables) go through
`atomic.atomic_write`. metrics.jsonl is strict JSON: non-finite numbers become null.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedmpi.store.atomic import atomic_write


def strict_json(value):
    """`value` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _warn_partial(path: Path, line: str) -> None:
    print(
        f"warning: dropping a partial last line of {path} (a crash while writing?): {line[:80]!r}",
        file=sys.stderr,
    )


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed job loses nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row) -> None:
        row.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a partial last line (crash mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                _warn_partial(path, line)
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in rows))


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file as dicts of strings; a partial last row is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not text.endswith("\n"):  # the last row was cut short
        _warn_partial(path, text.rsplit("\n", 1)[-1])
        rows.pop()
    elif rows and any(v is None for v in rows[-1].values()):  # fewer fields than the header
        _warn_partial(path, text.rstrip("\n").rsplit("\n", 1)[-1])
        rows.pop()
    return rows


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Write a whole CSV table atomically (header from `fields` or the rows' keys)."""
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, out.getvalue())


def append_csv(path: Path, rows: list[dict], fields: Sequence[str] | None = None) -> None:
    """Append rows to a CSV file, writing the header (`fields`, else the first row's keys)
    when the file is new; without `fields`, a row with a key the header lacks widens the
    header (the file is rewritten). With `fields`, a new file gets its header even
    without rows and keys outside `fields` are left out."""
    if not rows and fields is None:
        return
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    header = None
    if not new and fields is None:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and any(k not in header for r in rows for k in r):
            # a new column (a resumed run that now scores more): the table is rewritten
            # whole with the wider header, atomically
            old = read_csv(path)
            write_csv(
                path, old + rows, list(dict.fromkeys([*header, *(k for r in rows for k in r)]))
            )
            return
    with path.open("a", newline="") as f:
        extra = "ignore" if fields else "raise"
        # an existing file's own header orders the columns
        w = csv.DictWriter(f, fieldnames=list(fields or header or rows[0]), extrasaction=extra)
        if new:
            w.writeheader()
        w.writerows(rows)


def format_table(
    head: Sequence[str],
    rows: Iterable[Sequence | None],
    align: str | None = None,
    markdown: bool = False,
) -> str:
    """A table as aligned plain text (a rule under the header) or as markdown.

    `align`: one 'l' or 'r' per column (default: the first column left, the others
    right). Cells are shown with str(). A row that is None draws a rule across the
    table in plain text (before a total, say); markdown has no such rules and skips it.
    """
    head = [str(h) for h in head]
    align = align or "l" + "r" * (len(head) - 1)
    cells = [None if row is None else [str(c) for c in row] for row in rows]
    if markdown:

        def line(row):
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

        rule = "| " + " | ".join("--:" if a == "r" else "---" for a in align) + " |"
        return "\n".join([line(head), rule] + [line(r) for r in cells if r is not None])
    widths = [max(len(c) for c in col) for col in zip(head, *(r for r in cells if r is not None))]

    def line(row):
        return "  ".join(
            c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)
        ).rstrip()

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule] + [rule if r is None else line(r) for r in cells])
