"""Per-round client state without deep copies: Adam reset in place, RoundStart rollback,
and the centralized baseline's per-epoch Adam reset (the reference's)."""

from __future__ import annotations

import numpy as np
import torch

from fedmpi.config import load_config
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.regions import bind_flat
from fedmpi.model.unet import UNet
from fedmpi.train.state import RoundStart
from fedmpi.train.trainer import LocalTrainer


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    bind_flat(model)
    images = np.random.default_rng(seed).integers(0, 255, (32, 1, 28, 28), dtype=np.uint8)
    cfg = load_config("tests/configs/tiny.yaml")
    return LocalTrainer(
        model, Diffusion.from_config(cfg.diffusion), images, 8, 1e-3, torch.device("cpu")
    )


def _weights(t):
    return torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])


def test_reset_in_place_equals_a_new_optimizer():
    a, b = _trainer(), _trainer()
    for t in (a, b):
        t.run(seed=1, steps=3)
    opt_before = a.optimizer
    a.reset_optimizer()
    b.new_optimizer()
    assert a.optimizer is opt_before  # no new object, no new state tensors
    for t in (a, b):
        t.run(seed=2, steps=3)
    assert torch.equal(_weights(a), _weights(b))


def test_round_start_rolls_back_weights_and_adam_state():
    a, ref = _trainer(), _trainer()
    for t in (a, ref):
        t.run(seed=1, steps=2)
    start = RoundStart(a.model._fedmpi_flat, keep_optimizer=True)
    start.save(a)
    a.run(seed=5, steps=4)  # the round to abandon
    assert not torch.equal(_weights(a), _weights(ref))
    start.restore(a)
    assert torch.equal(_weights(a), _weights(ref))
    for t in (a, ref):  # continuing gives the same numbers: Adam state restored too
        t.run(seed=9, steps=3)
    assert torch.equal(_weights(a), _weights(ref))


def test_round_start_before_the_first_step_forgets_later_state():
    a, ref = _trainer(), _trainer()
    a.new_optimizer()
    ref.new_optimizer()
    start = RoundStart(a.model._fedmpi_flat, keep_optimizer=True)
    start.save(a)
    a.run(seed=5, steps=2)
    start.restore(a)
    assert len(a.optimizer.state) == 0
    for t in (a, ref):
        t.run(seed=9, steps=2)
    assert torch.equal(_weights(a), _weights(ref))


def test_client_checkpoint_entries_are_its_personal_regions():
    """own_entries builds a client's file from its personal submodules alone: the same
    entries as filtering the whole state dict, the same tensors (no copies)."""
    from fedmpi.fl.methods import METHODS, personal_regions
    from fedmpi.train.state import own_entries

    model = _trainer().model
    full = model.state_dict()
    for method in METHODS:
        mine = own_entries(model, method)
        want = {k for k in full if k.split(".", 1)[0] in personal_regions(method)}
        assert set(mine) == want, method
        assert all(mine[k].data_ptr() == full[k].data_ptr() for k in mine)
    assert own_entries(model, "full") == {} and own_entries(model, "udec")


def test_region_send_buffer_is_the_weights_plus_one_value():
    """The in-place upload: packing the send buffer scales the model's own weights."""
    from fedmpi.fl.methods import pack_upload
    from fedmpi.model.regions import REGIONS, region_send_buffer, region_tensor

    model = _trainer().model
    for region in REGIONS:
        flat, send = region_tensor(model, region), region_send_buffer(model, region)
        assert send.numel() == flat.numel() + 1 and send.data_ptr() == flat.data_ptr()
        before = flat.clone()
        with torch.no_grad():
            pack_upload(flat, 0.25, send)
        assert torch.equal(flat, before * 0.25) and float(send[-1]) == 0.25
    first = next(model.encoder.parameters())
    assert first.data_ptr() == region_tensor(model, "encoder").data_ptr()
