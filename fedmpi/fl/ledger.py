"""The byte ledger: what every rank sent and received, and the analytical table.

Counting rule (the payload, independent of how the MPI library routes it):
- round 0: the federator sends the full initial model to every client;
- round r = 1..R: each client uploads the regions its plan reports, as one float32
  buffer per region with its weight w_k appended (4 * (P + 1) bytes), and receives the
  regions its plan gives back (4 * P bytes). With `fed.secure` an upload is a uint64
  fixed-point buffer with n_k appended, 8 * (P + 1) bytes; with `fed.compress` the
  encoded update (`fedmpi.fl.compress.payload_bytes`: bf16 2 P, int8 P + 4 per 1,024
  values for the block scales, top-k 8 k). `UploadFormat` is that rule. Downloads stay
  float32 (an int8 reporter also receives the agreed scales: 4 bytes per 1,024 values).

The paper counts the initial model plus R uploads and R - 1 downloads: its last
download would start a round R + 1 that never runs. fedmpi does perform that final
download (personal-model clients need the last averaged regions to be evaluated), so
tables show both "moved" (what a run moves) and "paper" (the paper's rule).
`python -m fedmpi.comm --config C --clients K --rounds R` prints the table without
training; a real run writes the same rows from its ledger to comm.csv.

comm.csv has one row per transfer: round, client (1..K, its MPI rank: the one
numbering of clients in every file), src and dst (the ranks at both ends, 0 being the
federator), region, direction (seen from the client: up = client -> federator), params
and bytes. The federator's own record of the same transfers stays in memory (its byte
count per round) and is not written twice.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import fedmpi.store.tables as tables
from fedmpi.fl.methods import make_plan
from fedmpi.fl.population import Population
from fedmpi.model.regions import REGIONS

FLOAT_BYTES = 4
FIELDS = ("round", "client", "src", "dst", "region", "direction", "params", "bytes")
FEDERATOR = 0  # the federator's rank, named in src / dst


SECURE_VALUE_BYTES = 8  # fed.secure: uint64 fixed point per uploaded value


@dataclass(frozen=True)
class UploadFormat:
    """How a client's upload of one region is encoded, so what it costs on the wire:
    plain float32 FedAvg, secure fixed point, or a compressed update (fed.compress)."""

    compress: str = "none"  # none | bf16 | int8 | topk
    secure: bool = False
    topk_fraction: float = 0.01

    @classmethod
    def of(cls, fed_cfg) -> UploadFormat:
        return cls(fed_cfg.compress, bool(fed_cfg.secure), float(fed_cfg.topk_fraction))

    @classmethod
    def coerce(cls, fmt) -> UploadFormat:
        """A format, or the bytes per uploaded value of an uncompressed one (4 or 8)."""
        if isinstance(fmt, UploadFormat):
            return fmt
        return cls(secure=int(fmt) == SECURE_VALUE_BYTES)

    @property
    def value_bytes(self) -> int:
        """Bytes per uploaded value of an uncompressed upload (0: compressed)."""
        if self.compress != "none":
            return 0
        return SECURE_VALUE_BYTES if self.secure else FLOAT_BYTES

    def up(self, params: int) -> int:
        """Bytes a client hands to MPI to upload a region of `params` values."""
        if self.compress == "none":
            return self.value_bytes * (params + 1)
        from fedmpi.fl.compress import payload_bytes

        return payload_bytes(self.compress, params, self.topk_fraction)

    def down(self, params: int, reported: bool) -> int:
        """Bytes a client receives for a region (`reported`: it also uploaded it)."""
        from fedmpi.fl.compress import scale_bytes

        return download_bytes(params) + (scale_bytes(self.compress, params) if reported else 0)


def upload_bytes(params: int, fmt=FLOAT_BYTES) -> int:
    """Bytes of one upload of `params` values (`fmt`: an UploadFormat or value bytes)."""
    return UploadFormat.coerce(fmt).up(params)


def download_bytes(params: int) -> int:
    return FLOAT_BYTES * params


def transfer(
    round_index: int, client: int, region: str, direction: str, params: int, nbytes: int
) -> dict:
    """One comm.csv row: `client` 1..K (-1: the federator's own record, other end unknown)."""
    src, dst = (client, FEDERATOR) if direction == "up" else (FEDERATOR, client)
    return dict(
        round=round_index,
        client=client,
        src=src,
        dst=dst,
        region=region,
        direction=direction,
        params=params,
        bytes=nbytes,
    )


@dataclass
class Ledger:
    """Rows recorded by one rank: (round, rank, client, region, direction, params, bytes).

    `direction` is seen from the client side: "up" is client -> federator, "down" is
    federator -> client. Client ranks record their own transfers; the federator records
    the aggregate it received and sent with client = -1. Clients are numbered 1..K (their
    ranks); `record` takes the 0-based `World.client` index.
    """

    rank: int
    rows: list = field(default_factory=list)

    def record(
        self,
        round_index: int,
        client: int,
        region: str,
        direction: str,
        params: int,
        nbytes: int | None = None,
    ) -> None:
        """`nbytes`: the bytes handed to the collective (default: the plain float32 size)."""
        if nbytes is None:
            nbytes = upload_bytes(params) if direction == "up" else download_bytes(params)
        number = client + 1 if client >= 0 else -1
        self.rows.append((round_index, self.rank, number, region, direction, params, nbytes))

    def round_bytes(self, round_index: int) -> int:
        return sum(r[6] for r in self.rows if r[0] == round_index)

    def pop_round(self, round_index: int) -> list[dict]:
        """This round's rows as transfer dicts (see `transfer`), removed from the ledger."""
        out = [transfer(r[0], *r[2:]) for r in self.rows if r[0] == round_index]
        self.rows = [r for r in self.rows if r[0] != round_index]
        return out

    def dicts(self) -> list[dict]:
        return [transfer(r[0], *r[2:]) for r in self.rows]


def deployment_bytes(plan, sizes: dict[str, int], upload_format=FLOAT_BYTES) -> dict:
    """What the round's participating clients would send and receive in a deployment
    where every client is its own process (the paper's per-client counts), whatever
    ranks host them: metrics.jsonl's `client_up_bytes` / `client_down_bytes` per round,
    beside `bytes`, what went over the wire between the ranks."""
    fmt = UploadFormat.coerce(upload_format)
    up = down = 0
    for ups, downs in zip(plan.uploads, plan.downloads):
        up += sum(fmt.up(sizes[r]) for r in ups)
        down += sum(fmt.down(sizes[r], r in ups) for r in downs)
    return {"client_up_bytes": up, "client_down_bytes": down}


def analytical_rows(
    method: str,
    num_clients: int,
    rounds: int,
    sizes: dict[str, int],
    seed: int,
    upload_format=FLOAT_BYTES,
    population=None,
    key: int | None = None,
    released=(),
) -> list[dict]:
    """The comm.csv rows (one per transfer) a run with these settings must produce.
    `population` (`fedmpi.fl.population.Population`, default: one client per rank, all
    in every round) and its sampling `key` (default: the seed): which clients take part
    in each round and which rank carries their uploads; `released`: regions broadcast
    every round, reported or not (DP with sampling). `upload_format`: an UploadFormat
    (or 4 / 8 bytes per value, plain / secure)."""
    fmt = UploadFormat.coerce(upload_format)
    if population is None:
        population = Population.place([1] * num_clients, num_clients)
    key = seed if key is None else key
    rows = []
    for k in range(population.slots):
        for region in REGIONS:
            rows.append(
                transfer(0, k + 1, region, "down", sizes[region], download_bytes(sizes[region]))
            )
    for r in range(1, rounds + 1):
        sampled = population.sample(r, key)
        plan = make_plan(method, r, population.num_clients, seed, sampled)
        for k, (ups, downs) in enumerate(population.wire(plan, released)):
            for region in REGIONS:
                if region in ups:
                    nbytes = fmt.up(sizes[region])
                    rows.append(transfer(r, k + 1, region, "up", sizes[region], nbytes))
            for region in REGIONS:
                if region in downs:
                    nbytes = fmt.down(sizes[region], region in ups)
                    rows.append(transfer(r, k + 1, region, "down", sizes[region], nbytes))
    return rows


def client_rows(rows: list[dict]) -> list[dict]:
    """The rows of transfers to and from clients (not the federator's mirror records)."""
    return [r for r in rows if int(r["client"]) > 0]


def summarize(rows: list[dict], rounds: int) -> dict:
    """Totals (params and bytes) moved and by the paper's rule, per client and per round."""
    rows = client_rows(rows)
    moved = {"params": 0, "bytes": 0}
    paper = {"params": 0, "bytes": 0}
    per_client: dict = defaultdict(lambda: {"up_params": 0, "down_params": 0, "bytes": 0})
    per_round: dict = defaultdict(lambda: {"up_params": 0, "down_params": 0, "bytes": 0})
    for r in rows:
        rnd, params, nbytes = int(r["round"]), int(r["params"]), int(r["bytes"])
        moved["params"] += params
        moved["bytes"] += nbytes
        if not (rnd == rounds and r["direction"] == "down"):
            paper["params"] += params
            paper["bytes"] += nbytes
        key = "up_params" if r["direction"] == "up" else "down_params"
        for table, k in ((per_client, int(r["client"])), (per_round, rnd)):
            table[k][key] += params
            table[k]["bytes"] += nbytes
    return {
        "moved": moved,
        "paper": paper,
        "per_client": dict(sorted(per_client.items())),
        "per_round": dict(sorted(per_round.items())),
    }


def comparison(
    method: str,
    num_clients: int,
    rounds: int,
    sizes: dict,
    seed: int,
    upload_format=FLOAT_BYTES,
    population=None,
    key: int | None = None,
    released=(),
) -> dict:
    """This method's totals against FULL's for the same clients and rounds (FULL plain:
    the reduction is in parameters, so the upload width does not change it)."""
    args = (population, key, released)
    ours = summarize(
        analytical_rows(method, num_clients, rounds, sizes, seed, upload_format, *args),
        rounds,
    )
    full = summarize(analytical_rows("full", num_clients, rounds, sizes, seed, 4, *args), rounds)
    out = {"method": method, "clients": num_clients, "rounds": rounds}
    for rule in ("moved", "paper"):
        out[rule] = dict(ours[rule])
        out[rule]["full_params"] = full[rule]["params"]
        out[rule]["reduction_vs_full"] = 1 - ours[rule]["params"] / full[rule]["params"]
    return out


def write_ledger(rows: list[dict], path: Path) -> None:
    """Write the client rows of `rows` as a whole comm.csv (atomically)."""
    tables.write_csv(path, client_rows(rows), list(FIELDS))


def typed_rows(rows: list[dict]) -> list[dict]:
    """comm.csv rows as read (strings) with integer columns as ints. Rows of the older
    layout (rank, 0-based client, federator rows) become rows of the current one, so runs
    written before still resume, plot and report."""
    rows = [
        {k: (v if k in ("region", "direction") else int(v)) for k, v in row.items()} for row in rows
    ]
    if rows and "src" not in rows[0]:
        rows = [
            transfer(r["round"], r["rank"], r["region"], r["direction"], r["params"], r["bytes"])
            for r in rows
            if r["client"] >= 0
        ]
    return rows


def read_ledger(path: Path) -> list[dict]:
    """comm.csv rows with integer columns (a partial last row, from a crash, is dropped)."""
    return typed_rows(tables.read_csv(path))


def append_rows(rows: list[dict], path: Path) -> None:
    """Append the client rows of `rows` (one per transfer) to comm.csv."""
    tables.append_csv(path, client_rows(rows), FIELDS)


def _key(row: dict) -> tuple:
    return tuple(int(row[k]) if k not in ("region", "direction") else row[k] for k in FIELDS)


def run_summary(
    rows: list[dict],
    method: str,
    num_clients: int,
    rounds: int,
    sizes: dict,
    seed: int,
    upload_format=FLOAT_BYTES,
    extra: dict | None = None,
    population=None,
    key: int | None = None,
    released=(),
) -> dict:
    """A run's comm.csv `rows` (typed) summarized and checked against the analytical table
    (comm_summary.json). `upload_format`: the run's UploadFormat; `extra`: more keys;
    `population`, `key`, `released`: the clients, their sampling and the regions released
    every round (`analytical_rows`)."""
    fmt = UploadFormat.coerce(upload_format)
    args = (fmt, population, key, released)
    expected = analytical_rows(method, num_clients, rounds, sizes, seed, *args)
    measured = summarize(rows, rounds)
    out = comparison(method, num_clients, rounds, sizes, seed, *args)
    out["upload_value_bytes"] = fmt.value_bytes
    out["compress"] = fmt.compress
    if fmt.compress != "none":  # what the same run would move with float32 uploads
        plain = analytical_rows(method, num_clients, rounds, sizes, seed, FLOAT_BYTES, *args[1:])
        out["float32_bytes"] = summarize(plain, rounds)["moved"]["bytes"]
    out.update(extra or {})
    out["measured"] = {
        "moved": measured["moved"],
        "paper": measured["paper"],
        "per_client": measured["per_client"],
        "per_round": measured["per_round"],
    }
    out["matches_analytical"] = sorted(map(_key, client_rows(rows))) == sorted(map(_key, expected))
    return out
