"""Training loader workers start once per run and persist across epochs (issue 25): each epoch's
batches are those a fresh loader of that epoch gives (the epoch reaches the workers with each
index), and a resumed epoch starts at the asked batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_video.config import load_config
from dist_video.data import SegmentSampler, TrainTransform, VideoClipDataset, parse_csv
from dist_video.data.synthetic import make_synthetic
from dist_video.engine import data as data_module
from dist_video.engine.data import TrainLoader, train_loader
from dist_video.engine.distributed import DistEnv


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_train=12, num_val=2, seed=0, size=32, num_frames=8, workers=1)
    return out


def _dataset(synthetic: Path) -> VideoClipDataset:
    records, names = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")
    return VideoClipDataset(records, sampler=SegmentSampler(8), transform=TrainTransform(crop_size=32),
                            training=True, class_names=names, seed=3)


def _config(synthetic: Path, workers: int):
    return load_config(None, None, [f"data.root={synthetic}", f"data.train={synthetic / 'train.csv'}",
                                    "train.batch_size=4", f"data.workers={workers}", "train.seed=3"])


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["video"], y["video"]) and torch.equal(x["label"], y["label"])
                                    and torch.equal(x["index"], y["index"]) for x, y in zip(a, b))


def test_workers_start_once_and_every_epoch_is_a_fresh_loader_s(synthetic, tmp_path, monkeypatch):
    starts = tmp_path / "worker-starts"
    starts.mkdir()
    real_init = data_module._worker_init

    def counting_init(worker_id: int) -> None:
        (starts / f"{os.getpid()}-{worker_id}").touch()
        real_init(worker_id)

    monkeypatch.setattr(data_module, "_worker_init", counting_init)
    dataset = _dataset(synthetic)
    loader = TrainLoader(dataset, _config(synthetic, workers=2), DistEnv())
    assert loader.loader.persistent_workers
    epochs = [list(loader.epoch(e)) for e in range(3)]
    resumed = list(loader.epoch(1, start_batch=2))
    assert len(list(starts.iterdir())) == 2  # 2 workers over 3 epochs and a resume, not 2 per epoch

    fresh_config = _config(synthetic, workers=0)
    for e, batches in enumerate(epochs):
        assert len(batches) == 3
        assert _same(batches, list(train_loader(_dataset(synthetic), fresh_config, DistEnv(), epoch=e)))
    assert not torch.equal(epochs[0][0]["video"], epochs[1][0]["video"])  # the epochs differ, so the check bites
    assert _same(resumed, epochs[1][2:])


def test_without_workers_nothing_persists(synthetic):
    loader = TrainLoader(_dataset(synthetic), _config(synthetic, workers=0), DistEnv())
    assert not loader.loader.persistent_workers
    assert [len(list(loader.epoch(e))) for e in range(2)] == [3, 3]
