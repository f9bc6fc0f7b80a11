"""Live progress of a round: clients send small non-blocking messages to the federator,
which polls them while it waits for the round's first collective.
"""

from __future__ import annotations

import time

import numpy as np


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
    def report(
        self, round_index: int, done: int, total: int, images: int, final: bool = False
    ) -> None:
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
