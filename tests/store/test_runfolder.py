"""fedmpi.store.runfolder.RunFolder: creation, checkpoints and their markers, truncation on
resume, the files evaluate / report / plot read."""

from __future__ import annotations

import json

import pytest
import torch

from fedmpi.config import load_config
from fedmpi.store.atomic import atomic_write
from fedmpi.store.runfolder import RunFolder, client_file
from fedmpi.store.tables import read_csv


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, {"run.out_dir": str(tmp_path / "runs"), "run.name": "tiny"})


def write_checkpoint(run: RunFolder, index: int, names=("federator.pt",), keep: int = 0):
    """Files of checkpoint `index`, then its marker with their sha256."""
    d = run.checkpoint_dir(index)
    files = {name: atomic_write(d / name, f"{name} of round {index}") for name in names}
    run.mark_complete(index, keep, files)
    return d


def test_create_writes_the_config_and_never_reuses_a_folder(cfg, tmp_path):
    first = RunFolder.create(cfg)
    second = RunFolder.create(cfg)
    assert first.path != second.path
    assert first.path.parent == tmp_path / "runs" and first.path.name.startswith("tiny-")
    assert first.is_run() and first.config_file == first.path / "config.yaml"
    assert first.read_config() == cfg
    assert not first.has_results()
    named = RunFolder.create(cfg, "other")
    assert named.path.name.startswith("other-")
    assert not RunFolder(tmp_path / "nothing").is_run()


def test_checkpoints_marked_complete_and_pruned(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.complete_checkpoints() == [] and run.latest_complete() is None
    for index in (1, 2, 3):
        write_checkpoint(run, index, keep=2)
    run.checkpoint_dir(4).mkdir(parents=True)  # written, never marked complete
    assert run.complete_checkpoints() == [2, 3]
    assert not run.checkpoint_dir(1).exists()
    assert run.latest_complete() == 3
    assert set(run.marker_files(3)) == {"federator.pt"}
    assert run.has_results()


def test_verify_and_newest_verified_fall_back_past_a_corrupt_checkpoint(tmp_path):
    run = RunFolder(tmp_path / "run")
    for index in (1, 2, 3):
        write_checkpoint(run, index, ("federator.pt", client_file(1)))
    assert [run.verify(i) for i in (1, 2, 3)] == [None, None, None]
    (run.checkpoint_dir(3) / "federator.pt").write_text("truncated")
    (run.checkpoint_dir(2) / "client_001.pt").unlink()
    assert "does not match the sha256" in run.verify(3)
    assert run.verify(2).endswith("client_001.pt is missing")
    warnings = []
    assert run.newest_verified(warnings.append) == 1
    assert len(warnings) == 2 and "round 3 is unusable" in warnings[0]
    (run.checkpoint_dir(1) / "COMPLETE").write_text("{not json")
    assert run.verify(1).endswith("COMPLETE is corrupt")
    assert run.newest_verified(warnings.append) is None


def test_truncate_drops_the_rounds_a_resume_replays(tmp_path):
    run = RunFolder(tmp_path / "run")
    log = run.metrics_writer()
    for r in (1, 2, 3):
        log.write(kind="round", round=r, loss=1.0 / r)
    run.append_eval([{"round": r, "client": "global", "fid": 10.0 * r} for r in (1, 2, 3)])
    run.append_comm(
        [{"round": r, "client": 1, "bytes": 40} for r in (0, 1, 2, 3)],  # round 0: initial model
        ["round", "client", "bytes"],
    )
    run.truncate(2)
    assert [r["round"] for r in run.read_metrics()] == [1, 2]
    assert [r["round"] for r in run.read_eval()] == ["1", "2"]
    assert [r["round"] for r in run.read_comm()] == ["0", "1", "2"]
    run.truncate(0)  # from the start: the initial broadcast is sent again
    assert run.read_metrics() == [] and run.read_eval() == []
    assert not (run / "comm.csv").exists() and not (run / "eval.csv").exists()

    epochs = RunFolder(tmp_path / "centralized")
    for e in (1, 2):
        epochs.metrics_writer().write(kind="epoch", epoch=e)
    epochs.truncate(1, "epoch")
    assert [r["epoch"] for r in epochs.read_metrics()] == [1]


def test_eval_summary_and_rescore_files(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    assert run.last_eval() == [] and run.read_summary() is None and not run.has_summary()
    run.append_eval(
        [{"round": 1, "client": 1, "fid": 30.0}, {"round": 1, "client": 2, "fid": 31.0}]
    )
    run.append_eval([{"round": 1, "client": 1, "fid": 29.0}])  # a replayed round: last wins
    assert [(r["client"], r["fid"]) for r in run.last_eval()] == [("1", "29.0"), ("2", "31.0")]
    run.write_summary({"matches_analytical": True})
    assert run.has_summary() and run.read_summary() == {"matches_analytical": True}
    assert json.loads((run / "comm_summary.json").read_text())["matches_analytical"] is True
    path = run.write_rescore([{"client": "global", "fd_classifier": 1.5}], "classifier", 4)
    assert path == run / "rescore_classifier_round_4.csv"
    assert read_csv(path) == [{"client": "global", "fd_classifier": "1.5"}]


def test_checkpoint_models(tmp_path):
    run = RunFolder(tmp_path / "run")
    write_checkpoint(run, 2, ("federator.pt", client_file(2), client_file(1)))
    central, files = run.checkpoint_models(2)
    assert not central
    assert [(label, p.name) for label, p in files] == [
        ("global", "federator.pt"),
        ("1", "client_001.pt"),
        ("2", "client_002.pt"),
    ]
    assert not run.has_centralized_checkpoint()
    write_checkpoint(run, 3, ("model.pt",))
    assert run.checkpoint_models(3) == (True, [("global", run.checkpoint_dir(3) / "model.pt")])
    assert run.has_centralized_checkpoint()
    assert run.checkpoint_models(9) == (False, [])


def test_sample_grids(tmp_path):
    pytest.importorskip("torchvision")
    run = RunFolder(tmp_path / "run")
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    assert run.save_round_grid(images, 2) == run.samples_dir / "round_0002.png"
    assert run.save_round_grid(images, 2, client=3) == run.samples_dir / "round_0002_client_003.png"
    assert run.grids(2) == [
        run.samples_dir / "round_0002.png",
        run.samples_dir / "round_0002_client_003.png",
    ]
    assert run.grids(1) == []


def test_a_bare_round_number_marker_is_trusted_and_garbage_is_not(tmp_path):
    run = RunFolder(tmp_path / "run")
    for index, text in ((1, "1\n"), (2, "{not json")):
        d = run.checkpoint_dir(index)
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text(text)
    assert run.verify(1) is None
    assert "is corrupt" in run.verify(2)
    assert run.newest_verified(lambda msg: None) == 1
