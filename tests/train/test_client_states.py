"""fedmpi.train.clients: `ClientStates` (the personal regions of a rank's clients: one
file per client and round, an index, a bounded cache, commit / discard of a round,
collection of unreferenced files) and `eval_clients` (the clients whose personal models
are scored). A tiny UNet bound by `bind_flat`, no MPI."""

from __future__ import annotations

import pytest
import torch

from fedmpi.config.schema import ModelCfg
from fedmpi.errors import CheckpointError
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
    s = ClientStates(PERSONAL, clients_in_memory * state_bytes(model), tmp_path / "state")
    s.set_initial(model)
    return s


@pytest.fixture
def restore_model(model):
    keep = {r: region_tensor(model, r).detach().clone() for r in REGIONS}
    yield
    with torch.no_grad():
        for r in REGIONS:
            region_tensor(model, r).copy_(keep[r])


def train_as(s: ClientStates, model, client: int, round_index: int, seed: int) -> dict:
    """Give the model a made-up client's personal regions and stage them for the round."""
    state = personal_state(model, seed)
    with torch.no_grad():
        for r in PERSONAL:
            region_tensor(model, r).copy_(state[r])
    s.stage(client, round_index, model)
    return state


def test_an_unknown_client_gets_the_initial_regions(model, tmp_path):
    s = states(model, tmp_path, 10)
    initial = {r: region_tensor(model, r).detach().clone() for r in PERSONAL}
    got = s.get(123)
    assert same(got, initial) and same(s.get(-1), initial)
    # a copy, not the model's memory: later training does not change the initial regions
    assert all(got[r].data_ptr() != region_tensor(model, r).data_ptr() for r in PERSONAL)
    assert s.state_dict() == {}  # a client that never trained is not stored


def test_a_round_counts_from_its_commit(model, tmp_path, restore_model):
    s = states(model, tmp_path, 10)
    a = train_as(s, model, 3, 1, seed=1)
    assert same(s.get(3), s.initial)  # staged, not yet committed
    s.commit()
    assert same(s.get(3), a) and list(s.state_dict()) == [3]
    b = train_as(s, model, 3, 2, seed=2)
    s.discard()  # round 2 abandoned: the client keeps round 1's regions
    assert same(s.get(3), a) and s.state_dict()[3][0] == 1
    train_as(s, model, 3, 2, seed=2)
    s.commit()
    assert same(s.get(3), b) and s.state_dict()[3][0] == 2
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == ["client_000003_r000001.pt", "client_000003_r000002.pt"]


def test_the_cache_is_bounded_and_states_come_back_from_their_files(model, tmp_path, restore_model):
    s = states(model, tmp_path, 2.5)  # room for two clients' states
    made = {c: train_as(s, model, c, 1, seed=10 + c) for c in range(5)}
    s.commit()
    assert s.cache_bytes <= s.limit and len(s.cache) == 2
    assert {c for c, _ in s.cache} == {3, 4}  # the most recent
    for c in range(5):  # evicted ones are read back from their files, identical
        assert same(s.get(c), made[c])
    assert s.cache_bytes <= s.limit
    s.get(1)
    s.get(0)  # 0 is now the most recent, then 1
    assert [c for c, _ in s.cache] == [1, 0]


def test_zero_limit_keeps_nothing_in_memory(model, tmp_path, restore_model):
    s = states(model, tmp_path, 0)
    a = train_as(s, model, 5, 1, seed=5)
    s.commit()
    assert not s.cache and s.cache_bytes == 0
    assert same(s.get(5), a)


def test_index_round_trip_and_a_corrupt_file_is_refused(model, tmp_path, restore_model):
    s = states(model, tmp_path, 0.5)
    made = {c: train_as(s, model, c, 4, seed=30 + c) for c in (1, 7)}
    s.commit()
    saved = torch.load(_saved(s.state_dict(), tmp_path), weights_only=True)  # as a checkpoint
    t = states(model, tmp_path, 0.5)
    t.load_state_dict(saved)
    assert t.state_dict() == s.state_dict()
    assert same(t.get(7), made[7]) and same(t.get(1), made[1])
    path = t.path(1, 4)
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    t.load_state_dict(saved)  # empty the cache
    with pytest.raises(CheckpointError, match="client 1's personal regions after round 4"):
        t.get(1)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        t.get(1)


def _saved(index: dict, tmp_path):
    path = tmp_path / "index.pt"
    torch.save(index, path)
    return path


def test_collect_keeps_what_an_index_refers_to(model, tmp_path, restore_model):
    s = states(model, tmp_path, 10)
    for r in (1, 2, 3):
        train_as(s, model, 0, r, seed=r)
        s.commit()
    checkpoint_2 = {0: [2, "x"]}  # a checkpoint still on disk refers to round 2's state
    train_as(s, model, 0, 4, seed=4)  # pending: kept too
    assert s.collect([checkpoint_2]) == 1  # round 1's file only
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == [f"client_000000_r00000{r}.pt" for r in (2, 3, 4)]
    s.discard()
    assert s.collect([]) == 2  # round 2 (no checkpoint), round 4 (abandoned)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["client_000000_r000003.pt"]


def test_load_into_writes_the_personal_regions_only(model, tmp_path, restore_model):
    s = states(model, tmp_path, 0.5)
    keep = {r: region_tensor(model, r).detach().clone() for r in REGIONS}
    a = train_as(s, model, 2, 1, seed=42)
    s.commit()
    s.load_into(-1, model)
    for r in PERSONAL:
        assert torch.equal(region_tensor(model, r), keep[r])
    s.load_into(2, model)
    for r in PERSONAL:
        assert torch.equal(region_tensor(model, r), a[r])
    assert torch.equal(region_tensor(model, "decoder"), keep["decoder"])
    # the parameters see it (the flat tensor is their storage)
    enc = [p.detach().reshape(-1) for n, p in model.named_parameters() if n[:8] == "encoder."]
    assert torch.equal(torch.cat(enc).sort().values, region_tensor(model, "encoder").sort().values)
    copy = s.copy_of(model)  # a copy: changing the model afterwards does not change it
    with torch.no_grad():
        region_tensor(model, "encoder").add_(1.0)
    assert torch.equal(copy["encoder"], a["encoder"])


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
