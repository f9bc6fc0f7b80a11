"""fedmpi.train.clients: `ClientStates` (the personal regions of a rank's clients, in
memory up to a limit, the least recently used spilled to files) and `eval_clients` (the
clients whose personal models are scored). A tiny UNet bound by `bind_flat`, no MPI."""

from __future__ import annotations

import pytest
import torch

from fedmpi.config.schema import ModelCfg
from fedmpi.model.regions import REGIONS, bind_flat, region_tensor
from fedmpi.model.unet import build_unet
from fedmpi.train.clients import ClientStates, eval_clients

TINY = ModelCfg(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
PERSONAL = ("encoder", "bottleneck")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_unet(TINY, channels=1, image_size=8)
    bind_flat(m)
    return m


def state_bytes(model) -> int:
    return sum(region_tensor(model, r).numel() * 4 for r in PERSONAL)


def personal_state(model, seed: int) -> dict:
    """Personal regions of a made-up client (seeded random values of the right shapes)."""
    g = torch.Generator().manual_seed(seed)
    return {
        r: torch.randn(region_tensor(model, r).shape, generator=g, dtype=torch.float32)
        for r in PERSONAL
    }


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[r], b[r]) for r in a)


def states(model, tmp_path, clients_in_memory: float) -> ClientStates:
    s = ClientStates(PERSONAL, clients_in_memory * state_bytes(model), tmp_path / "spill")
    s.set_initial(model)
    return s


def test_an_unknown_client_gets_the_initial_regions(model, tmp_path):
    s = states(model, tmp_path, 10)
    initial = {r: region_tensor(model, r).detach().clone() for r in PERSONAL}
    got = s.get(123)
    assert same(got, initial)
    # a copy, not the model's memory: later training does not change the initial regions
    assert all(got[r].data_ptr() != region_tensor(model, r).data_ptr() for r in PERSONAL)
    assert s.state_dict() == {}  # a client that never trained is not stored


def test_put_get_round_trip_in_memory(model, tmp_path):
    s = states(model, tmp_path, 10)
    a, b = personal_state(model, 1), personal_state(model, 2)
    s.put(3, a)
    s.put(8, b)
    assert same(s.get(3), personal_state(model, 1)) and same(s.get(8), personal_state(model, 2))
    assert not s.spilled and not (tmp_path / "spill").exists()
    s.put(3, b)  # a later round replaces the client's state
    assert same(s.get(3), personal_state(model, 2))
    assert s.memory_bytes == 2 * state_bytes(model)


def test_beyond_the_limit_the_least_recently_used_are_spilled(model, tmp_path):
    s = states(model, tmp_path, 2.5)  # room for two clients
    for c in range(4):
        s.put(c, personal_state(model, 10 + c))
    assert s.memory_bytes <= s.limit
    assert set(s.memory) == {2, 3} and s.spilled == {0, 1}
    files = sorted(p.name for p in (tmp_path / "spill").iterdir())
    assert len(files) == 2
    for c in range(4):
        assert same(s.get(c), personal_state(model, 10 + c)), c  # identical after the trip
    # a read makes a client recent: 3 read before 2, so putting 0 back spills 3 (not 2,
    # the one put first)
    s.get(3)
    s.get(2)
    s.put(0, personal_state(model, 20))
    assert set(s.memory) == {2, 0} and s.spilled == {1, 3}
    assert same(s.get(0), personal_state(model, 20))
    assert same(s.get(3), personal_state(model, 13))


def test_zero_limit_spills_everything(model, tmp_path):
    s = states(model, tmp_path, 0)
    s.put(5, personal_state(model, 5))
    assert not s.memory and s.spilled == {5}
    assert same(s.get(5), personal_state(model, 5))


def test_state_dict_round_trip_with_spilling(model, tmp_path):
    s = states(model, tmp_path / "a", 1.5)  # room for one client
    for c in (4, 1, 7):
        s.put(c, personal_state(model, 30 + c))
    assert s.spilled  # some of them live in files
    saved = s.state_dict()
    assert sorted(saved) == [1, 4, 7]
    for c in (1, 4, 7):
        assert same(saved[c], personal_state(model, 30 + c))

    t = states(model, tmp_path / "b", 1.5)
    t.load_state_dict(saved)
    assert t.memory_bytes <= t.limit and len(t.spilled) == 2
    for c in (1, 4, 7):
        assert same(t.get(c), personal_state(model, 30 + c))
    assert sorted(t.state_dict()) == [1, 4, 7]
    assert same(t.get(99), s.get(99))  # an unknown client: still the initial regions

    # a checkpoint written to disk (torch.save) and read back loads the same
    torch.save(saved, tmp_path / "ck.pt")
    u = states(model, tmp_path / "c", 1.5)
    u.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True))
    for c in (1, 4, 7):
        assert same(u.get(c), personal_state(model, 30 + c))


def test_load_state_dict_replaces_what_was_there(model, tmp_path):
    s = states(model, tmp_path, 1.5)
    for c in (0, 1, 2):
        s.put(c, personal_state(model, c))
    s.load_state_dict({5: personal_state(model, 55)})
    assert sorted(s.state_dict()) == [5]
    assert same(s.get(0), s.initial)  # dropped: back to the initial regions


def test_load_into_writes_the_personal_regions_only(model, tmp_path):
    s = states(model, tmp_path, 0.5)  # every state goes through a file
    keep = {r: region_tensor(model, r).detach().clone() for r in REGIONS}
    try:
        s.put(2, personal_state(model, 42))
        s.load_into(2, model)
        for r in PERSONAL:
            assert torch.equal(region_tensor(model, r), personal_state(model, 42)[r])
        assert torch.equal(region_tensor(model, "decoder"), keep["decoder"])
        # the parameters see it (the flat tensor is their storage)
        enc = [p.detach().reshape(-1) for n, p in model.named_parameters() if n[:8] == "encoder."]
        assert torch.equal(
            torch.cat(enc).sort().values, region_tensor(model, "encoder").sort().values
        )
        s.load_into(77, model)  # a client that never trained: the initial regions
        for r in PERSONAL:
            assert torch.equal(region_tensor(model, r), keep[r])
        # copy_of copies: changing the model afterwards does not change the copy
        copy = s.copy_of(model)
        with torch.no_grad():
            region_tensor(model, "encoder").add_(1.0)
        assert torch.equal(copy["encoder"], keep["encoder"])
    finally:
        with torch.no_grad():
            for r in REGIONS:
                region_tensor(model, r).copy_(keep[r])


# --- eval_clients ------------------------------------------------------------------------


def test_eval_clients_none_is_everyone():
    assert eval_clients(7, None, seed=3) == list(range(7))


@pytest.mark.parametrize("n, count", [(10, 3), (100, 17), (5, 1), (6, 5)])
def test_eval_clients_is_a_sorted_deterministic_sample(n, count):
    got = eval_clients(n, count, seed=3)
    assert len(got) == count and len(set(got)) == count
    assert got == sorted(got) and all(0 <= c < n for c in got)
    assert eval_clients(n, count, seed=3) == got
    others = {tuple(eval_clients(n, count, seed=s)) for s in range(20)}
    assert len(others) > 1  # the sample depends on the seed


@pytest.mark.parametrize("count", [8, 9, 1000])
def test_eval_clients_at_least_n_is_everyone(count):
    assert eval_clients(8, count, seed=0) == list(range(8))
