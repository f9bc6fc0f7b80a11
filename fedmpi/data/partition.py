"""Deterministic client splits of a labelled dataset, and their per-client summary.

Owns `split_indices` (IID, Dirichlet label skew, Dirichlet quantity skew, class
shards, following NIID-Bench) and the report helpers (`client_table`,
`split_table`, `save_report_json`, `plot_report`). Pure numpy: a split depends only
on (labels, num_clients, kind, parameters, seed, rng), never on MPI rank or world
size, so every rank that computes it gets the same answer.

Two random sources (`split.rng`):
- `default`: fedmpi's own draws from `np.random.default_rng(seed)`; parts sorted.
- `numpy_legacy`: the paper's reference code (`get_partitioned_dataset`, a copy of
  NIID-Bench's `partition_data`) draw for draw: it calls `np.random.seed(seed)` once
  and then the global `permutation` / `shuffle` / `dirichlet` in its own order. Those
  global functions are methods of one hidden `RandomState`, so a private
  `RandomState(seed)` replays the same stream without touching numpy's global state.
  Parts keep the reference's order (training order follows it). iid, label_skew and
  quantity_skew only: the reference has no shards split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmpi.store.tables import format_table

KINDS = ("iid", "label_skew", "quantity_skew", "shards")
RNGS = ("default", "numpy_legacy")
LEGACY_KINDS = ("iid", "label_skew", "quantity_skew")
MAX_TRIES = 1000


def split_indices(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    beta: float = 0.5,
    min_size: int = 10,
    classes_per_client: int = 2,
    seed: int = 2023,
    rng: str = "default",
) -> list[np.ndarray]:
    """Split range(len(labels)) into num_clients disjoint int64 index arrays.

    rng="default": sorted arrays. rng="numpy_legacy": the reference's arrays, in its order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if kind not in KINDS:
        raise ValueError(f"unknown split kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(
            f"cannot split {n} samples over {num_clients} clients (more clients than samples)"
        )
    if rng not in RNGS:
        raise ValueError(f"unknown split rng {rng!r}; choose one of {', '.join(RNGS)}")
    if rng == "numpy_legacy":
        if kind not in LEGACY_KINDS:
            raise ValueError(
                f"split.rng=numpy_legacy replays the reference code, which has "
                f"no {kind!r} split; use {', '.join(LEGACY_KINDS)} or "
                f"split.rng=default"
            )
        # No K = 1 shortcut here: the reference permutes even a single client's data.
        parts = _legacy(labels, num_clients, kind, beta, min_size, np.random.RandomState(seed))
        return [np.asarray(p, dtype=np.int64) for p in parts]
    if num_clients == 1:
        return [np.arange(n, dtype=np.int64)]
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "label_skew":
        parts = _label_skew(labels, num_clients, beta, min_size, rng)
    elif kind == "quantity_skew":
        parts = _quantity_skew(n, num_clients, beta, min_size, rng)
    else:
        parts = _shards(labels, num_clients, classes_per_client, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check_min_size(n: int, num_clients: int, min_size: int) -> None:
    if num_clients * min_size > n:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least "
            f"min_size={min_size} samples from only {n}"
        )


def _give_up(kind: str, num_clients: int, beta: float, min_size: int):
    return ValueError(
        f"{kind}: no Dirichlet(beta={beta}) draw in {MAX_TRIES} tries gave all "
        f"{num_clients} clients at least min_size={min_size} samples; "
        f"raise split.beta, lower split.min_size or use fewer clients"
    )


def _label_skew(labels, num_clients, beta, min_size, rng):
    """NIID-Bench 'noniid-labeldir': per class, Dirichlet(beta) shares over clients.

    As in NIID-Bench, a client that already holds its fair share (n / K) gets no more
    classes in this draw; this keeps one client from swallowing the whole dataset.
    """
    n = len(labels)
    _check_min_size(n, num_clients, min_size)
    classes = np.unique(labels)
    for _ in range(MAX_TRIES):
        buckets = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            hungry = sizes < n / num_clients
            p = rng.dirichlet(np.full(num_clients, beta)) * hungry
            # Tiny beta can underflow every eligible share to zero; share evenly then.
            p = p / p.sum() if p.sum() > 0 else hungry / hungry.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                buckets[j].append(piece)
                sizes[j] += len(piece)
        if sizes.min() >= min_size:
            return [np.concatenate(b) for b in buckets]
    raise _give_up("label_skew", num_clients, beta, min_size)


def _quantity_skew(n, num_clients, beta, min_size, rng):
    """NIID-Bench 'iid-diff-quantity': client sizes ~ Dirichlet(beta), labels IID."""
    _check_min_size(n, num_clients, min_size)
    idx = rng.permutation(n)
    for _ in range(MAX_TRIES):
        p = rng.dirichlet(np.full(num_clients, beta))
        cuts = (np.cumsum(p) * n).astype(int)[:-1]
        parts = np.split(idx, cuts)
        if min(len(q) for q in parts) >= min_size:
            return parts
    raise _give_up("quantity_skew", num_clients, beta, min_size)


