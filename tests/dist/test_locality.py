"""Data locality: the federator (rank 0) reads the test split alone, never training data.

In a real deployment rank 0 is another institution than the clients: it scores models
against the evaluation split it owns. These tests prove that with the files themselves:
a data root holding only the test split is enough for the federator's Evaluator (and the
fd_classifier network is trained on that split); with the training files right there,
an audit hook sees the Evaluator open only test files; and in a real `mpirun -n 3` job
an audit hook on rank 0 sees the test files opened and no training file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmpi.config import ConfigError, DataCfg, EvalCfg, load_config
from fedmpi.data import IDX_FILES, DataError, load_arrays, to_float, write_idx
from fedmpi.eval.evaluate import Evaluator
from fedmpi.eval.extractors import (CLASSIFIER_SETTINGS, _settings_hash, build_extractor,
                               classifier_cache_path, data_digest, holdout_split,
                               load_classifier_weights)
from fedmpi.store.tables import read_csv
from mpihelp import ROOT, mpirun

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed (dataset-fashion-mnist)")
N_TEST = 300  # a small test split: the classifier trains in seconds


def write_split(root: Path, split: str, n: int) -> None:
    """The first n images of the real Fashion-MNIST split as IDX files under root."""
    x, y = load_arrays(DataCfg(root=str(FMNIST), download=False), split)
    root.mkdir(parents=True, exist_ok=True)
    img, lbl = IDX_FILES[split]
    write_idx(root / f"{img}.gz", x[:n, 0])
    write_idx(root / f"{lbl}.gz", y[:n].astype(np.uint8))


def held_test_split(root: Path):
    x, y = load_arrays(DataCfg(root=str(root), download=False), "test")
    return to_float(x), torch.from_numpy(y)


def tiny_cfg(root: Path, cache: Path):
    return load_config(ROOT / "tests/configs/tiny.yaml",
                       {"data.root": str(root), "data.download": False,
                        "eval.extractor": "classifier", "eval.cache_dir": str(cache)})


@pytest.fixture(scope="module")
def test_only_root(tmp_path_factory) -> Path:
    """A federator's data root: the test split, and no training file at all."""
    root = tmp_path_factory.mktemp("federator_data")
    write_split(root, "test", N_TEST)
    return root


