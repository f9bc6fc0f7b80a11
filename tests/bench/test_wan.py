"""bench/wan.py on a shaped namespaced network (needs root, as CI runs): the exchanges run
over TCP between the namespaces and slow down with the link rate, and nothing the
benchmark made is left behind, also when its launch fails. Without root it stops with
one line naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _netns

pytestmark = pytest.mark.mpi
ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


def wan(*args: str, timeout: float = 300, as_nobody: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "bench/wan.py", *args]
    if as_nobody and IS_ROOT:  # drop root: what a user without it sees
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def no_leftovers() -> None:
    assert _netns.leftovers() == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "_wan_exchange.py" not in ps and "fmw_r" not in ps


@pytest.mark.skipif(
    not IS_ROOT, reason="network namespaces need root (the next test checks the message)"
)
def test_slow_links_slow_the_exchange_and_nothing_is_left(tmp_path):
    res = wan("--mbit", "20,1000", "--reduced", "--rounds", "1", "--no-job", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {}
    for line in (tmp_path / "wan.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1], cells[2])] = float(cells[4])  # comm s
    # FULL uncompressed moves ~15 MB a round: far slower at 20 Mbit/s than at 1 Gbit/s
    assert rows[(20, "FULL", "none")] > 4 * rows[(1000, "FULL", "none")]
    # int8 uploads a quarter: at 20 Mbit/s its round is faster than float32's
    assert rows[(20, "FULL", "int8+EF")] < rows[(20, "FULL", "none")]
    assert "no namespace, link or process left (checked)" in res.stdout
    no_leftovers()


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces need root")
def test_a_failed_launch_still_removes_the_network(tmp_path):
    res = wan("--mbit", "100", "--reduced", "--no-job", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode != 0
    assert "exchange launch failed" in res.stderr, res.stderr[-2000:]
    no_leftovers()


def test_without_root_one_line_says_why():
    res = wan("--mbit", "100", as_nobody=True)
    assert res.returncode != 0
    assert _netns.ROOT_MESSAGE in res.stderr + res.stdout
