"""fedmpi.fl.population: placement of N clients on the client ranks, the round's sample,
and what each rank puts on the wire for a plan over the participants (with
`fedmpi.fl.methods.make_plan(..., participants=...)`). Pure functions, no MPI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fedmpi.fl.methods import METHODS, make_plan
from fedmpi.fl.population import Population
from fedmpi.model.regions import REGIONS

SEED = 7


def slot_loads(pop: Population) -> list[int]:
    """Total images per slot, from the placement."""
    loads = [0] * pop.slots
    for c, s in enumerate(pop.hosts):
        loads[s] += pop.sizes[c]
    return loads


# --- placement ---------------------------------------------------------------------------


def test_one_client_per_slot_is_the_identity():
    sizes = [5, 500, 1, 40]  # unbalanced sizes must not reorder anything
    pop = Population.place(sizes, 4)
    assert pop.hosts == (0, 1, 2, 3)
    assert pop.one_per_slot and pop.everyone and pop.num_clients == 4
    assert [pop.clients_of(s) for s in range(4)] == [[0], [1], [2], [3]]
    assert pop.rows() == [{"client": c, "rank": c + 1, "images": n} for c, n in enumerate(sizes)]


@pytest.mark.parametrize(
    "sizes, slots",
    [
        ([100, 90, 10, 10, 5, 5], 2),
        ([1] * 7, 3),
        ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 4),
        ([1000, 1, 1, 1, 1, 1, 1, 1, 1], 3),  # one huge client: the cap still holds
        ([50] * 10, 10),
    ],
)
def test_more_clients_than_slots_are_spread_within_the_cap(sizes, slots):
    pop = Population.place(sizes, slots)
    cap = math.ceil(len(sizes) / slots)
    counts = [len(pop.clients_of(s)) for s in range(slots)]
    assert all(1 <= k <= cap for k in counts), counts
    assert sum(counts) == len(sizes)
    assert sorted(c for s in range(slots) for c in pop.clients_of(s)) == list(range(len(sizes)))
    assert Population.place(sizes, slots) == pop  # deterministic
    assert pop.rows() == [
        {"client": c, "rank": pop.hosts[c] + 1, "images": n} for c, n in enumerate(sizes)
    ]


@pytest.mark.parametrize(
    "sizes, slots",
    [
        ([100, 90, 10, 10, 5, 5], 2),
        ([30, 29, 28, 27, 26, 25, 24, 23], 3),
        ([7, 3, 9, 1, 12, 4, 4, 8, 2, 6], 4),
        ([1, 1, 1, 1, 40, 40, 40, 40], 2),  # in blocks of client ids: 4 vs 160
        ([100, 1, 100, 1, 1, 1], 2),  # round-robin by client id: 201 vs 3
    ],
)
def test_placement_balances_the_images_per_slot(sizes, slots):
    """Largest first to the least loaded slot: the slots' totals end within the largest
    client's size of each other."""
    loads = slot_loads(Population.place(sizes, slots))
    assert max(loads) - min(loads) <= max(sizes), loads


def test_placement_example_two_slots():
    """[100, 90, 10, 10, 5, 5] on 2 slots: the two big clients apart, the rest filling the
    lighter slot, at most 3 per slot."""
    pop = Population.place([100, 90, 10, 10, 5, 5], 2)
    assert pop.hosts[0] != pop.hosts[1]
    loads = slot_loads(pop)
    assert sum(loads) == 220 and max(loads) - min(loads) <= 10
    assert [len(pop.clients_of(s)) for s in range(2)] == [3, 3]


def test_ties_go_to_the_lower_slot():
    """Equal sizes, equal loads: each client goes to the lowest slot of the least load."""
    pop = Population.place([5, 5, 5, 5, 5, 5], 3)
    assert pop.hosts == (0, 1, 2, 0, 1, 2)
    pop = Population.place([1, 1, 1], 2)
    assert pop.hosts[0] == 0 and pop.hosts[1] == 1 and pop.hosts[2] == 0


def test_fewer_clients_than_slots_is_refused_with_the_fix():
    with pytest.raises(ValueError) as err:
        Population.place([10, 10], 4)
    text = str(err.value)
    assert "mpirun -n 3" in text and "--fed.clients=4" in text
    assert "\n" not in text
    with pytest.raises(ValueError):
        Population.place([10], 0)
    with pytest.raises(ValueError, match="sampling"):
        Population.place([10, 10], 2, 0.5, "bernoulli")


