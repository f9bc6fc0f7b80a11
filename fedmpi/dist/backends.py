"""The two transports of `World`: MPI subcommunicators and torch.distributed groups.

Both move a region's flat buffer with one Reduce to the federator and one Bcast back, on a
subgroup cached for later rounds (at most 32 live groups).
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict

import numpy as np


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
            out = subprocess.run(
                [tool, "--parsable", "--all"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "mpi_built_with_cuda_support:value:true" in out
    return False


def _add_mod_256(inbuf, inoutbuf, datatype) -> None:
    """MPI user op: inout := inout + in, elementwise modulo 2^8 (uint8)."""
    acc = np.frombuffer(inoutbuf, dtype=np.uint8)
    np.add(acc, np.frombuffer(inbuf, dtype=np.uint8), out=acc)


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
        self.cache: OrderedDict[tuple, Group] = OrderedDict()
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            self.device_buffers = cuda_aware_mpi()
            self.name = (
                "mpi (CUDA-aware: device buffers)"
                if self.device_buffers
                else "mpi (host staging: MPI is not CUDA-aware)"
            )

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
        if (
            root_send is not None
            and not self.stages_on_host(root_send)
            and (root_send.device.type == "cpu") == on_host
        ):
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

    def _reduce_to_root(self, group: Group, buf, op) -> None:
        """Reduce `buf` ([array, MPI type]) into the root's own `buf` (in place there)."""
        if self.world.rank == 0:
            group.handle.Reduce(self.MPI.IN_PLACE, buf, op=op, root=0)
        else:
            group.handle.Reduce(buf, None, op=op, root=0)

    def reduce_sum_u64(self, group: Group, arr: np.ndarray) -> None:
        # UINT64_T named explicitly: unsigned SUM wraps modulo 2^64 by the C standard
        self._reduce_to_root(group, [arr, self.MPI.UINT64_T], self.MPI.SUM)

    _add_u8 = None  # the MPI op of reduce_sum_u8, created on first use

    def reduce_sum_u8(self, group: Group, arr: np.ndarray) -> None:
        # A user-defined op, not MPI_SUM: Open MPI 5's AVX op component adds 8- and 16-bit
        # integers with saturation (vectors of 32+ values), which would break the wrap
        # modulo 2^8 that masked uploads need. numpy's uint8 add wraps by definition.
        if MPIBackend._add_u8 is None:
            MPIBackend._add_u8 = self.MPI.Op.Create(_add_mod_256, commute=True)
        self._reduce_to_root(group, [arr, self.MPI.UINT8_T], self._add_u8)

    def agree_max(self, group: Group, arr: np.ndarray) -> None:
        buf = [arr, self.MPI.FLOAT]
        self._reduce_to_root(group, buf, self.MPI.MAX)
        group.handle.Bcast(buf, root=0)

    GATHER_TAG = 7301

    def gather_bytes(self, group: Group, send: np.ndarray, recv) -> None:
        comm = group.handle
        if self.world.rank != 0:
            comm.Send([send, self.MPI.BYTE], dest=0, tag=self.GATHER_TAG)
            return
        reqs = [
            comm.Irecv([recv[i], self.MPI.BYTE], source=i + 1, tag=self.GATHER_TAG)
            for i in range(comm.Get_size() - 1)
        ]
        self.MPI.Request.Waitall(reqs)

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
        own_gpu = device.type == "cuda" and world.local_size <= torch.cuda.device_count()
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
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=world.rank, world_size=world.size
        )
        self.groups: OrderedDict[tuple, object] = OrderedDict()
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
        return not (
            t.device == self.device or (t.device.type == "cpu" and self.device.type == "cpu")
        )

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

    def _host_op(self, arr: np.ndarray, op) -> None:
        """Run `op(tensor)` on a host array, through the device for NCCL; the result
        copied back in place."""
        t = self.torch.from_numpy(arr)
        if self.device.type == "cpu":
            op(t)
            return
        dev = t.to(self.device)
        op(dev)
        t.copy_(dev)

    def reduce_sum_u8(self, group: Group, arr: np.ndarray) -> None:
        dist = self.dist
        self._host_op(arr, lambda t: dist.reduce(t, 0, dist.ReduceOp.SUM, group=group.handle))

    def agree_max(self, group: Group, arr: np.ndarray) -> None:
        dist = self.dist

        def op(t):
            dist.reduce(t, dst=0, op=dist.ReduceOp.MAX, group=group.handle)
            dist.broadcast(t, src=0, group=group.handle)

        self._host_op(arr, op)

    def gather_bytes(self, group: Group, send: np.ndarray, recv) -> None:
        torch, dist = self.torch, self.dist
        if self.world.rank != 0:
            self._host_op(send, lambda t: dist.gather(t, None, dst=0, group=group.handle))
            return
        mine = torch.zeros(recv.shape[1], dtype=torch.uint8, device=self.device)
        rows = [mine] + [torch.empty_like(mine) for _ in range(recv.shape[0])]
        dist.gather(mine, rows, dst=0, group=group.handle)
        for i, row in enumerate(rows[1:]):
            recv[i] = row.cpu().numpy()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
