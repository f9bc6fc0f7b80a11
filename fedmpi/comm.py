"""The MPI world, process subgroups and the two transport backends.

This is the only module that imports mpi4py or torch.distributed. `World` owns the
world communicator, the rank's role (rank 0 federator, ranks 1..K clients), the
node-local rank (from a shared-memory split, used to pick the GPU) and one backend:

- `mpi` (default): a subgroup is `COMM_WORLD.Split(color)`; `Reduce` to the
  federator and `Bcast` back on numpy float32 buffers (no pickling). Freed after use.
- `torch`: `torch.distributed` initialised from the MPI ranks (gloo on CPU, nccl on
  GPU); subgroups from `new_group`, cached because NCCL communicators are expensive.

Creating a subgroup is collective over the whole world, so every rank calls
`World.group(members)` for every group of a round in the same order; the plan (pure,
computed identically everywhere) guarantees that. Control-plane messages (errors,
losses, ledgers) use mpi4py's pickled lower-case methods; model bytes never do.

`python -m fedmpi.comm --config C --clients K --rounds R` prints the analytical
communication table (see `fedmpi.ledger`) without training.
"""
from __future__ import annotations

import os
import socket
import time
import sys
from typing import Optional, Sequence

import numpy as np

MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS",
                "MV2_COMM_WORLD_SIZE", "I_MPI_HYDRA_TOPOLIB")


def launched_by_mpi() -> bool:
    """True when started by mpirun / mpiexec / srun with an MPI process manager."""
    return any(v in os.environ for v in MPI_ENV_VARS)


EXIT_STALLED = 5  # a rank did not reach a collective within fed.round_timeout


class StallError(RuntimeError):
    """The slowest rank did not arrive at a collective within the timeout."""


class Group:
    """A subgroup containing the federator (world rank 0, the root) and some clients."""

    def __init__(self, members: tuple[int, ...], handle, is_member: bool):
        self.members = members
        self.handle = handle
        self.is_member = is_member


class MPIBackend:
    name = "mpi"

    def __init__(self, world):
        self.world = world
        self.comm = world.comm
        self.MPI = world.MPI

    def group(self, members: tuple[int, ...]) -> Group:
        me = self.world.rank in members
        if len(members) == self.world.size:
            return Group(members, self.comm, me)  # the world itself: no split needed
        sub = self.comm.Split(0 if me else self.MPI.UNDEFINED, key=self.world.rank)
        return Group(members, sub if me else None, me)

    def release(self, group: Group) -> None:
        if group.handle is not None and group.handle is not self.comm:
            group.handle.Free()
        group.handle = None

    def reduce_sum(self, group: Group, buf: np.ndarray) -> Optional[np.ndarray]:
        out = self.world.scratch(f"reduce-{buf.size}", buf.size) if self.world.rank == 0 else None
        group.handle.Reduce(buf, out, op=self.MPI.SUM, root=0)
        return out

    def bcast(self, group: Group, buf: np.ndarray) -> None:
        group.handle.Bcast(buf, root=0)

    def close(self) -> None:
        pass


class TorchBackend:
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
        self.groups: dict[tuple, object] = {}
        self.name = f"torch/{backend}"
        if device.type == "cuda" and not use_nccl:
            self.name += " (ranks share a GPU; NCCL needs one GPU per rank)"

    def group(self, members: tuple[int, ...]) -> Group:
        if len(members) == self.world.size:
            return Group(members, None, True)  # None means the default (world) group
        if members not in self.groups:
            self.groups[members] = self.dist.new_group(list(members))
        return Group(members, self.groups[members], self.world.rank in members)

    def release(self, group: Group) -> None:
        pass  # cached for later rounds

    def _tensor(self, buf: np.ndarray):
        t = self.torch.from_numpy(buf)
        return t.to(self.device) if self.device.type == "cuda" else t

    def reduce_sum(self, group: Group, buf: np.ndarray) -> Optional[np.ndarray]:
        t = self._tensor(buf.copy() if self.device.type == "cpu" else buf)
        self.dist.reduce(t, dst=0, op=self.dist.ReduceOp.SUM, group=group.handle)
        return t.cpu().numpy() if self.world.rank == 0 else None

    def bcast(self, group: Group, buf: np.ndarray) -> None:
        t = self._tensor(buf)
        self.dist.broadcast(t, src=0, group=group.handle)
        if self.device.type == "cuda":
            buf[:] = t.cpu().numpy()

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

    def start_backend(self, device) -> None:
        if self.backend_name == "torch":
            self.backend = TorchBackend(self, device)
        else:
            self.backend = MPIBackend(self)

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

    def reduce_sum(self, group: Group, buf: np.ndarray) -> Optional[np.ndarray]:
        return self.backend.reduce_sum(group, buf)

    def bcast(self, group: Group, buf: np.ndarray) -> None:
        self.backend.bcast(group, buf)

    # control plane ------------------------------------------------------------------
    def _wait(self, req, phase: Optional[str]) -> None:
        """Complete a non-blocking collective by polling with sleeps: ranks that finish
        early (and the federator) must not spin on a core that the training ranks need
        when several ranks share a node. Past `timeout` seconds, raise StallError."""
        if phase:
            self.phase = phase
        limit = self.timeout + (0 if self.rank == 0 else 5.0) if self.timeout > 0 else None
        start = time.monotonic()
        while not req.Test():
            if limit is not None and time.monotonic() - start > limit:
                raise StallError(
                    f"waited {time.monotonic() - start:.0f} s in phase '{self.phase}' for the "
                    f"slowest rank (fed.round_timeout={self.timeout:g}); a rank is stuck or "
                    f"much slower than the others: stopping the job")
            time.sleep(0.002)

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

    def scratch(self, key: str, n: int) -> np.ndarray:
        """A float32 buffer reused across rounds (no fresh pages every round)."""
        buf = self._scratch.get(key)
        if buf is None or buf.size != n:
            buf = self._scratch[key] = np.empty(n, dtype=np.float32)
        return buf

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

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


def main(argv=None) -> int:
    """`python -m fedmpi.comm`: the analytical communication table."""
    import argparse

    from .config import ConfigError, load_config
    from .ledger import comparison, format_table
    from .methods import METHODS
    from .summary import model_region_sizes

    p = argparse.ArgumentParser(prog="python -m fedmpi.comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rounds", type=int, default=None, help="default: fed.rounds")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rule", choices=("paper", "moved"), default="paper",
                   help="paper: initial model + R uploads + R-1 downloads; "
                        "moved: what a fedmpi run moves (one more download)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
        sizes = model_region_sizes(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rounds = args.rounds or cfg.fed.rounds
    results = [comparison(m, args.clients, rounds, sizes, cfg.run.seed)
               for m in args.methods.split(",")]
    print(f"parameters exchanged, K={args.clients}, R={rounds}, rule={args.rule}")
    print(format_table(results, args.rule))
    return 0


if __name__ == "__main__":
    sys.exit(main())
