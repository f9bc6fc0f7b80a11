"""The MPI world, process subgroups and the two transport backends.

This is the only module that imports mpi4py or torch.distributed. `World` owns the
world communicator, the rank's role (rank 0 federator, ranks 1..K clients), the
node-local rank (from a shared-memory split, used to pick the GPU) and one backend:

- `mpi` (default): a subgroup is `COMM_WORLD.Split(color)`, cached for later rounds
  (up to 32); `Reduce` to the federator and `Bcast` back in place on the regions' flat
  torch tensors (no pickling): device memory itself where MPI is CUDA-aware, else one
  host copy each way.
- `torch`: `torch.distributed` initialised from the MPI ranks: nccl on the regions'
  device tensors when every rank has a GPU of its own, else gloo on host buffers (ranks
  sharing a GPU, CPU); subgroups from `new_group`, cached.

Creating a subgroup is collective over the whole world, so every rank calls
`World.group(members)` for every group of a round in the same order; the plan (pure,
computed identically everywhere) guarantees that. Control-plane messages (errors,
losses, ledgers) use mpi4py's pickled lower-case methods; model bytes never do.

`python -m fedmpi.comm --config C --clients K --rounds R` prints the analytical
communication table (see `fedmpi.fl.ledger`) without training.
"""
from __future__ import annotations

import os
import socket
from collections import OrderedDict
import time
import sys
from typing import Optional, Sequence

import numpy as np

MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS",
                "MV2_COMM_WORLD_SIZE", "I_MPI_HYDRA_TOPOLIB")


def launched_by_mpi() -> bool:
    """True when started by mpirun / mpiexec / srun with an MPI process manager."""
    return any(v in os.environ for v in MPI_ENV_VARS)


from fedmpi.errors import EXIT_STALLED, StallError  # noqa: E402


class Group:
    """A subgroup containing the federator (world rank 0, the root) and some clients."""

    def __init__(self, members: tuple[int, ...], handle, is_member: bool):
        self.members = members
        self.handle = handle
        self.is_member = is_member


