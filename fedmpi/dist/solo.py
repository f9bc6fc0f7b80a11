"""`SoloWorld`: one process that is the federator and its only client (K = 1).

The centralized baseline runs through the same round loop as a federated job on this
world: every collective is local (a gather of one, a broadcast to itself), nothing is
sent, no MPI is initialised. It has the subset of `World`'s interface the round loop
uses; subgroups and flat-buffer collectives are not needed, since a federation of one
has nothing to average.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SoloWorld:
    rank = 0
    size = 1
    local_rank = 0
    local_clients = 1
    num_clients = 1
    client = 0
    is_federator = True
    trains = True
    client_ranks = range(0, 1)

    def __init__(self):
        self.timeout = 0.0
        self.waiting_hook = None

    def start_backend(self, device) -> None:
        pass

    def flags(self, values: Sequence[int], phase: str | None = None) -> np.ndarray:
        return np.asarray([values], dtype=np.int32)

    def any(self, flag: bool, phase: str | None = None) -> bool:
        return bool(flag)

    def wait_all(self, phase: str | None = None) -> None:
        pass

    def allgather(self, obj) -> list:
        return [obj]

    gather = allgather

    def bcast_obj(self, obj):
        return obj

    def allreduce_array(self, arr: np.ndarray) -> np.ndarray:
        return arr.copy()

    reduce_array = allreduce_array

    def abort(self, code: int = 1) -> None:
        pass  # nothing else to take down: the caller returns the exit code

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "one process"
