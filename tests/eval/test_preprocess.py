"""eval.preprocess: fedmpi's exact (x + 1) / 2 and the reference's PNG clamp.

The reference writes real and generated [-1, 1] tensors with torchvision's save_image
and scores the PNG files; `reference` must equal that round trip to the byte.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from fedmpi.config import EvalCfg
from fedmpi.config.schema import CHOICES
from fedmpi.eval.classifier import ClassifierExtractor, SmallCNN
from fedmpi.eval.extractors import (
    compute_stats,
    extractor_from_payload,
    reference_set,
    reference_stats_path,
)
from fedmpi.eval.fid import to_unit, to_unit_quantized
from fedmpi.eval.manifold import knn_radii

VALUES = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])


def png_round_trip(img: torch.Tensor, path) -> torch.Tensor:
    """One (C, H, W) image in [-1, 1] through save_image, read back as pytorch-fid reads
    PNGs (PIL, then ToTensor's / 255), channels as given (save_image writes grey as RGB)."""
    save_image(img, path)
    arr = np.asarray(Image.open(path).convert("RGB"))
    back = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    return back[: img.shape[0]]


def test_known_values():
    # exact: (x + 1) / 2 on the nearest of 256 levels (63.75 -> 64, 127.5 -> 128 by round
    # half to even, 191.25 -> 191), so within half a level of 0, .25, .5, .75, 1
    exact = to_unit(VALUES, "exact")
    assert torch.equal(exact * 255, torch.tensor([0, 64, 128, 191, 255.0]))
    assert torch.allclose(exact, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]), atol=0.5 / 255)
    # save_image: uint8(clamp(x * 255 + 0.5, 0, 255)); -0.5 and 0 are black, 0.5 -> 128
    ref = to_unit(VALUES, "reference")
    assert torch.equal(ref * 255, torch.tensor([0, 0, 0, 128, 255.0]))
    assert torch.equal(ref, torch.tensor([0, 0, 0, 128, 255.0]) / 255)
    # just above 0: below half a level stays black, from half a level up it is 1
    tiny = to_unit(torch.tensor([0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4]), "reference") * 255
    assert torch.equal(tiny, torch.tensor([0.0, 1.0]))


def test_exact_is_todays_mapping():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    assert torch.equal(to_unit(x, "exact"), to_unit_quantized(x))
    assert torch.equal(to_unit(x), ((x.clamp(-1, 1) + 1) * 127.5).round() / 255)


@pytest.mark.parametrize("channels", [1, 3])
def test_reference_equals_save_image_png_round_trip(channels, tmp_path):
    gen = torch.Generator().manual_seed(channels)
    x = torch.rand(6, channels, 16, 16, generator=gen) * 2 - 1
    x[0, :, 0, :4] = torch.tensor([-1.0, 0.0, 0.5, 1.0])  # exact levels and the edges
    mine = to_unit(x, "reference")
    for i, img in enumerate(x):
        assert torch.equal(mine[i], png_round_trip(img, tmp_path / f"{i}.png")), i
    assert (mine[x < 0] == 0).all()  # the darker half of the range is black


def test_unknown_preprocess_refused():
    with pytest.raises(ValueError, match="eval.preprocess"):
        to_unit(VALUES, "png")


def test_config_key():
    assert EvalCfg().preprocess == "exact"
    assert CHOICES["eval.preprocess"] == ("exact", "reference")


class Stub:
    """The interface reference_set needs: a key, a dim, features of [0, 1] images."""

    dim, key = 2, "stub"

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def features(self, x):
        u = to_unit(x, self.preprocess).flatten(1)
        return torch.stack([u.mean(1), u.std(1)], 1)


def test_stats_cache_keyed_by_preprocess(tmp_path):
    exact, ref = Stub("exact"), Stub("reference")
    p_exact = reference_stats_path(exact, tmp_path, "ds-test10", 10)
    p_ref = reference_stats_path(ref, tmp_path, "ds-test10", 10)
    assert p_exact != p_ref
    assert p_exact.name == "ref-ds-test10-stub-n10.npz"  # the name caches had before
    assert p_ref.name == "ref-ds-test10-stub-reference-n10.npz"

    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = reference_set(exact, x, tmp_path, "ds-test10")[0]
    b = reference_set(ref, x, tmp_path, "ds-test10")[0]  # not the exact cache
    assert p_exact.is_file() and p_ref.is_file()
    assert not np.allclose(a.mean(), b.mean())
    assert np.array_equal(reference_set(ref, x, tmp_path, "ds-test10")[0].mean(), b.mean())


def test_classifier_features_follow_preprocess_predictions_do_not():
    torch.manual_seed(0)
    net = SmallCNN(1, 8, 3, feat_dim=4, widths=(2, 2))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ext = ClassifierExtractor(net, "ds", "k", 0.5, preprocess="reference")
    again = extractor_from_payload(ext.payload())
    assert again.preprocess == "reference"
    exact = ClassifierExtractor(net, "ds", "k", 0.5)
    assert torch.equal(ext.features(x), net.eval().features(to_unit(x, "reference") * 2 - 1))
    assert not torch.equal(ext.features(x), exact.features(x))
    assert torch.equal(ext.predict(x), exact.predict(x))


def test_reference_on_real_uint8_levels():
    """A real image's level u (to_float: u / 127.5 - 1) becomes max(2u - 255, 0)."""
    from fedmpi.data import to_float

    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    got = to_unit(to_float(u), "reference") * 255
    assert torch.equal(got, (2 * u.float() - 255).clamp(min=0))
    assert torch.equal(to_unit(to_float(u), "exact") * 255, u.float())  # exact is lossless


class Counting(Stub):
    """A Stub that counts the images it turned into features."""

    def __init__(self):
        super().__init__("exact")
        self.seen = 0

    def features(self, x):
        self.seen += len(x)
        return super().features(x)


def test_cold_cache_extracts_the_reference_once(tmp_path):
    """Statistics and precision / recall's features come from one pass over the real
    images; a warm cache makes none, and a new k reuses the cached statistics."""
    x = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ext = Counting()
    stats, (feats, radii) = reference_set(ext, x, tmp_path, "ds-test30", k=3)
    assert ext.seen == 30  # one pass, not one for the statistics and one for the features
    assert np.array_equal(stats.to_array(), compute_stats(Stub("exact"), x).to_array())
    assert torch.equal(feats, Stub("exact").features(x))
    assert torch.equal(radii, knn_radii(feats, 3))

    ext.seen = 0
    again, (f2, r2) = reference_set(ext, x, tmp_path, "ds-test30", k=3)
    assert ext.seen == 0 and torch.equal(f2, feats) and torch.equal(r2, radii)
    assert np.array_equal(again.to_array(), stats.to_array())

    ext.seen = 0
    other, (_, r5) = reference_set(ext, x, tmp_path, "ds-test30", k=5)
    assert ext.seen == 30 and torch.equal(r5, knn_radii(feats, 5))
    assert np.array_equal(other.to_array(), stats.to_array())
    assert reference_set(ext, x, tmp_path, "ds-test30")[1] is None  # k = 0: no features
