"""A slow network on one machine: every MPI rank in its own Linux network namespace.

Topology (names for the default prefix "fmw", subnet 10.231.0.0/24)::

    netns fmw_hub:  bridge fmw_br 10.231.0.254  <- mpirun, prted and the PMIx server run here
                      |-- veth fmw_h0 <-> fmw_v0 10.231.0.1 in netns fmw_r0  (rank 0, federator)
                      |-- veth fmw_h1 <-> fmw_v1 10.231.0.2 in netns fmw_r1  (rank 1, client)
                      `-- ...

Each shaped rank gets a token bucket filter (tc tbf) at its rate on both ends of its veth:
on fmw_vI (egress = upload of rank I) and on fmw_hI (egress = download to rank I). Only
bandwidth is limited: this kernel has no netem, so no latency, jitter or loss is added.

Launch recipe (see `mpi_launch`): mpirun runs inside the hub namespace with PMIx told to
listen on the bridge (PMIX_MCA_ptl_tcp_if_include=SUBNET; without it MPI_Init fails with
"PML add procs failed"), and every rank starts as `sh -c 'exec ip netns exec
fmw_r$PMIX_RANK "$@"'`, which moves the process (same pid) into its own namespace before
Python starts. The ranks reach PMIx and each other over the veths only: Open MPI runs with
`--mca btl tcp,self --mca pml ob1 --mca btl_tcp_if_include SUBNET` (no shared memory) and
`--mca coll ^han,sm` (no shared-memory collectives).

Safety rule: traffic only flows between addresses inside namespaces this module made. The
bridge lives in the hub namespace, the root namespace gets no address or link on it, and
no route leads out, so the subnet may even overlap a real one without harm.

Cleanup guarantee: `Network.__exit__` runs on normal exit, exceptions, Ctrl-C, SIGTERM and
SIGHUP (turned into SystemExit while the network is up). It ends every process still inside
our namespaces (SIGTERM, then SIGKILL), deletes the namespaces (that removes the veths, the
bridge and the qdiscs with them) and raises if any namespace or link with the prefix
remains. After a SIGKILL of the owner, the next `Network` with the same prefix finds the
leftovers (a lock file tells them from a live run) and removes them with a message.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2's `ip` and `tc`, and the tbf qdisc.
Self-test: `python bench/_netns.py --mbit 100 10` (3 ranks, 10 MB per client).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT_MESSAGE = "needs root for network namespaces: run as root (CI does) or with sudo"
DEFAULT_SUBNET = "10.231.0.0/24"
TBF_LATENCY = "50ms"  # queue depth of the token bucket, in time at the shaped rate


class NetnsError(RuntimeError):
    """Setting up or removing the namespaced network failed."""


def require_root() -> None:
    """Stop with one clear message unless we are root."""
    if os.geteuid() != 0:
        raise SystemExit(ROOT_MESSAGE)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an ip/tc command; on failure raise NetnsError with the command and its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def check_tools(prefix: str = "fmw") -> None:
    """Check root, `ip`, `tc`, network namespaces and the tbf qdisc (in a throwaway netns)."""
    require_root()
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs iproute2 ({' and '.join(missing)} not found on PATH)")
    probe = f"{prefix}_probe"
    _run("ip", "netns", "add", probe)
    try:
        tbf = _run(
            "tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf",
            "rate", "10mbit", "burst", "64kb", "latency", TBF_LATENCY, check=False,
        )  # fmt: skip
        if tbf.returncode != 0:
            raise SystemExit(f"tc tbf qdisc does not work here: {tbf.stderr.strip()}")
    finally:
        _run("ip", "netns", "del", probe, check=False)


def leftovers(prefix: str = "fmw") -> list[str]:
    """Namespaces and root-namespace links whose name starts with `prefix_`."""
    found = []
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix + "_"):
            found.append(f"netns {name}")
    for link in json.loads(_run("ip", "-j", "link", "show").stdout or "[]"):
        if link.get("ifname", "").startswith(prefix + "_"):
            found.append(f"link {link['ifname']}")
    return found


def _kill_inside(namespaces: list[str], grace: float = 3.0) -> None:
    """End the processes still in our namespaces (ranks, mpirun, prted we launched there):
    SIGTERM to all, then SIGKILL to those still alive after `grace` seconds."""
    pids = set()
    for ns in namespaces:
        pids.update(int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()}
            time.sleep(0.05)
        if not pids:
            return


def remove_all(prefix: str = "fmw") -> None:
    """Delete every namespace named `prefix_*` (processes inside are ended first), then
    raise NetnsError if any namespace or root link with the prefix is still there."""
    found = leftovers(prefix)
    namespaces = [entry.split(" ", 1)[1] for entry in found if entry.startswith("netns ")]
    _kill_inside(namespaces)
    for entry in found:
        kind, name = entry.split(" ", 1)
        _run("ip", kind if kind == "netns" else "link", "del", name, check=False)
    left = leftovers(prefix)
    if left:
        raise NetnsError(f"could not remove: {', '.join(left)}")


def _find_mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")


def mpi_launch(
    n: int,
    prefix: str = "fmw",
    subnet: str = DEFAULT_SUBNET,
    mpirun: str | None = None,
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Command prefix and environment to run `python ARGS` as n ranks, rank i in netns
    `prefix_ri`: `subprocess.run(cmd + [sys.executable, "script.py", ...], env=env)`.
    The network (a `Network` with at least n ranks) must be up. `extra`: more mpirun flags."""
    hop = f'exec ip netns exec "{prefix}_r$PMIX_RANK" "$@"'
    cmd = [
        "ip", "netns", "exec", f"{prefix}_hub", mpirun or _find_mpirun(),
        "-n", str(n), "--oversubscribe", "--bind-to", "none",
        "--mca", "btl", "tcp,self", "--mca", "pml", "ob1",
        "--mca", "btl_tcp_if_include", subnet, "--mca", "coll", "^han,sm",
        *(extra or []), "sh", "-c", hop, f"{prefix}-rank",
    ]  # fmt: skip
    env = dict(os.environ)
    env["PMIX_MCA_ptl_tcp_if_include"] = subnet  # PMIx server listens on the bridge
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return cmd, env