@pytest.fixture(scope="module")
def federator(test_only_root, tmp_path_factory):
    """The federator's Evaluator, built in one process on the test-only root."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = tiny_cfg(test_only_root, cache)
    return Evaluator(cfg, None, cache.parent / "run", torch.device("cpu")), cfg, cache


def test_federator_runs_without_training_files(federator):
    ev, cfg, cache = federator
    # The root really lacks the training set: nothing there could have been read.
    with pytest.raises(DataError, match="data not found"):
        load_arrays(cfg.data, "train")
    assert ev.extractor.name == "fd_classifier"
    assert ev.ref_mu.shape == (ev.extractor.dim,)  # reference stats of data.test_subset
    # Trained on the test split, and its cache key and file say so.
    files = list(cache.glob("classifier-*.pt"))
    assert [f.stem for f in files] == [ev.extractor.key]
    assert ev.extractor.key.startswith("classifier-fashion_mnist-testsplit-")
    ckpt = torch.load(files[0], weights_only=True)
    assert ckpt["trained_on"] == "test split"
    assert ckpt["num_fit"] + ckpt["num_heldout"] == N_TEST and ckpt["num_heldout"] == 60
    assert 0 <= ckpt["accuracy"] <= 1


_OPENED: list[str] = []


def _record_opens(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED.append(os.fspath(args[0]))


def test_classifier_learns_from_test_split_only(tmp_path):
    """With the training files right next to the test files, building the federator's
    Evaluator (training the classifier) opens the test files and no training file; the
    accuracy it reports is measured on a held-out part of the test split it never fitted."""
    root = tmp_path / "data"
    write_split(root, "train", 240)
    write_split(root, "test", N_TEST)
    sys.addaudithook(_record_opens)  # cannot be removed: it only appends to a list
    _OPENED.clear()
    ev = Evaluator(tiny_cfg(root, tmp_path / "cache"), None, tmp_path / "run",
                   torch.device("cpu"))
    opened = [p for p in _OPENED if p.startswith(str(root))]
    _OPENED.clear()
    assert any("t10k-images" in p for p in opened), opened
    assert not [p for p in opened if "train-" in p], opened
    # The cached net is the one of exactly these test images.
    path = classifier_cache_path("fashion_mnist", tmp_path / "cache",
                                 data_digest(*held_test_split(root)))
    assert path.stem == ev.extractor.key
    fit, held = holdout_split(N_TEST)
    assert len(held) == round(N_TEST * CLASSIFIER_SETTINGS["holdout"])
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(N_TEST))  # disjoint, all
    with pytest.raises(DataError, match="classifier_weights"):
        holdout_split(5)


def test_old_training_set_classifier_never_reused(federator, test_only_root, tmp_path):
    """A cache holding a classifier trained the old way (on the training set, settings
    version 1, cached as classifier-<dataset>-<v1 hash>.pt) is not picked up."""
    v1 = {"arch": "cnn8-32-fc128", "version": 1, "epochs": 3, "batch_size": 256, "lr": 3e-3,
          "schedule": "onecycle", "seed": 0}
    v1_hash = hashlib.sha256(json.dumps(v1, sort_keys=True).encode()).hexdigest()[:10]
    assert _settings_hash() != v1_hash
    _, _, cache = federator
    ckpt = torch.load(next(cache.glob("classifier-*.pt")), weights_only=True)
    old = tmp_path / f"classifier-fashion_mnist-{v1_hash}.pt"
    torch.save({k: ckpt[k] for k in ("state_dict", "net_args", "dataset", "accuracy")}
               | {"settings_hash": v1_hash}, old)  # the version-1 file layout
    ext = build_extractor(EvalCfg(extractor="classifier", cache_dir=str(tmp_path)),
                          "fashion_mnist", lambda: held_test_split(test_only_root))
    assert "testsplit" in ext.key and v1_hash not in ext.key
    assert sorted(p.name for p in tmp_path.glob("classifier-*.pt")) == sorted(
        [old.name, ext.key + ".pt"])


def test_classifier_weights_file(federator, tmp_path):
    """eval.classifier_weights: used as given, with no data read; bad files refused."""
    ev, _, cache = federator
    weights = tmp_path / "my_classifier.pt"
    weights.write_bytes(next(cache.glob("classifier-*.pt")).read_bytes())
    cfg = load_config(ROOT / "tests/configs/tiny.yaml",
                      {"eval.extractor": "classifier", "eval.classifier_weights": str(weights)})
    ext = build_extractor(cfg.eval, "fashion_mnist",
                          lambda: pytest.fail("read data despite eval.classifier_weights"))
    assert ext.key.startswith("classifier-file-") and ext.accuracy == ev.extractor.accuracy
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(ext.features(x), ev.extractor.features(x))

    with pytest.raises(ConfigError, match="is not a file"):
        load_config(None, {"eval.classifier_weights": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match="for fashion_mnist, but data.dataset is mnist"):
        load_classifier_weights(weights, "mnist")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ConfigError, match="evil.pt is not a usable fedmpi classifier"):
        load_classifier_weights(evil, "fashion_mnist")
    assert not marker.exists()


def test_cifar_test_split_reads_no_training_batch(tmp_path):
    """CIFAR-10's test batch is read alone (torchvision would checksum the training
    batches too): a root with only test_batch serves the test split."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": list(range(7))}, f)
    cfg = DataCfg(dataset="cifar10", root=str(tmp_path), download=False)
    x, y = load_arrays(cfg, "test")
    assert x.shape == (7, 3, 32, 32) and np.array_equal(x.reshape(7, -1), data)
    assert y.tolist() == list(range(7))
    with pytest.raises(DataError, match="data not found"):
        load_arrays(cfg, "train")


@pytest.mark.mpi
def test_mpirun_rank0_opens_no_training_file(tmp_path):
    """A real 3-rank job with fd_classifier evaluation (classifier trained during the
    job): rank 0 opens the test files and no training file; clients open theirs."""
    root = tmp_path / "data"
    write_split(root, "train", 240)
    write_split(root, "test", N_TEST)
    logs = tmp_path / "opens"
    logs.mkdir()
    res = mpirun(3, ["tests/mpi_scripts/audit_opens.py", str(logs), "--",
                     "--config", "tests/configs/tiny.yaml", "--run-dir", str(tmp_path / "run"),
                     f"--data.root={root}", "--data.download=false", "--fed.rounds=1",
                     "--eval.extractor=classifier", f"--eval.cache_dir={tmp_path / 'cache'}",
                     "--eval.num_samples=8", "--eval.batch_size=8"])
    assert res.returncode == 0, res.stdout + res.stderr
    (row,) = read_csv(tmp_path / "run" / "eval.csv")
    assert float(row["fd_classifier"]) > 0
    # precision / recall of the 8 samples the three ranks drew, scored by the federator
    # against features only it holds (the clients read no test image: below)
    assert 0 <= float(row["precision"]) <= 1 and 0 <= float(row["recall"]) <= 1
    opens = {r: (logs / f"opens_rank{r}.txt").read_text().splitlines() for r in range(3)}
    data_opens = {r: [p for p in o if p.startswith(str(root))] for r, o in opens.items()}
    # The hook works and rank 0 read its own data: the test images and labels.
    assert any("t10k-images" in p for p in data_opens[0]), data_opens[0]
    assert not [p for p in data_opens[0] if "train-" in p], data_opens[0]
    for client in (1, 2):  # clients read their training data, and no test image
        assert any("train-images" in p for p in data_opens[client]), data_opens[client]
        assert not [p for p in data_opens[client] if "t10k" in p], data_opens[client]
    # The classifier of this job was trained on the test split (N_TEST images).
    ckpt = torch.load(next((tmp_path / "cache").glob("classifier-*testsplit*.pt")),
                      weights_only=True)
    assert ckpt["num_fit"] + ckpt["num_heldout"] == N_TEST
