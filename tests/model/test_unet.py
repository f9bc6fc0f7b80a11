"""The region-named UNet: region membership, the paper's parameter counts, shapes, and
the flat region buffers that aggregation moves (fedmpi.model.unet, fedmpi.model.regions)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedmpi.model.regions as regions
from fedmpi.model.regions import REGIONS, all_finite, finite, region_params, region_sizes
from fedmpi.model.unet import UNet

ROOT = Path(__file__).resolve().parents[2]

# From the paper (FedDiffuse, Fashion-MNIST 28x28x1 model), not from this code.
PAPER_COUNTS = {"encoder": 1_280_642, "bottleneck": 999_376, "decoder": 716_297}
PAPER_TOTAL = 2_996_315

TINY = dict(dim=8, dim_mults=(1, 2), attn_dim_head=8, attn_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: with 2 intra-op threads on a loaded 2-core box every op waits
    ~10 ms on the other thread; one thread is ~100x faster here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CONFIGS = [
    dict(TINY, channels=1),
    dict(dim=8, dim_mults=(1, 2, 4), attn_dim_head=8, channels=3),
    dict(
        dim=12,
        init_dim=6,
        dim_mults=(1, 2, 2, 3),
        attn_heads=1,
        attn_dim_head=4,
        convnext_mult=1,
        channels=2,
    ),
]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet(**{**TINY, "channels": 1, **kw})


@pytest.mark.parametrize("kw", CONFIGS)
def test_every_parameter_in_exactly_one_region(kw):
    model = UNet(**kw)
    named = list(model.named_parameters())
    assert named
    for name, _ in named:
        assert name.split(".")[0] in REGIONS, name
        assert regions.region_of(name) == name.split(".")[0]
    # region_params partitions the parameters: disjoint, and together all of them
    seen = {}
    for r in REGIONS:
        ps = regions.region_params(model, r)
        assert ps, f"region {r} is empty"
        for p in ps:
            assert id(p) not in seen, f"parameter in both {seen[id(p)]} and {r}"
            seen[id(p)] = r
    assert set(seen) == {id(p) for _, p in named}
    sizes = regions.region_sizes(model)
    assert list(sizes) == list(REGIONS)
    assert sum(sizes.values()) == sum(p.numel() for p in model.parameters())
    for r in REGIONS:
        assert sizes[r] == sum(p.numel() for n, p in named if n.startswith(r + "."))
    # nothing but parameters in the state: no buffer escapes communication
    assert set(model.state_dict()) == {n for n, _ in named}


def test_region_of_rejects_foreign_names():
    with pytest.raises(KeyError):
        regions.region_of("head.weight")
    with pytest.raises(KeyError):
        regions.region_params(tiny(), "middle")


def test_paper_model_counts():
    model = UNet()  # defaults: dim 28, mults (1, 2, 4), 1 channel
    sizes = regions.region_sizes(model)
    assert sizes == PAPER_COUNTS
    assert sum(p.numel() for p in model.parameters()) == PAPER_TOTAL
    assert sum(PAPER_COUNTS.values()) == PAPER_TOTAL


@pytest.mark.parametrize(
    "channels,size,kw",
    [
        (1, 28, dict(dim=8, dim_mults=(1, 2), attn_dim_head=8)),
        (3, 32, dict(dim=8, dim_mults=(1, 2), attn_dim_head=8)),
        (3, 32, dict(dim=8, dim_mults=(1, 2, 4), attn_dim_head=8)),
    ],
)
def test_forward_shape(channels, size, kw):
    torch.manual_seed(0)
    model = UNet(channels=channels, **kw)
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        y = model(x, t)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    # the output depends on t (time conditioning is wired in)
    with torch.no_grad():
        y2 = model(x, torch.tensor([500, 3]))
    assert not torch.allclose(y, y2)


def test_bad_dim_mults_rejected():
    with pytest.raises(ValueError):
        UNet(dim=8, dim_mults=(1,), attn_dim_head=8)
    with pytest.raises(ValueError):
        UNet(dim=8, dim_mults=(2, 4), attn_dim_head=8)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _region_equal(model, snap, region):
    return all(
        torch.equal(p, snap[n]) for n, p in model.named_parameters() if n.split(".")[0] == region
    )


def _region_all_differ(model, snap, region):
    return all(
        not torch.equal(p, snap[n])
        for n, p in model.named_parameters()
        if n.split(".")[0] == region
    )


@pytest.mark.parametrize("region", REGIONS)
def test_flatten_layout_and_round_trip(region):
    model = tiny()
    buf = regions.flatten(model, region)
    assert buf.dtype == np.float32 and buf.ndim == 1
    expected = np.concatenate(
        [
            p.detach().numpy().ravel()
            for n, p in model.named_parameters()
            if n.split(".")[0] == region
        ]
    )
    np.testing.assert_array_equal(buf, expected)
    # flatten into a caller's buffer
    out = np.zeros_like(buf)
    assert regions.flatten(model, region, out=out) is out
    np.testing.assert_array_equal(out, expected)
    before = _snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) + 1.0)
    perturbed = _snapshot(model)
    regions.unflatten(model, region, buf)
    assert _region_equal(model, before, region)
    for other in REGIONS:
        if other != region:
            assert _region_equal(model, perturbed, other)
            assert _region_all_differ(model, before, other)
    # the buffer is a copy: changing it later does not touch the model
    buf += 5.0
    assert _region_equal(model, before, region)


@pytest.mark.parametrize("region", REGIONS)
def test_unflatten_into_second_model(region):
    a, b = tiny(seed=1), tiny(seed=2)
    with torch.no_grad():  # norm layers start at 1 / 0 in both: make every tensor differ
        for p in b.parameters():
            p.add_(torch.rand_like(p) + 0.5)
    a_before, b_before = _snapshot(a), _snapshot(b)
    assert _region_all_differ(b, a_before, region)
    regions.unflatten(b, region, regions.flatten(a, region))
    for n, p in b.named_parameters():
        if n.split(".")[0] == region:
            assert torch.equal(p, a_before[n]), n
        else:
            assert torch.equal(p, b_before[n]), n
    assert _region_equal(a, a_before, region)  # the source is untouched


def test_flatten_unflatten_reject_wrong_buffers():
    model = tiny()
    n = regions.region_sizes(model)["decoder"]
    with pytest.raises(ValueError):
        regions.unflatten(model, "decoder", np.zeros(n + 1, dtype=np.float32))
    with pytest.raises(ValueError):
        regions.flatten(model, "decoder", out=np.zeros(n, dtype=np.float64))
    with pytest.raises(ValueError):
        regions.flatten(model, "decoder", out=np.zeros(n - 1, dtype=np.float32))


def test_set_trainable():
    model = tiny()
    regions.set_trainable(model, ["decoder"])
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.split(".")[0] == "decoder"), n
    x = torch.randn(2, 1, 28, 28)
    model(x, torch.tensor([1, 2])).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n.split(".")[0] == "decoder":
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    regions.set_trainable(model, ("encoder", "bottleneck"))
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.split(".")[0] != "decoder"), n
    regions.set_trainable(model, REGIONS)
    assert all(p.requires_grad for p in model.parameters())


def test_summary_cli_prints_paper_counts():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmpi.summary",
            "--config",
            str(ROOT / "configs/paper/fmnist_full.yaml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rows = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s*(encoder|bottleneck|decoder|total)\s+([\d,]+)", line)
        if m:
            rows[m.group(1)] = int(m.group(2).replace(",", ""))
    assert rows == {**PAPER_COUNTS, "total": PAPER_TOTAL}, res.stdout


def test_bind_flat_keeps_values_and_aliases_weights():
    from fedmpi.model.regions import bind_flat, region_array

    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    bind_flat(model)
    assert [id(p) for p in model.parameters()] == ids  # same Parameter objects
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for region in REGIONS:
        arr, is_view = region_array(model, region)
        assert is_view and arr.size == region_sizes(model)[region]
        arr[:] = 0.5  # writes through to the weights
        assert all(bool((p == 0.5).all()) for p in region_params(model, region))
    # an optimizer step still updates the (aliased) parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    arr, _ = region_array(model, "decoder")
    assert not np.all(arr == 0.5)


def test_finite_matches_the_elementwise_test():
    """`finite` decides by one sum per tensor, falling back to the element-wise test: it
    must agree with isfinite().all() for NaN, +/-inf, and finite values whose sum overflows."""
    big = torch.full((8,), 3e38)  # every value finite, their float32 sum is inf
    ok = torch.randn(1000)
    cases = {
        "finite": [ok],
        "overflowing sum": [big],
        "overflow both signs": [torch.cat([big, -big])],
    }
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = ok.clone()
        t[123] = bad
        cases[f"{bad}"] = [t]
        cases[f"{bad} in the second tensor"] = [ok, t]
    both = ok.clone()
    both[1], both[2] = float("inf"), -float("inf")  # sums to NaN
    cases["inf and -inf"] = [both]
    for name, tensors in cases.items():
        expected = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert finite(*tensors) == expected, name
        # the sums taken earlier (the federator's, one per region as it is broadcast)
        assert finite(*tensors, sums=[t.sum(dtype=torch.float32) for t in tensors]) == expected, (
            name
        )
    assert finite(big)  # its sum is inf: the element-wise fallback decided
    assert finite()  # nothing to check
    model = UNet(dim=8, dim_mults=(1, 2))
    assert all_finite(model)
    with torch.no_grad():
        next(model.decoder.parameters())[0].fill_(float("nan"))
    assert not all_finite(model)