class Network:
    """Context manager: hub namespace with a bridge, one namespace + veth per rank, tbf
    shaping; everything removed (and checked) on exit.

    mbit: None = unshaped; a number = every client (ranks 1..n-1) at that many Mbit/s, rank 0
    unshaped; a dict {rank: Mbit/s} = exactly those ranks shaped (rank 0 too if listed).
    """

    def __init__(
        self,
        ranks: int,
        mbit: dict[int, float] | float | None = None,
        prefix: str = "fmw",
        subnet: str = DEFAULT_SUBNET,
    ):
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError("prefix: 1-8 lowercase letters/digits (interface names <= 15)")
        self.net = ipaddress.ip_network(subnet)
        hosts = list(self.net.hosts())
        if not 1 <= ranks < len(hosts):
            raise ValueError(f"ranks must be 1..{len(hosts) - 1} for subnet {subnet}")
        if mbit is None:
            rates = {}
        elif isinstance(mbit, dict):
            rates = {int(r): float(v) for r, v in mbit.items()}
        else:
            rates = {r: float(mbit) for r in range(1, ranks)}
        bad = {r: v for r, v in rates.items() if not (0 <= r < ranks and v > 0)}
        if bad:
            raise ValueError(f"bad ranks/rates in mbit: {bad}")
        self.ranks, self.rates, self.prefix = ranks, rates, prefix
        self.hub = f"{prefix}_hub"
        self.hub_ip = str(hosts[-1])
        self.ips = [str(hosts[i]) for i in range(ranks)]
        self._lock = None
        self._old_handlers: dict[int, object] = {}

    def ns(self, rank: int) -> str:
        """Name of rank's network namespace."""
        return f"{self.prefix}_r{rank}"

    def launch(self, n: int | None = None, mpirun: str | None = None, extra=None):
        """`mpi_launch` for this network: (cmd prefix, env) for n (default: all) ranks."""
        n = self.ranks if n is None else n
        if n > self.ranks:
            raise ValueError(f"{n} ranks but the network has {self.ranks}")
        return mpi_launch(n, self.prefix, str(self.net), mpirun, extra)

    # --- setup ---------------------------------------------------------------------------
    def __enter__(self) -> Network:
        require_root()
        self._take_lock()
        try:
            check_tools(self.prefix)
            stale = leftovers(self.prefix)
            if stale:
                print(
                    f"[netns] removing leftovers of an earlier run: {', '.join(stale)}",
                    file=sys.stderr,
                )
                remove_all(self.prefix)
            self._catch_signals()
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _take_lock(self) -> None:
        """Hold /run/PREFIX-netns.lock while up: tells a live run from a crashed one."""
        self._lock = open(f"/run/{self.prefix}-netns.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise NetnsError(
                f"another process is using the '{self.prefix}' namespaces; wait or pick "
                "another prefix"
            ) from None

    def _catch_signals(self) -> None:
        """SIGTERM/SIGHUP become SystemExit so that __exit__ cleans up (SIGINT already
        raises KeyboardInterrupt). Only possible from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return

        def _raise(signum, _frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise)

    def _build(self) -> None:
        p, hub, plen = self.prefix, self.hub, self.net.prefixlen
        bridge = f"{p}_br"
        _run("ip", "netns", "add", hub)
        _run("ip", "-n", hub, "link", "set", "lo", "up")
        _run("ip", "-n", hub, "link", "add", bridge, "type", "bridge")
        _run("ip", "-n", hub, "addr", "add", f"{self.hub_ip}/{plen}", "dev", bridge)
        _run("ip", "-n", hub, "link", "set", bridge, "up")
        for r in range(self.ranks):
            ns, outer, inner = self.ns(r), f"{p}_h{r}", f"{p}_v{r}"
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # Both ends are created directly in their namespaces: never in the root one.
            _run(
                "ip", "link", "add", outer, "netns", hub, "type", "veth",
                "peer", "name", inner, "netns", ns,
            )  # fmt: skip
            _run("ip", "-n", hub, "link", "set", outer, "master", bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ips[r]}/{plen}", "dev", inner)
            _run("ip", "-n", ns, "link", "set", inner, "up")
            if r in self.rates:
                self._shape(ns, inner, self.rates[r])  # upload of rank r
                self._shape(hub, outer, self.rates[r])  # download to rank r

    @staticmethod
    def _shape(ns: str, dev: str, mbit: float) -> None:
        """Token bucket at `mbit` on dev's egress; burst >= one timer tick at the rate."""
        kbit = max(1, round(mbit * 1000))
        burst = max(64 * 1024, int(kbit * 1000 / 8 * 0.004))
        _run(
            "tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{kbit}kbit", "burst", str(burst), "latency", TBF_LATENCY,
        )  # fmt: skip

    # --- teardown ------------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        """Remove everything with our prefix and check; raises NetnsError if leftovers
        remain (chained to the exception that ended the block, if any)."""
        if self._lock is None:  # not ours to clean: __enter__ never got the lock
            return
        inter = self._hold_signals()
        try:
            remove_all(self.prefix)
        finally:
            for sig, handler in {**self._old_handlers, **inter}.items():
                signal.signal(sig, handler)
            self._old_handlers = {}
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    @staticmethod
    def _hold_signals() -> dict[int, object]:
        """Ignore Ctrl-C/SIGTERM while cleaning up so a second one cannot interrupt it."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}

    # --- measurement ---------------------------------------------------------------------
    def wire_bytes(self) -> dict[int, dict[str, int]]:
        """Bytes on each rank's veth so far, from the rank's side: {rank: {"tx", "rx"}}
        (tx = sent by the rank, rx = received; Ethernet frames, headers included).
        Take one reading before and one after a run and subtract."""
        out = {}
        for r in range(self.ranks):
            info = _run("ip", "-n", self.ns(r), "-s", "-j", "link", "show", f"{self.prefix}_v{r}")
            stats = json.loads(info.stdout)[0]["stats64"]
            out[r] = {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}
        return out


