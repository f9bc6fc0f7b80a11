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

The backends are in `backends.py`, the clients' progress messages in `relay.py`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import numpy as np

MPI_ENV_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "PMI_RANK",
    "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_SIZE",
    "I_MPI_HYDRA_TOPOLIB",
)


def launched_by_mpi() -> bool:
    """True when started by mpirun / mpiexec / srun with an MPI process manager."""
    return any(v in os.environ for v in MPI_ENV_VARS)


from fedmpi.dist.backends import Group, MPIBackend, TorchBackend  # noqa: E402
from fedmpi.errors import StallError  # noqa: E402


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

    @property
    def trains(self) -> bool:
        """Whether this rank trains a model (a client)."""
        return self.rank != 0

    @property
    def client_ranks(self) -> range:
        """The ranks that train, in client order (the rows of `flags` that are clients')."""
        return range(1, self.size)

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

    def reduce_sum_u8(self, group: Group, arr: np.ndarray) -> None:
        """As `reduce_sum_u64` on a contiguous uint8 array: the sum modulo 2^8, one byte
        per value on the wire (int8-compressed uploads, fedmpi.fl.compress)."""
        if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
            raise ValueError(f"reduce_sum_u8 needs a contiguous uint8 array, got {arr.dtype}")
        self.backend.reduce_sum_u8(group, arr)

    def agree_max(self, group: Group, arr: np.ndarray) -> None:
        """In place on a small contiguous float32 array: every member's `arr` becomes the
        elementwise MAX over the group (a Reduce to the root and its Bcast: each member
        sends and receives its values once, so the bytes are countable)."""
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            raise ValueError(f"agree_max needs a contiguous float32 array, got {arr.dtype}")
        self.backend.agree_max(group, arr)

    def gather_bytes(self, group: Group, send: np.ndarray, recv: np.ndarray | None) -> None:
        """A linear Gather of equal-sized byte buffers to the root: each member's `send`
        (uint8, the root's ignored) lands in row i of the root's `recv` (uint8, shape
        (members - 1, send.size)) for the i-th member after the root, in rank order.
        Point-to-point from each member to the root, so every byte crosses once."""
        if send.dtype != np.uint8 or not send.flags.c_contiguous:
            raise ValueError(f"gather_bytes needs a contiguous uint8 array, got {send.dtype}")
        self.backend.gather_bytes(group, send, recv)

    # control plane ------------------------------------------------------------------
    def _wait(self, req, phase: str | None) -> None:
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
                    f"much slower than the others: stopping the job"
                )
            if self.waiting_hook is not None and time.monotonic() >= next_hook:
                self.waiting_hook()
                next_hook = time.monotonic() + 0.1
            time.sleep(nap)
            nap = min(nap * 1.5, 0.002)

    def flags(self, values: Sequence[int], phase: str | None = None) -> np.ndarray:
        """Allgather a few small integers per rank: an array (world size, len(values))."""
        send = np.asarray(values, dtype=np.int32)
        recv = np.zeros((self.size, send.size), dtype=np.int32)
        self._wait(self.comm.Iallgather(send, recv), phase)
        return recv

    def any(self, flag: bool, phase: str | None = None) -> bool:
        """Logical OR over all ranks (waits with sleeps, see `_wait`)."""
        return bool(self.flags([int(bool(flag))], phase).any())

    def wait_all(self, phase: str | None = None) -> None:
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

    def reduce_array(self, arr: np.ndarray) -> np.ndarray | None:
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