def cuda_aware_mpi() -> bool:
    """Whether the MPI library takes CUDA device buffers. FEDMPI_CUDA_AWARE_MPI=0/1
    decides if set; else Open MPI's `ompi_info` build flag, MPICH's MPIR_CVAR_ENABLE_GPU."""
    forced = os.environ.get("FEDMPI_CUDA_AWARE_MPI")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    if os.environ.get("MPIR_CVAR_ENABLE_GPU") == "1":
        return True
    import shutil
    import subprocess
    tool = shutil.which("ompi_info")
    if tool:
        try:
            out = subprocess.run([tool, "--parsable", "--all"], capture_output=True, text=True,
                                 timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "mpi_built_with_cuda_support:value:true" in out
    return False


class MPIBackend:
    """Collectives of mpi4py on torch tensors. CPU tensors are passed as numpy views of
    their memory (no copy). CUDA tensors are passed as they are (through
    __cuda_array_interface__) when the MPI library is CUDA-aware; otherwise each call
    stages through host memory, copying only what travels: a sender's values device to
    host before the call, a receiver's result host to device after it (a client's upload
    and download: one copy each; nothing is read back that the call overwrites)."""
    name = "mpi"

    def __init__(self, world, device=None):
        self.world = world
        self.comm = world.comm
        self.MPI = world.MPI
        self.device_buffers = False
        self.cache: "OrderedDict[tuple, Group]" = OrderedDict()
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            self.device_buffers = cuda_aware_mpi()
            self.name = "mpi (CUDA-aware: device buffers)" if self.device_buffers \
                else "mpi (host staging: MPI is not CUDA-aware)"

    CACHE = 32  # subgroup communicators kept for later rounds (USPLIT redraws its pairs)

    def group(self, members: tuple[int, ...]) -> Group:
        me = self.world.rank in members
        if len(members) == self.world.size:
            return Group(members, self.comm, me)  # the world itself: no split needed
        # Split is collective over the world; every rank asks for the same groups in the
        # same order (the plan), so the cache hits and evicts identically everywhere.
        if members in self.cache:
            self.cache.move_to_end(members)
            return self.cache[members]
        sub = self.comm.Split(0 if me else self.MPI.UNDEFINED, key=self.world.rank)
        group = self.cache[members] = Group(members, sub if me else None, me)
        if len(self.cache) > self.CACHE:
            self._free(self.cache.popitem(last=False)[1])
        return group

    def release(self, group: Group) -> None:
        pass  # cached (see group)

    def _free(self, group: Group) -> None:
        if group.handle is not None and group.handle is not self.comm:
            group.handle.Free()
        group.handle = None

    def _buffer(self, t, sends: bool = True):
        """(object MPI can read/write, host staging tensor or None); `sends`: the call
        reads this rank's values (else the host buffer is only written by MPI)."""
        if self.stages_on_host(t):
            host = self.world.staged(t, sends)
            return host.numpy(), host
        if t.device.type == "cpu":
            return t.numpy(), None
        # CUDA-aware MPI reads and writes the device memory itself, outside torch's stream
        # order: the kernels queued on it (the packing of an upload) must be done
        import torch
        torch.cuda.current_stream(t.device).synchronize()
        return t, None

    def reduce_sum(self, group: Group, t, root_send=None) -> None:
        """Sum over the group into the root's `t`; the root adds `root_send`, or its own
        `t` when None (see World.reduce_sum)."""
        if self.world.rank != 0:
            group.handle.Reduce(self._buffer(t)[0], None, op=self.MPI.SUM, root=0)
            return
        buf, host = self._buffer(t, sends=root_send is None)
        on_host = host is not None or t.device.type == "cpu"  # where MPI reads and writes
        if (root_send is not None and not self.stages_on_host(root_send)
                and (root_send.device.type == "cpu") == on_host):
            # the summand is already where MPI reads: handed over as is, no copy (never
            # through the staging buffer, which is `t`'s)
            group.handle.Reduce(self._buffer(root_send)[0], buf, op=self.MPI.SUM, root=0)
        else:
            if root_send is not None:  # e.g. central DP's noise, drawn on the device
                (t if host is None else host).copy_(root_send)
            group.handle.Reduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM, root=0)
        if host is not None:
            t.copy_(host)

    def stages_on_host(self, t) -> bool:
        return t.device.type != "cpu" and not self.device_buffers

    def bcast(self, group: Group, t) -> None:
        buf, host = self._buffer(t, sends=self.world.rank == 0)
        group.handle.Bcast(buf, root=0)
        if host is not None and self.world.rank != 0:
            t.copy_(host)

    def reduce_sum_u64(self, group: Group, arr: np.ndarray) -> None:
        # UINT64_T named explicitly: unsigned SUM wraps modulo 2^64 by the C standard
        buf = [arr, self.MPI.UINT64_T]
        if self.world.rank == 0:
            group.handle.Reduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM, root=0)
        else:
            group.handle.Reduce(buf, None, op=self.MPI.SUM, root=0)

    def close(self) -> None:
        while self.cache:
            self._free(self.cache.popitem()[1])