# --- self-test -----------------------------------------------------------------------------
_PROBE = r"""
import os, sys, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
ino = os.stat("/proc/self/ns/net").st_ino
inodes = comm.gather(ino, root=0)
buf = np.ones(int(sys.argv[1]) // 8)
for peer in range(1, size):
    comm.Barrier()
    t = time.perf_counter()
    if rank == 0:
        comm.Recv(buf, source=peer)
    elif rank == peer:
        comm.Send(buf, dest=0)
    comm.Barrier()
    if rank == 0:
        print(f"rank {peer} -> 0: {buf.nbytes / 1e6:.0f} MB in {time.perf_counter() - t:.2f} s")
comm.Barrier()
t = time.perf_counter()
comm.Bcast(buf, root=0)
comm.Barrier()
if rank == 0:
    print(f"Bcast 0 -> all: {time.perf_counter() - t:.2f} s")
    print(f"netns inodes {inodes} own_ns_per_rank={len(set(inodes)) == size}")
"""


def _selftest(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="netns + tbf self-test with 3 ranks")
    parser.add_argument("--mbit", type=float, nargs=2, default=[100.0, 10.0])
    parser.add_argument("--bytes", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    with tempfile.NamedTemporaryFile("w", suffix=".py") as probe:
        probe.write(_PROBE)
        probe.flush()
        with Network(3, {1: args.mbit[0], 2: args.mbit[1]}) as net:
            before = net.wire_bytes()
            cmd, env = net.launch()
            proc = subprocess.run([*cmd, sys.executable, probe.name, str(args.bytes)], env=env)
            after = net.wire_bytes()
            for r in range(net.ranks):
                d = {k: after[r][k] - before[r][k] for k in ("tx", "rx")}
                print(f"rank {r} ({net.ips[r]}, {net.rates.get(r, 'unshaped')} Mbit/s): {d}")
    print(f"leftovers after exit: {leftovers()}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(_selftest(sys.argv[1:]))