# --- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_full_participation_takes_everyone_without_a_draw(sampling, monkeypatch):
    import fedmpi.fl.population as population

    pop = Population.place([3] * 9, 4, 1.0, sampling)

    def no_draw(*a, **k):
        raise AssertionError("participation 1 drew a sample")

    monkeypatch.setattr(population.np.random, "default_rng", no_draw)
    for r in (1, 2, 50):
        assert pop.sample(r, key=r * 11) == list(range(9))
    assert pop.expected() == 9.0


@pytest.mark.parametrize("n, c, want", [(20, 0.3, 6), (10, 0.5, 5), (7, 0.01, 1), (9, 0.7, 6)])
def test_fixed_sampling_draws_round_cn_clients(n, c, want):
    pop = Population.place([1] * n, 3, c, "fixed")
    assert pop.fixed_count() == want and pop.expected() == float(want)
    draws = []
    for r in range(1, 41):
        s = pop.sample(r, SEED)
        assert len(s) == want and len(set(s)) == want
        assert s == sorted(s) and all(0 <= x < n for x in s)
        assert pop.sample(r, SEED) == s  # deterministic for (key, round)
        draws.append(tuple(s))
    if want < n:
        assert len(set(draws)) > 1  # rounds differ
        assert any(pop.sample(r, SEED + 1) != list(d) for r, d in enumerate(draws, 1))  # keys


def test_fixed_sampling_is_uniform_over_clients():
    """Every client is taken about C of the time (no client favoured)."""
    n, c, rounds = 10, 0.3, 2000
    pop = Population.place([1] * n, 2, c, "fixed")
    counts = [0] * n
    for r in range(rounds):
        for x in pop.sample(r, SEED):
            counts[x] += 1
    se = math.sqrt(c * (1 - c) / rounds)
    assert all(abs(k / rounds - c) < 5 * se for k in counts), counts


def test_poisson_rate_and_expected():
    n, q, rounds = 50, 0.2, 400
    pop = Population.place([2] * n, 5, q, "poisson")
    assert pop.expected() == pytest.approx(q * n)
    total, sizes = 0, set()
    for r in range(rounds):
        s = pop.sample(r, SEED)
        assert s == sorted(s) and len(set(s)) == len(s)
        assert pop.sample(r, SEED) == s
        total += len(s)
        sizes.add(len(s))
    rate = total / (n * rounds)
    se = math.sqrt(q * (1 - q) / (n * rounds))
    assert abs(rate - q) < 4 * se, rate
    assert len(sizes) > 3  # the sample's size varies (not a fixed draw)


def test_poisson_can_be_empty_and_differs_by_key():
    pop = Population.place([1] * 4, 2, 0.1, "poisson")
    samples = [pop.sample(r, SEED) for r in range(60)]
    assert [] in samples  # P(empty) = 0.9^4 per round
    assert any(samples)
    assert [pop.sample(r, SEED) for r in range(60)] == samples
    assert [pop.sample(r, SEED + 1) for r in range(60)] != samples


# --- plans over the participants and the wire --------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_participants_none_is_participants_all(method):
    """The default plan (no sampling) is bit-identical to a plan over every client."""
    for n in (1, 2, 5, 8):
        for r in (1, 2, 3, 10):
            default = make_plan(method, r, n, SEED)
            assert make_plan(method, r, n, SEED, participants=range(n)) == default
            assert make_plan(method, r, n, SEED, participants=list(range(n))[::-1]) == default


@pytest.mark.parametrize("method", METHODS)
def test_non_participants_upload_and_receive_nothing(method):
    n, participants = 9, [1, 4, 5, 8]
    for r in (1, 2, 3):
        plan = make_plan(method, r, n, SEED, participants=participants)
        for c in range(n):
            if c in participants:
                assert plan.uploads[c] and plan.downloads[c]
            else:
                assert plan.uploads[c] == frozenset() and plan.downloads[c] == frozenset()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_usplit_pairs_only_the_participants(k):
    n = 11
    participants = [1, 2, 4, 6, 7, 9][:k]
    for r in (1, 2, 3, 4):
        plan = make_plan("usplit", r, n, SEED, participants=participants)
        for region in REGIONS:
            assert set(plan.uploaders(region)) <= set(participants)
            assert plan.uploaders(region), region  # every region is reported by someone
        for c in participants:
            assert plan.downloads[c] == frozenset(REGIONS)
        if k > 1:  # each participant reports exactly one of encoder / decoder
            for c in participants:
                assert len(plan.uploads[c] & {"encoder", "decoder"}) == 1
            assert len(plan.uploaders("encoder")) + len(plan.uploaders("decoder")) == k
            assert abs(len(plan.uploaders("encoder")) - len(plan.uploaders("decoder"))) <= 1