class TorchBackend:
    """torch.distributed on torch tensors, in place. NCCL when every rank has its own GPU
    (device tensors, zero host copies); gloo otherwise (host tensors; a CUDA tensor is
    staged through one host buffer per call)."""
    name = "torch"

    def __init__(self, world, device):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.world = world
        # NCCL needs one GPU per rank; where ranks share a GPU (or some have none) every
        # rank uses gloo on host buffers instead. All ranks must agree on the choice.
        own_gpu = (device.type == "cuda"
                   and world.local_size <= torch.cuda.device_count())
        use_nccl = bool(world.comm.allreduce(int(own_gpu), op=world.MPI.MIN))
        self.device = device if use_nccl else torch.device("cpu")
        backend = "nccl" if use_nccl else "gloo"
        if use_nccl:
            torch.cuda.set_device(self.device)
        # Rendezvous address from rank 0, spread over MPI: no launcher env needed.
        addr = port = None
        if world.rank == 0:
            addr = socket.gethostname()
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        addr, port = world.comm.bcast((addr, port), root=0)
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}",
                                rank=world.rank, world_size=world.size)
        self.groups: "OrderedDict[tuple, object]" = OrderedDict()
        self.name = f"torch/{backend}"
        if device.type == "cuda" and not use_nccl:
            self.name += " (ranks share a GPU; NCCL needs one GPU per rank: gloo on host buffers)"

    CACHE = MPIBackend.CACHE  # subgroups kept for later rounds (USPLIT redraws its pairs)

    def group(self, members: tuple[int, ...]) -> Group:
        if len(members) == self.world.size:
            return Group(members, None, True)  # None means the default (world) group
        # new_group is collective over the world, and every rank asks for the same groups
        # in the same order (the plan): the cache hits and evicts identically everywhere.
        # Evicted groups are destroyed (each holds sockets / a NCCL communicator: USPLIT
        # draws new pairs every round and would run out of file descriptors).
        if members in self.groups:
            self.groups.move_to_end(members)
        else:
            self.groups[members] = self.dist.new_group(list(members))
            if len(self.groups) > self.CACHE:
                self.dist.destroy_process_group(self.groups.popitem(last=False)[1])
        return Group(members, self.groups[members], self.world.rank in members)

    def release(self, group: Group) -> None:
        pass  # cached for later rounds

    def _staged(self, t, sends: bool = True):
        """(tensor the backend takes, host staging tensor or None); as MPIBackend._buffer."""
        if not self.stages_on_host(t):
            return t, None
        host = self.world.staged(t, sends)
        return host, host

    def stages_on_host(self, t) -> bool:
        return not (t.device == self.device
                    or (t.device.type == "cpu" and self.device.type == "cpu"))

    def reduce_sum(self, group: Group, t, root_send=None) -> None:
        root_adds = root_send is not None and self.world.rank == 0
        buf, host = self._staged(t, sends=not root_adds)
        if root_adds:
            buf.copy_(root_send)  # torch.distributed reduces in place: the root's summand
        self.dist.reduce(buf, dst=0, op=self.dist.ReduceOp.SUM, group=group.handle)
        if host is not None and self.world.rank == 0:
            t.copy_(host)

    def bcast(self, group: Group, t) -> None:
        buf, host = self._staged(t, sends=self.world.rank == 0)
        self.dist.broadcast(buf, src=0, group=group.handle)
        if host is not None and self.world.rank != 0:
            t.copy_(host)

    def reduce_sum_u64(self, group: Group, arr: np.ndarray) -> None:
        # torch has no uint64 reduction: int64 has the same bits, and its SUM wraps
        # identically in two's complement (gloo and NCCL add with the hardware's wrap)
        t = self.torch.from_numpy(arr.view(np.int64))
        if self.device.type == "cpu":
            self.dist.reduce(t, dst=0, op=self.dist.ReduceOp.SUM, group=group.handle)
            return
        dev = t.to(self.device)  # NCCL takes device tensors only
        self.dist.reduce(dev, dst=0, op=self.dist.ReduceOp.SUM, group=group.handle)
        if self.world.rank == 0:
            t.copy_(dev)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class World:
    """World communicator, role and backend of this process."""

    def __init__(self, backend: str = "mpi"):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        # client ranks sharing this node (the federator mostly waits): for CPU threads
        self.local_clients = node.allreduce(int(self.rank != 0))
        node.Free()
        self.backend_name = backend
        self.backend = None
        self._scratch: dict[str, np.ndarray] = {}
        # Seconds a rank waits in `flags` / `wait_all` before giving up on the slowest
        # one (0: forever). Rank 0 gives up first so that it, not a client, reports.
        self.timeout = 0.0
        self.phase = "set-up"
        # Called about every 0.1 s while this rank waits in `_wait` (the federator: the
        # live progress display of the round, fed by a ProgressRelay).
        self.waiting_hook = None

    def start_backend(self, device) -> None:
        if self.backend_name == "torch":
            self.backend = TorchBackend(self, device)
        else:
            self.backend = MPIBackend(self, device)

    # roles -------------------------------------------------------------------------
    @property
    def is_federator(self) -> bool:
        return self.rank == 0

    @property
    def num_clients(self) -> int:
        return self.size - 1

    @property
    def client(self) -> int:
        """This rank's client index 0..K-1 (-1 on the federator)."""
        return self.rank - 1

    # subgroups and collectives on flat buffers ----------------------------------------
    def group(self, clients: Sequence[int]) -> Group:
        """The group of the federator and these clients (0-based client indices)."""
        return self.backend.group(tuple([0] + [k + 1 for k in sorted(clients)]))

    def release(self, group: Group) -> None:
        self.backend.release(group)

    def reduce_sum(self, group: Group, t, root_send=None) -> None:
        """In place on torch tensors: the root's `t` becomes the sum over the group of
        every member's `t`, where the root's own summand is `root_send` if given (e.g.
        zeros: `t` is then only written, never read, on the mpi backend) and else its `t`."""
        self.backend.reduce_sum(group, t, root_send)

    def summand_device(self, t):
        """Where the root's `root_send` for reduce_sum(t) costs least: the host when the
        transport stages `t` through host memory (then it is handed over without a
        device-to-host copy), else t's own device."""
        import torch
        return torch.device("cpu") if self.backend.stages_on_host(t) else t.device

    def bcast(self, group: Group, t) -> None:
        """In place on torch tensors: every member's `t` becomes the root's."""
        self.backend.bcast(group, t)

    def reduce_sum_u64(self, group: Group, arr: np.ndarray) -> None:
        """In place on a contiguous numpy uint64 array (host memory): the root's `arr`
        becomes the sum over the group, modulo 2^64 (root's own included: zero it).
        Secure aggregation's masked fixed-point uploads (fedmpi.fl.secure)."""
        if arr.dtype != np.uint64 or not arr.flags.c_contiguous:
            raise ValueError(f"reduce_sum_u64 needs a contiguous uint64 array, got {arr.dtype}")
        self.backend.reduce_sum_u64(group, arr)

    # control plane ------------------------------------------------------------------
    def _wait(self, req, phase: Optional[str]) -> None:
        """Complete a non-blocking collective by polling with sleeps: ranks that finish
        early (and the federator) must not spin on a core that the training ranks need
        when several ranks share a node. Past `timeout` seconds, raise StallError."""
        if phase:
            self.phase = phase
        limit = self.timeout + (0 if self.rank == 0 else 5.0) if self.timeout > 0 else None
        start = time.monotonic()
        next_hook = start
        nap = 5e-5  # grows to 2 ms: a short wait ends at once, a long one costs no CPU
        while not req.Test():
            if limit is not None and time.monotonic() - start > limit:
                raise StallError(
                    f"waited {time.monotonic() - start:.0f} s in phase '{self.phase}' for the "
                    f"slowest rank (fed.round_timeout={self.timeout:g}); a rank is stuck or "
                    f"much slower than the others: stopping the job")
            if self.waiting_hook is not None and time.monotonic() >= next_hook:
                self.waiting_hook()
                next_hook = time.monotonic() + 0.1
            time.sleep(nap)
            nap = min(nap * 1.5, 0.002)

    def flags(self, values: Sequence[int], phase: Optional[str] = None) -> np.ndarray:
        """Allgather a few small integers per rank: an array (world size, len(values))."""
        send = np.asarray(values, dtype=np.int32)
        recv = np.zeros((self.size, send.size), dtype=np.int32)
        self._wait(self.comm.Iallgather(send, recv), phase)
        return recv

    def any(self, flag: bool, phase: Optional[str] = None) -> bool:
        """Logical OR over all ranks (waits with sleeps, see `_wait`)."""
        return bool(self.flags([int(bool(flag))], phase).any())

    def wait_all(self, phase: Optional[str] = None) -> None:
        """A barrier that sleeps while it waits: use it before a collective that follows
        uneven work (training, sampling, the classifier on rank 0, writing files)."""
        self._wait(self.comm.Ibarrier(), phase)

    barrier = wait_all

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def staged(self, t, sends: bool):
        """The host copy of device tensor `t` that a host-only transport hands to its
        collective: a buffer reused across calls (pinned where CUDA is up), holding t's
        values if `sends` (the call reads them), else left for the call to write."""
        import torch
        key = ("host", t.numel(), t.dtype)
        host = self._scratch.get(key)
        if host is None:
            pin = torch.cuda.is_available() and torch.cuda.is_initialized()
            host = self._scratch[key] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=pin)
        if sends:
            host.copy_(t)
        return host

    def bcast_array(self, arr: np.ndarray) -> None:
        """Broadcast a numpy array from the federator over the whole world, in place."""
        self.comm.Bcast(arr, root=0)

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def relay(self, obj) -> list:
        """Every rank's `obj`, indexed by rank, on every rank, through the federator: a
        gather to rank 0 and its broadcast (e.g. the clients' public keys; the federator
        only forwards them)."""
        return self.comm.bcast(self.comm.gather(obj, root=0), root=0)

    def bcast_obj(self, obj):
        return self.comm.bcast(obj, root=0)

    def allreduce_array(self, arr: np.ndarray) -> np.ndarray:
        out = np.empty_like(arr)
        self.comm.Allreduce(arr, out, op=self.MPI.SUM)
        return out

    def reduce_array(self, arr: np.ndarray) -> Optional[np.ndarray]:
        out = np.empty_like(arr) if self.rank == 0 else None
        self.comm.Reduce(arr, out, op=self.MPI.SUM, root=0)
        return out

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def describe(self) -> str:
        version = self.MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        return f"{version} | backend {self.backend.name if self.backend else self.backend_name}"


