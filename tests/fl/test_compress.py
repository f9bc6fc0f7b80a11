"""fed.compress without MPI: the codecs, their error bounds, error feedback's residual,
the ledger's byte rule for each scheme and the config's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi.config import ConfigError, load_config
from fedmpi.fl import compress
from fedmpi.fl.ledger import UploadFormat, analytical_rows, deployment_bytes
from fedmpi.fl.methods import make_plan
from fedmpi.model.regions import REGIONS


def test_bf16_round_trip_is_within_its_precision():
    p = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    payload = compress.encode_bf16(p)
    assert payload.dtype == np.uint8 and payload.size == 2 * p.size
    back = compress.decode_bf16(payload)
    # bfloat16 keeps 8 significant bits: relative error at most 2^-8 (round to nearest)
    assert np.all(np.abs(back - p) <= np.abs(p) * 2.0**-8)
    assert not np.array_equal(back, p)


def test_topk_keeps_the_largest_entries_exactly():
    p = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    k = compress.topk_count(p.size, 0.05)
    assert k == 50
    payload = compress.encode_topk(p, k)
    assert payload.size == 8 * k == compress.payload_bytes("topk", p.size, 0.05)
    dense = compress.decode_topk(payload, p.size)
    kept = np.flatnonzero(dense)
    assert set(kept) == set(np.argsort(-np.abs(p))[:k])
    assert np.array_equal(dense[kept], p[kept])
    assert compress.topk_count(10, 1e-6) == 1  # never an empty upload


def test_int8_rounding_is_unbiased_and_bounded():
    v = np.random.default_rng(2).uniform(-1, 1, 200_000).astype(np.float32)
    levels = compress.int8_levels(3)
    assert levels == 42 and compress.int8_levels(1) == 127 and compress.int8_levels(128) == 0
    scale = float(np.abs(v).max()) / levels
    q = compress.quantize_int8(v, scale, levels, np.random.default_rng(3))
    assert q.dtype == np.int8 and np.abs(q).max() <= levels
    err = q.astype(np.float64) * scale - v
    assert np.abs(err).max() < scale  # one step at most
    assert abs(err.mean()) < 0.01 * scale  # unbiased (mean of 200k errors in [-s, s])
    # deterministic from its stream: resume redraws the same values
    again = compress.quantize_int8(v, scale, levels, np.random.default_rng(3))
    assert np.array_equal(q, again)
    assert not compress.quantize_int8(v, 0.0, levels, np.random.default_rng(3)).any()
    # without a stream: round to nearest, half a step at most
    near = compress.quantize_int8(v, scale, levels, None)
    assert np.abs(near.astype(np.float64) * scale - v).max() <= 0.5 * scale * (1 + 1e-6)


def test_int8_scales_are_per_block():
    v = np.zeros(2500, np.float32)
    v[0], v[1500], v[2499] = 5.0, -0.01, 0.002  # three blocks of 1024 (the last short)
    assert compress.int8_blocks(v.size) == 3
    amax = compress.block_max(v)
    assert np.allclose(amax, [5.0, 0.01, 0.002])
    scale = compress.per_value(amax / 63, v.size)
    q = compress.quantize_int8(v, scale, 63, None)
    # a small block keeps its resolution whatever the large one holds
    assert q[0] == 63 and q[1500] == -63 and q[2499] == 63
    assert compress.payload_bytes("int8", 2500) == 2500 + 3 * 4
    assert compress.scale_bytes("int8", 2500) == 12 and compress.scale_bytes("bf16", 2500) == 0


def test_rounding_streams_differ_by_round_region_and_rank():
    draws = {
        (r, reg, s): compress.rounding_rng(7, r, reg, s).random(4).tobytes()
        for r in (1, 2)
        for reg in REGIONS[:2]
        for s in (0, 1)
    }
    assert len(set(draws.values())) == len(draws)


def test_error_feedback_keeps_what_was_not_sent():
    fb = compress.ErrorFeedback()
    p = np.array([1.0, -2.0, 0.5], np.float32)
    fb.add_to("encoder", p)  # no residual yet
    assert np.array_equal(p, [1.0, -2.0, 0.5])
    fb.keep("encoder", p, np.array([1.0, -2.0, 0.0], np.float32))
    q = np.zeros(3, np.float32)
    fb.add_to("encoder", q)
    assert np.array_equal(q, [0.0, 0.0, 0.5])
    other = compress.ErrorFeedback()
    other.load_state_dict(fb.state_dict())
    assert np.array_equal(other.residual["encoder"], fb.residual["encoder"])


@pytest.mark.parametrize(
    "fmt,up",
    [
        (UploadFormat(), 4 * 101),
        (UploadFormat(secure=True), 8 * 101),
        (UploadFormat("bf16"), 200),
        (UploadFormat("int8"), 104),
        (UploadFormat("int8", secure=True), 104),
        (UploadFormat("topk", topk_fraction=0.1), 80),
    ],
)
def test_upload_format_bytes(fmt, up):
    assert fmt.up(100) == up
    assert fmt.down(100, reported=False) == 400
    assert fmt.down(100, reported=True) == 400 + (4 if fmt.compress == "int8" else 0)


def test_int8_uploads_cost_a_quarter_of_float32_and_the_rows_count_the_scales():
    sizes = dict.fromkeys(REGIONS, 10000)
    plain = analytical_rows("full", 4, 3, sizes, 0)
    int8 = analytical_rows("full", 4, 3, sizes, 0, UploadFormat("int8"))
    up = {
        n: sum(r["bytes"] for r in rows if r["direction"] == "up")
        for n, rows in (("p", plain), ("q", int8))
    }
    assert up["p"] / up["q"] > 3.98
    downs = [r for r in int8 if r["direction"] == "down"]
    assert all(r["bytes"] == 40_000 + (40 if r["round"] > 0 else 0) for r in downs)
    plan = make_plan("udec", 1, 4, 0)
    dep = deployment_bytes(plan, sizes, UploadFormat("int8"))
    assert dep["client_up_bytes"] == sum(len(u) for u in plan.uploads) * 10_040


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["--fed.compress=bf16", "--fed.secure=true"], "fed.compress=int8"),
        (["--fed.compress=topk", "--fed.secure=true"], "modular integer sum"),
        (["--fed.compress=int8", "--privacy.dp=true"], "compress=none with DP"),
        (["--fed.compress=zip"], "fed.compress"),
        (["--fed.topk_fraction=0"], "fed.topk_fraction"),
    ],
)
def test_config_refuses_what_the_arithmetic_does_not_allow(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, overrides)


def test_int8_with_secure_is_accepted():
    cfg = load_config(None, ["--fed.compress=int8", "--fed.secure=true"])
    assert cfg.fed.compress == "int8" and cfg.fed.error_feedback


def test_comm_table_prints_the_compressed_bytes(capsys):
    import fedmpi.cli.comm as comm

    config = "tests/configs/tiny.yaml"
    mb = {}
    for scheme in ("none", "int8"):
        assert comm.main(["--config", config, "--clients", "4", "--compress", scheme]) == 0
        out = capsys.readouterr().out
        full = next(line for line in out.splitlines() if line.startswith("FULL"))
        mb[scheme] = float(full.split()[4])
    assert "uploads int8" in out
    # paper rule: the initial model (fp32) + R uploads + R - 1 downloads; int8 shrinks the uploads
    assert 1.3 < mb["none"] / mb["int8"] < 2.0
    # what training refuses, the table refuses too
    bad = ["--config", config, "--clients", "4", "--compress", "bf16", "--secure"]
    assert comm.main(bad) == 2
    assert "'fed.compress' bf16 with 'fed.secure'" in capsys.readouterr().err


def test_wrappers_pass_the_compressed_byte_count_on():
    from fedmpi.fl.strategy import FedProx, ServerOptimized

    class Counted(compress.CompressedFedAvg):
        def reduce(self, world, group, buf, own=None):
            return 1234

    chain = ServerOptimized(FedProx(Counted("int8"), 0.1), optimizer=None)
    assert chain.reduce(None, None, None) == 1234
    assert chain.find(compress.CompressedFedAvg).scheme == "int8"
