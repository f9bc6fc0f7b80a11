"""The federation's clients: how many, which process hosts each, who takes part each round.

This module owns `Population`: the N clients of a job (`fed.clients`, default one per
client rank), their placement on the client ranks and the round's sample
(`fed.participation`, `fed.sampling`). Pure: every rank computes the same answer from
the config, the clients' sizes and the round, with no communication.

Placement. Client c lives on one client rank ("slot" s = rank - 1) for the whole job:
its data is loaded only there and its personal regions (UDEC, ULATDEC) stay there.
With one client per slot, client c is on slot c (today's cross-silo layout: client k on
rank k + 1). Otherwise clients are spread by size, largest first, each to the slot with
the fewest images so far (ties: the lower slot), so that the slots' training work per
round is balanced on average; a slot never hosts more than ceil(N / slots) clients.

Sampling, per round r (deterministic from the sampling key and r, so a resumed job
draws the same clients):
- fixed: round(C * N) clients (at least 1) drawn without replacement;
- poisson: each client independently with probability C (the sample may be empty; the
  form that DP-FedAvg's accountant amplifies, `fedmpi.fl.privacy`).
C = 1 takes every client every round, with no draw.

The key is the run seed, except with privacy.dp where the amplification by sampling
holds only against someone who cannot tell who was sampled: the round loop then uses a
secret key kept in the run folder (`store.runfolder.RunFolder.sampling_key`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLING = ("fixed", "poisson")


@dataclass(frozen=True)
class Population:
    """N clients over `slots` client ranks. `hosts[c]`: the slot of client c; `sizes[c]`:
    its number of training images (as declared by the split)."""

    hosts: tuple[int, ...]
    sizes: tuple[int, ...]
    slots: int
    participation: float = 1.0
    sampling: str = "fixed"

    @classmethod
    def place(
        cls, sizes, slots: int, participation: float = 1.0, sampling: str = "fixed"
    ) -> Population:
        """Place clients of these sizes on `slots` client ranks (see the module docstring)."""
        sizes = tuple(int(n) for n in sizes)
        n = len(sizes)
        if slots < 1:
            raise ValueError("need at least one client rank")
        if n < slots:
            raise ValueError(
                f"fed.clients is {n} but the job has {slots} client ranks: every rank "
                f"must host at least one client; set --fed.clients={slots} or more, or "
                f"launch with mpirun -n {n + 1}"
            )
        if sampling not in SAMPLING:
            raise ValueError(f"fed.sampling must be one of {SAMPLING}, got {sampling!r}")
        if n == slots:
            hosts = tuple(range(n))
        else:
            cap = -(-n // slots)
            load, count = [0] * slots, [0] * slots
            out = [0] * n
            for c in sorted(range(n), key=lambda c: (-sizes[c], c)):
                s = min((s for s in range(slots) if count[s] < cap), key=lambda s: (load[s], s))
                out[c] = s
                load[s] += sizes[c]
                count[s] += 1
            hosts = tuple(out)
        return cls(hosts, sizes, slots, float(participation), sampling)

    @property
    def num_clients(self) -> int:
        return len(self.hosts)

    @property
    def one_per_slot(self) -> bool:
        """Every client rank hosts exactly one client (the cross-silo layout)."""
        return self.num_clients == self.slots

    @property
    def everyone(self) -> bool:
        """Every client takes part in every round."""
        return self.participation >= 1.0

    def clients_of(self, slot: int) -> list[int]:
        """The clients slot `slot` hosts, in client order."""
        return [c for c, s in enumerate(self.hosts) if s == slot]

    def expected(self) -> float:
        """The expected number of clients per round (the DP average's fixed denominator)."""
        if self.everyone:
            return float(self.num_clients)
        if self.sampling == "poisson":
            return self.participation * self.num_clients
        return float(self.fixed_count())

    def fixed_count(self) -> int:
        return max(1, int(round(self.participation * self.num_clients)))

    def sample(self, round_index: int, key: int) -> list[int]:
        """The clients taking part in round `round_index` (sorted)."""
        n = self.num_clients
        if self.everyone:
            return list(range(n))
        rng = np.random.default_rng([int(key), int(round_index), 0x5A3B1E])
        if self.sampling == "poisson":
            return [int(c) for c in np.flatnonzero(rng.random(n) < self.participation)]
        return sorted(int(c) for c in rng.choice(n, size=self.fixed_count(), replace=False))

    def round_sizes(self, sampled, nonfinite) -> list[int]:
        """Every client's FedAvg size in a round: its images if it was sampled and stayed
        finite (`nonfinite`: client numbers 1..N), else 0."""
        sizes = [0] * self.num_clients
        for c in sampled:
            if c + 1 not in nonfinite:
                sizes[c] = self.sizes[c]
        return sizes

    def wire(self, plan, released=()) -> list[tuple[frozenset, frozenset]]:
        """Per client rank: (the regions it uploads, those it receives) in the round of
        `plan`. A rank uploads a region when one of its clients reports it (their mean, as
        one buffer); every rank receives every region that someone reported (it holds the
        global model for its clients' next rounds), and the `released` ones (released
        every round: DP with sampling)."""
        reported = frozenset(r for ups in plan.uploads for r in ups) | frozenset(released)
        ups = [set() for _ in range(self.slots)]
        for c, regions in enumerate(plan.uploads):
            ups[self.hosts[c]].update(regions)
        return [(frozenset(u), reported) for u in ups]

    def rows(self) -> list[dict]:
        """The placement as table rows (client, rank, images): the run folder's record."""
        return [
            {"client": c, "rank": s + 1, "images": self.sizes[c]} for c, s in enumerate(self.hosts)
        ]
