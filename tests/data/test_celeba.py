"""CelebA at 64 x 64 (fedmpi/data/celeba.py): both layouts, the crop, the cache, and the
reference's CelebA model at the paper's parameter count."""

from __future__ import annotations

import numpy as np
import pytest
from mpihelp import ROOT
from PIL import Image

import fedmpi.data.datasets as D
from fedmpi.config import DataCfg, load_config


def face(i: int, w: int = 178, h: int = 218) -> Image.Image:
    """A CelebA-sized image: a border band (cropped away) around a centre whose colour
    encodes i."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, :] = (250, 0, 0)
    top = (h - w) // 2
    a[top : top + w, :] = (i * 20 % 256, 100, 200)
    return Image.fromarray(a)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_torchvision_layout_partition_crop_and_cache(tmp_path, home):
    root = tmp_path / "data"
    img = root / "celeba" / "img_align_celeba"
    img.mkdir(parents=True)
    lines = []
    for i in range(1, 8):
        face(i).save(img / f"{i:06d}.jpg", quality=95)
        lines.append(f"{i:06d}.jpg {0 if i <= 4 else 1 if i == 5 else 2}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    cfg = DataCfg(dataset="celeba", root=str(root), download=False)
    x, y = D.load_arrays(cfg, "train")
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.uint8 and (y == 0).all()
    # the red bands above and below the square centre are cropped away before resizing
    for i in range(4):
        mean = x[i].reshape(3, -1).mean(axis=1)
        assert mean == pytest.approx([(i + 1) * 20 % 256, 100, 200], abs=3), (i, mean)
    assert D.load_arrays(cfg, "test")[0].shape == (2, 3, 64, 64)  # partition 2: 6 and 7
    cached = sorted((home / ".cache/fedmpi/data").glob("celeba64-train-*.npy"))
    assert len(cached) == 1
    # later reads come from the cache: even with the images gone
    for p in img.glob("*.jpg"):
        p.write_bytes(b"")
    assert np.array_equal(D.load_arrays(cfg, "train")[0], x)


def test_image_folder_layout_and_missing_data(tmp_path, home):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("test", 2)):
        (root / "celeba" / split / "a").mkdir(parents=True)
        for i in range(n):
            face(i, 100, 120).save(root / "celeba" / split / "a" / f"{i}.png")
    cfg = DataCfg(dataset="celeba", root=str(root), download=False, test_subset=1)
    assert D.load_arrays(cfg, "train")[0].shape == (3, 3, 64, 64)
    assert D.load_arrays(cfg, "test")[0].shape == (1, 3, 64, 64)
    with pytest.raises(D.DataError, match=r"celeba/img_align_celeba/\*\.jpg"):
        D.load_arrays(
            DataCfg(dataset="celeba", root=str(tmp_path / "none"), download=False), "train"
        )


def test_reference_celeba_config_has_the_papers_parameter_count():
    from fedmpi.model.summary import model_region_sizes

    cfg = load_config(ROOT / "configs/paper/celeba64.yaml")
    assert D.dataset_info("celeba") == (3, 64, 1)
    assert sum(model_region_sizes(cfg).values()) == 14_892_477  # PAPER.md
    f = cfg.fed
    assert (f.rounds, f.local_epochs, cfg.train.batch_size) == (30, 5, 64)
