"""Live progress displays: a federated round seen from the federator, a centralized epoch.

`Progress` shows one unit of work (steps done out of a total, images/s, elapsed, ETA and
a note). On an interactive terminal it is a tqdm bar; in a batch log (Slurm, nohup, a
pipe: no tty) it prints a plain line at most every `every_s` seconds (30) or each time
another `every_fraction` (10%) of the work is done, so a log shows the job is alive
without filling up. Under mpirun the ranks' output is a pipe even when mpirun runs in a
terminal; `launch/local.sh` then sets FEDMPI_PROGRESS=bar. FEDMPI_PROGRESS=lines or
off forces the other modes.

The bar is tqdm's (`tqdm.format_meter`), redrawn at most 5 times a second as a whole
line on stdout that first moves the cursor back up over the previous one (ANSI
"previous line, erase line"): mpirun forwards a rank's output a line at a time, so a
bar drawn with carriage returns only would appear at the end of the round.

`RoundProgress` is the federator's view of a round: the latest report of every client
(steps done of its steps in the round, images done), relayed by
`fedmpi.dist.relay.ProgressRelay` while the federator waits; it shows the steps of all clients
together, their images/s, and the slowest client, whose pace sets the ETA.

`LocalProgress` is the same relay's interface for the one process of the centralized
baseline: its reports go straight to a `Progress` of the epoch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


def display_mode() -> str:
    """'bar' on a terminal, 'lines' in a batch log, or what FEDMPI_PROGRESS says."""
    forced = os.environ.get("FEDMPI_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    return "bar" if sys.stderr.isatty() else "lines"


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Steps done out of `total` for one unit of work called `desc`."""

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[[str], None] = print,
        mode: str | None = None,
        every_s: float = 30.0,
        every_fraction: float = 0.1,
        clock=time.monotonic,
    ):
        self.total, self.desc, self.log = max(int(total), 1), desc, log
        self.mode = mode or display_mode()
        self.every_s, self.every_fraction = every_s, every_fraction
        self.clock = clock
        self.start = clock()
        self.done, self.note = 0, ""
        self.eta: float | None = None  # seconds; None: extrapolate from done / elapsed
        self.lines = 0  # plain lines printed (tests, and the benchmark)
        self._last_line = self.start
        self._last_done = 0
        self._drawn = False  # bar mode: a bar line is on screen (redraws replace it)
        self._next_draw = self.start

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, done: int, note: str = "", eta: float | None = None) -> None:
        """Set the steps done so far (absolute), the note and the ETA in seconds (None:
        from the pace so far); may print a line."""
        done = min(int(done), self.total)
        self.note, self.eta = note, eta
        self.done = done
        if self.mode == "bar":
            if self.clock() >= self._next_draw:
                self._draw()
            return
        self.tick()

    def _draw(self) -> None:
        import shutil

        from tqdm import tqdm

        self._next_draw = self.clock() + 0.2
        bar = tqdm.format_meter(
            self.done,
            self.total,
            self.elapsed,
            prefix=self.desc,
            postfix=self.note or None,
            unit="step",
            ncols=shutil.get_terminal_size((100, 24)).columns - 1,
        )
        sys.stdout.write(("\x1b[F\x1b[K" if self._drawn else "") + bar + "\n")
        sys.stdout.flush()
        self._drawn = True

    def tick(self) -> None:
        """Print a line in batch mode when it is due (call it often; it is cheap)."""
        if self.mode != "lines" or self.done >= self.total:
            return
        now = self.clock()
        if (
            now - self._last_line >= self.every_s
            or self.done - self._last_done >= self.every_fraction * self.total
        ):
            self._last_line, self._last_done = now, self.done
            self.log(self.line())
            self.lines += 1

    def line(self) -> str:
        elapsed = self.elapsed
        eta = ""
        if self.eta is not None:
            eta = f", ETA {_clock(self.eta)}"
        elif 0 < self.done < self.total:
            eta = f", ETA {_clock(elapsed * (self.total - self.done) / self.done)}"
        return (
            f"{self.desc}: {100 * self.done / self.total:3.0f}% | {self.done}/{self.total} "
            f"steps | elapsed {_clock(elapsed)}{eta}" + (f" | {self.note}" if self.note else "")
        )

    def close(self) -> None:
        if self.mode == "bar" and self._drawn:
            self._draw()  # the final state stays on screen
            self._drawn = False