class ProgressRelay:
    """Clients' progress of local training, relayed to the federator while it waits.

    A client calls `report(...)` as often as it likes (every optimizer step): at most
    every `interval` seconds it posts a non-blocking send (Isend) of five int64 numbers
    (round, steps done, steps in its round, images done, final 0/1) and goes on
    training; it never waits for the federator. After its training it posts one final
    report (`finish`). The federator calls `poll()` from its waiting loop
    (`World.waiting_hook`): Iprobe + Recv of whatever has arrived, never blocking. After
    the round's first collective the federator `drain`s until it holds the final report
    of every client, and every client completes its sends (`end_round`), so no
    message outlives its round. Receives name their source and stop at that client's
    final report: messages from one sender arrive in order, so a client already in the
    next round can never have its reports counted in this one. The relay has its own
    communicator (a Dup of the world), so its messages can never be matched by any
    other receive. `interval` 0 turns it off on every rank (no messages at all).
    """

    TAG = 1
    FIELDS = 5

    def __init__(self, world, interval: float):
        self.enabled = interval > 0 and world.size > 1
        self.interval = interval
        self.rank, self.clients = world.rank, world.size - 1
        self.MPI = world.MPI
        # collective over the world: every rank constructs the relay at the same point
        self.comm = world.comm.Dup() if self.enabled else None
        self._pending: list = []  # (request, buffer): a buffer must live until its send completes
        self._next = 0.0
        self.sent = 0  # messages posted by this client in this run (the benchmark reads it)
        self._open = set(range(1, world.size))  # federator: clients whose final report is due

    # client side -------------------------------------------------------------------
    def report(self, round_index: int, done: int, total: int, images: int,
               final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now < self._next:
            return
        self._next = now + self.interval
        msg = np.array([round_index, done, total, images, int(final)], dtype=np.int64)
        self._pending.append((self.comm.Isend(msg, dest=0, tag=self.TAG), msg))
        self.sent += 1
        # release the buffers of sends already delivered (Test never blocks)
        self._pending = [(req, buf) for req, buf in self._pending if not req.Test()]

    def finish(self, round_index: int, done: int, total: int, images: int) -> None:
        """The client's last report of the round (always sent when the relay is on)."""
        self.report(round_index, done, total, images, final=True)

    def end_round(self) -> None:
        """Client: complete this round's sends. Call after the round's first collective:
        the federator is then draining them, so this returns at once."""
        for req, _ in self._pending:
            req.Wait()
        self._pending.clear()
        self._next = 0.0

    # federator side ----------------------------------------------------------------
    def poll(self) -> list[tuple[int, np.ndarray]]:
        """(client rank, report) of every message that has arrived; never blocks."""
        out = []
        if not self.enabled:
            return out
        for rank in sorted(self._open):
            while rank in self._open and self.comm.Iprobe(source=rank, tag=self.TAG):
                out.append(self._recv(rank))
        return out

    def drain(self) -> list[tuple[int, np.ndarray]]:
        """Receive until every client's final report of the round is in (blocking: call it
        after the round's first collective, when every client has posted it)."""
        out = []
        if not self.enabled:
            return out
        for rank in sorted(self._open):
            while rank in self._open:
                out.append(self._recv(rank))
        self._open = set(range(1, self.clients + 1))  # the next round
        return out

    def _recv(self, source: int) -> tuple[int, np.ndarray]:
        buf = np.empty(self.FIELDS, dtype=np.int64)
        self.comm.Recv(buf, source=source, tag=self.TAG)
        if buf[4]:
            self._open.discard(source)
        return source, buf

    def close(self) -> None:
        if self.comm is not None:
            self.end_round()
            self.comm.Free()
            self.comm = None
            self.enabled = False