def expected_wire(pop, plan):
    """Per slot: the union of its clients' uploads; every slot receives all reported."""
    reported = set()
    for ups in plan.uploads:
        reported |= ups
    out = []
    for s in range(pop.slots):
        mine = set()
        for c in pop.clients_of(s):
            mine |= plan.uploads[c]
        out.append((mine, reported))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_wire_is_the_union_of_the_slots_participants(method, sampling):
    pop = Population.place([5, 9, 2, 7, 7, 1, 3, 8], 3, 0.5, sampling)
    shared = {"full": set(REGIONS), "udec": {"decoder"}, "ulatdec": {"bottleneck", "decoder"}}
    for r in range(1, 9):
        participants = pop.sample(r, SEED)
        plan = make_plan(method, r, pop.num_clients, SEED, participants=participants)
        wire = pop.wire(plan)
        assert len(wire) == pop.slots
        for (up, down), (want_up, want_down) in zip(wire, expected_wire(pop, plan)):
            assert set(up) == want_up and set(down) == want_down
            assert up <= down
        # a slot none of whose clients take part uploads nothing
        for s in range(pop.slots):
            if not set(pop.clients_of(s)) & set(participants):
                assert wire[s][0] == frozenset()
        if method != "usplit":
            assert set(wire[0][1]) == (shared[method] if participants else set())


def test_wire_of_an_explicit_case():
    pop = Population.place([4, 3, 2, 1], 2)  # hosts: 0 -> 0, 1 -> 1, 2 -> 1, 3 -> 0
    assert pop.hosts == (0, 1, 1, 0)
    plan = make_plan("udec", 1, 4, SEED, participants=[1, 2])
    assert pop.wire(plan) == [
        (frozenset(), frozenset({"decoder"})),
        (frozenset({"decoder"}), frozenset({"decoder"})),
    ]


@pytest.mark.parametrize("method", METHODS)
def test_wire_is_empty_when_nobody_reports(method):
    pop = Population.place([1] * 6, 3, 0.1, "poisson")
    plan = make_plan(method, 3, 6, SEED, participants=[])
    assert pop.wire(plan) == [(frozenset(), frozenset())] * 3


# --- slot-level reporting (Aggregator.reporting, pure) -----------------------------------


def reporting(pop, strategy, plan, sizes):
    """`Aggregator.reporting` without a world: it reads only the population and strategy."""
    from fedmpi.fl.aggregate import Aggregator

    return Aggregator.reporting(SimpleNamespace(population=pop, strategy=strategy), plan, sizes)


def test_reporting_sums_the_participants_sizes_per_slot():
    from fedmpi.fl.privacy import DifferentialPrivacy
    from fedmpi.fl.strategy import PlainFedAvg

    sizes = [40, 30, 20, 10, 10, 5, 5]
    pop = Population.place(sizes, 3, 0.5, "poisson")
    participants = [0, 2, 3, 6]
    plan = make_plan("ulatdec", 2, len(sizes), SEED, participants=participants)
    want_slots = sorted({pop.hosts[c] for c in participants})
    for strategy, per_client in (
        (PlainFedAvg(), lambda c: float(sizes[c])),
        (DifferentialPrivacy(PlainFedAvg(), 1.0, 1.0), lambda c: 1.0),  # uniform weights
    ):
        got = reporting(pop, strategy, plan, sizes)
        assert set(got) == {"bottleneck", "decoder"}  # the encoder stays personal
        for slots, slot_sizes in got.values():
            assert slots == want_slots
            for s, n in zip(slots, slot_sizes):
                assert n == sum(per_client(c) for c in participants if pop.hosts[c] == s)
    left_out = [n if c != 3 else 0 for c, n in enumerate(sizes)]  # a non-finite client
    slots, slot_sizes = reporting(pop, PlainFedAvg(), plan, left_out)["decoder"]
    assert sum(slot_sizes) == sum(sizes[c] for c in participants) - sizes[3]
    assert (
        reporting(pop, PlainFedAvg(), make_plan("full", 2, 7, SEED, participants=[]), sizes) == {}
    )