class RoundProgress:
    """The federator's display of one round from the clients' relayed reports."""

    def __init__(
        self,
        round_index: int,
        rounds: int,
        clients: int,
        log: Callable[[str], None] = print,
        mode: str | None = None,
        clock=time.monotonic,
        **kwargs,
    ):
        self.clients = clients
        self.clock = clock
        self.start = clock()
        self.desc = f"round {round_index}/{rounds}"
        self.reports: dict[int, tuple[int, int, int]] = {}  # rank -> (done, total, images)
        self.log, self.mode, self.kwargs = log, mode, kwargs
        self.progress: Progress | None = None

    def add(self, rank: int, done: int, total: int, images: int) -> None:
        self.reports[rank] = (done, total, images)

    def show(self) -> None:
        """Redraw from the latest reports (and print a line when one is due)."""
        if not self.reports:
            return
        # every client's steps in the round are known once it has reported; until then
        # assume it has as many as the average reporter
        known = [t for _, t, _ in self.reports.values()]
        total = sum(known) + (self.clients - len(known)) * (sum(known) // len(known))
        done = sum(d for d, _, _ in self.reports.values())
        if self.progress is None:
            self.progress = Progress(
                total, self.desc, self.log, self.mode, clock=self.clock, **self.kwargs
            )
            self.progress.start = self.start
            self.progress._last_line = self.start
        self.progress.total = max(total, 1)
        self.progress.update(done, self.note(), self.eta())

    def eta(self) -> float | None:
        """Seconds until the slowest client is done at its pace so far (None: unknown)."""
        elapsed = self.clock() - self.start
        if len(self.reports) < self.clients or elapsed <= 0:
            return None
        left = [(t - d) * elapsed / d for d, t, _ in self.reports.values() if d > 0]
        if len(left) < self.clients:
            return None
        return max(left)

    def note(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        images = sum(i for _, _, i in self.reports.values())
        rank, (done, total, _) = min(
            self.reports.items(), key=lambda kv: (kv[1][0] / max(kv[1][1], 1), kv[0])
        )
        waiting = (
            f" | {len(self.reports)}/{self.clients} clients reporting"
            if len(self.reports) < self.clients
            else ""
        )
        return (
            f"{images / elapsed:.0f} img/s | slowest client {rank} "
            f"({100 * done / max(total, 1):.0f}%){waiting}"
        )

    @property
    def lines(self) -> int:
        return self.progress.lines if self.progress else 0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class LocalProgress:
    """The progress of a one-process job's epochs, shown as it trains. It has the
    interface of `ProgressRelay` that the round loop uses; nothing is sent."""

    enabled = False  # nothing to poll: the display is drawn at each report

    def __init__(self, log: Callable[[str], None], rounds: int, batch_size: int):
        self.log, self.rounds = log, rounds
        self.bar: Progress | None = None

    def report(self, round_index: int, done: int, total: int, images: int) -> None:
        if self.bar is None:  # after the epoch's first step: the pace counts from here
            self.bar = Progress(total, f"epoch {round_index}/{self.rounds}", self.log)
            self.first = images
        rate = (images - self.first) / max(self.bar.elapsed, 1e-9)
        self.bar.update(done, f"{rate:.0f} img/s" if images > self.first else "")

    def finish(self, round_index: int, done: int, total: int, images: int) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    def poll(self) -> list:
        return []

    drain = poll

    def end_round(self) -> None:
        pass

    close = end_round


def watch_round(job, r: int) -> RoundProgress | None:
    """Federator: show the clients' relayed progress while it waits for the round's
    first collective (`World.waiting_hook`, called about every 0.1 s)."""
    world, relay = job.world, job.relay
    if not (world.is_federator and relay.enabled):
        return None
    display = RoundProgress(r, job.schedule.rounds, world.num_clients, job.log)

    def hook():
        for rank, msg in relay.poll():
            display.add(rank, int(msg[1]), int(msg[2]), int(msg[3]))
        display.show()

    world.waiting_hook = hook
    return display


def end_watch(job, display: RoundProgress | None) -> None:
    """After the round's first collective: the federator receives the rest of the
    round's progress messages, the clients complete their sends; none is left."""
    job.world.waiting_hook = None
    if job.world.is_federator:
        for rank, msg in job.relay.drain():
            if display is not None:
                display.add(rank, int(msg[1]), int(msg[2]), int(msg[3]))
        if display is not None:
            display.close()
    else:
        job.relay.end_round()
