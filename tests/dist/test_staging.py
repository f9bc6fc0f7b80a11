"""Host staging of device tensors (fedmpi.dist.world) without a GPU: a "meta" tensor stands
in for a CUDA tensor (it has no values, so any copy of its values to the host raises),
and a recording stand-in for the communicator takes the MPI calls."""
import numpy as np
import torch

from fedmpi.dist.world import World

from fedmpi.dist.backends import MPIBackend


class _Handle:
    def __init__(self):
        self.calls = []

    def Reduce(self, send, recv, op=None, root=0):
        self.calls.append((send, recv))


class _Group:
    def __init__(self):
        self.handle = _Handle()


class _World:
    """What MPIBackend uses of World: rank, MPI constants, the staging buffers."""
    rank = 0
    comm = None

    class MPI:
        IN_PLACE = object()
        SUM = "sum"

    def __init__(self):
        self._scratch = {}

    staged = World.staged


def test_federator_hands_a_host_summand_to_mpi_as_is():
    """Host-staged federator: a summand in host memory goes to MPI without a copy, and
    its own device weights are only written (never staged to the host)."""
    world = _World()
    backend = MPIBackend(world)  # no CUDA-aware MPI: device tensors stage through the host
    t = torch.empty(5, device="meta")
    zeros = torch.zeros(8)[:5]
    assert backend.stages_on_host(t) and not backend.stages_on_host(zeros)
    group = _Group()
    backend.reduce_sum(group, t, root_send=zeros)  # would raise if t's values were read
    [(send, recv)] = group.handle.calls
    assert send is not world.MPI.IN_PLACE and np.shares_memory(send, zeros.numpy())
    assert isinstance(recv, np.ndarray) and not np.shares_memory(recv, zeros.numpy())


def test_summand_device_follows_the_transport():
    class _Backend:
        def __init__(self, staged):
            self.stages_on_host = lambda t: staged
    world = World.__new__(World)
    t = torch.empty(3, device="meta")
    world.backend = _Backend(True)
    assert world.summand_device(t) == torch.device("cpu")
    world.backend = _Backend(False)
    assert world.summand_device(t) == t.device