def _legacy(labels, k, kind, beta, min_size, rs: np.random.RandomState):
    """The reference's `get_partitioned_dataset`, same calls on `rs` in the same order.

    Kept literal on purpose (Python lists, the float min-share test, the N / K cap from
    the full dataset size): any reordering or vectorising would change the draws.
    MAX_TRIES only replaces the reference's endless loop with an error.
    """
    n = len(labels)
    if kind == "iid":
        return np.array_split(rs.permutation(n), k)
    _check_min_size(n, k, min_size)
    if kind == "quantity_skew":
        idxs = rs.permutation(n)
        for _ in range(MAX_TRIES):
            p = rs.dirichlet(np.repeat(beta, k))
            p = p / p.sum()
            # The reference tests the float shares, not the cut sizes: a share of 13.5
            # samples passes with min_size 10 and becomes a client of 13.
            if np.min(p * n) >= min_size:
                return np.split(idxs, (np.cumsum(p) * n).astype(int)[:-1])
        raise _give_up("quantity_skew", k, beta, min_size)
    # label_skew: classes 0..max label, as the reference loops over range(num_classes)
    for _ in range(MAX_TRIES):
        batch = [[] for _ in range(k)]
        for c in range(int(labels.max()) + 1):
            idx_c = np.where(labels == c)[0]
            rs.shuffle(idx_c)
            p = rs.dirichlet(np.repeat(beta, k))
            p = np.array([q * (len(b) < n / k) for q, b in zip(p, batch)])
            if p.sum() == 0:  # the reference would divide by zero and cut at NaN
                raise ValueError(
                    f"label_skew with split.rng=numpy_legacy: every eligible "
                    f"Dirichlet(beta={beta}) share underflowed to 0, where the "
                    f"reference code is undefined; raise split.beta or use "
                    f"split.rng=default"
                )
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_c)).astype(int)[:-1]
            batch = [b + piece.tolist() for b, piece in zip(batch, np.split(idx_c, cuts))]
        if min(len(b) for b in batch) >= min_size:
            for b in batch:
                rs.shuffle(b)
            return batch
    raise _give_up("label_skew", k, beta, min_size)


def _shards(labels, num_clients, classes_per_client, rng):
    """Pathological non-IID (McMahan et al.): every client holds exactly c classes.

    The K*c shards are cut inside classes rather than from the label-sorted array, so
    a shard never straddles two classes and a client never gets two shards of one
    class: each client has exactly c distinct classes, and every sample is assigned.
    With K*c equal to the number of classes this is the classic sort-and-cut scheme.
    """
    classes, counts = np.unique(labels, return_counts=True)
    c, k = classes_per_client, num_clients
    if not 1 <= c <= len(classes):
        raise ValueError(
            f"shards: classes_per_client={c} must be between 1 and the "
            f"number of classes present ({len(classes)})"
        )
    if k * c < len(classes):
        raise ValueError(
            f"shards: {k} clients x {c} classes each cannot cover all "
            f"{len(classes)} classes; raise classes_per_client or clients"
        )
    # Slot i of the cyclic sequence perm[0], perm[1], ... belongs to client i // c;
    # c consecutive slots are c distinct classes, and each class gets ~K*c/C slots.
    perm = rng.permutation(len(classes))
    slot_class = perm[np.arange(k * c) % len(classes)]
    owners = rng.permutation(k)  # which client takes which block of c slots
    parts = [[] for _ in range(k)]
    for ci, cls in enumerate(classes):
        slots = np.flatnonzero(slot_class == ci)
        if counts[ci] < len(slots):
            raise ValueError(
                f"shards: class {cls} has {counts[ci]} samples, fewer than "
                f"the {len(slots)} clients that should hold it"
            )
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for slot, piece in zip(slots, np.array_split(idx, len(slots))):
            parts[owners[slot // c]].append(piece)
    return [np.concatenate(p) for p in parts]


# ---------------------------------------------------------------- reports


def client_table(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[dict]:
    """One row per client (numbered 1..K, as the client ranks): size, share of all
    samples, class histogram."""
    labels = np.asarray(labels)
    total = sum(len(p) for p in parts) or 1
    return [
        {
            "client": i + 1,
            "size": int(len(p)),
            "share": len(p) / total,
            "histogram": np.bincount(labels[p], minlength=num_classes).astype(int).tolist(),
        }
        for i, p in enumerate(parts)
    ]


def split_table(rows: list[dict]) -> str:
    """Fixed-width text table: client, size, share, then the count of every class."""
    if not rows:
        return "(no clients)"
    num_classes = len(rows[0]["histogram"])
    total_hist = np.sum([r["histogram"] for r in rows], axis=0).tolist()
    body = [[r["client"], r["size"], f"{100 * r['share']:.1f}%", *r["histogram"]] for r in rows]
    total = ["total", sum(r["size"] for r in rows), "100.0%", *total_hist]
    head = ["client", "size", "share"] + [f"c{j}" for j in range(num_classes)]
    return format_table(head, [*body, None, total], align="r" * len(head))


def save_report_json(rows: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"clients": rows}, indent=1) + "\n")


def plot_report(rows: list[dict], path: str | Path) -> None:
    """Stacked bar chart: one bar per client, one colour per class."""
    import matplotlib

    matplotlib.use("Agg")  # headless nodes have no display
    import matplotlib.pyplot as plt

    hist = np.array([r["histogram"] for r in rows])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.5))
    cmap = plt.get_cmap("tab10" if hist.shape[1] <= 10 else "tab20")
    bottom = np.zeros(len(rows))
    for j in range(hist.shape[1]):
        ax.bar(x, hist[:, j], bottom=bottom, color=cmap(j % cmap.N), label=str(j))
        bottom += hist[:, j]
    ax.set_xticks(x, [str(r["client"]) for r in rows])
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
