"""Several clips per decoded video (``data.clips_per_video``): one decode, independent clips,
whole epochs, DDP shards, preload, the skip policy, mixing and exact resume after SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_video.data.datasets as datasets_module
from dist_video.config import Config, ConfigError, load_config
from dist_video.data import (MixupCutmix, SegmentSampler, TrainTransform, VideoClipDataset, VideoRecord,
                             parse_csv)
from dist_video.engine.data import (build_datasets, clips_on_device, collate_clips, train_batches_per_epoch,
                                    train_loader, videos_per_batch)
from dist_video.engine.distributed import DistEnv

from cli_helpers import run_cli, start_cli
from data_helpers import tiny_run_args, write_synthetic
from resume_helpers import kill_when, reached_step

TIMEOUT = 240


@pytest.fixture(scope="module")
def synthetic(synthetic_videos):
    return synthetic_videos(12, 4, seed=3, num_frames=12)


def train_set(synthetic: Path, n: int, **kw) -> VideoClipDataset:
    records, names = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")
    records = kw.pop("records", records)
    return VideoClipDataset(records, sampler=SegmentSampler(8), transform=TrainTransform(crop_size=24),
                            training=True, class_names=names, seed=1, clips_per_video=n, **kw)


def count_decodes(monkeypatch) -> list[list[int]]:
    """Record the frame indices of every read_frame_list call the dataset makes."""
    calls: list[list[int]] = []
    real = datasets_module.read_frame_list

    def counting(path, indices, *args, **kw):
        calls.append(list(indices))
        return real(path, indices, *args, **kw)

    monkeypatch.setattr(datasets_module, "read_frame_list", counting)
    return calls


def test_two_clips_come_from_one_decode_and_are_augmented_independently(synthetic, monkeypatch):
    single, double = train_set(synthetic, 1), train_set(synthetic, 2)
    calls = count_decodes(monkeypatch)
    item = double[5]
    assert len(calls) == 1 and len(calls[0]) == 2 * 8  # the union of both clips' frames, one decode
    assert tuple(item["video"].shape) == (2, 3, 8, 24, 24) and tuple(item["colour"].shape) == (2, 3, 4)
    assert item["label"].tolist() == [double.records[5].label] * 2 and item["index"] == 5
    assert not torch.equal(item["video"][0], item["video"][1])  # two different augmentations
    assert calls[0][:8] != calls[0][8:]  # and two different frame samples
    assert torch.equal(item["video"][0], single[5]["video"])  # clip 0 is the clip_per_video=1 clip
    assert torch.equal(item["colour"][0], single[5]["colour"])
    assert torch.equal(double[5]["video"], item["video"])  # a function of (seed, epoch, index)
    double.set_epoch(1)
    assert not torch.equal(double[5]["video"], item["video"])


def test_shared_frames_decode_one_clip_for_all_clips_and_augment_each(synthetic, monkeypatch):
    single, shared = train_set(synthetic, 1), train_set(synthetic, 3, clip_frames="shared")
    calls = count_decodes(monkeypatch)
    item = shared[5]
    reference = single[5]
    assert len(calls) == 2 and calls[0] == calls[1] and len(calls[0]) == 8  # one clip's frames, once
    assert tuple(item["video"].shape) == (3, 3, 8, 24, 24) and item["label"].tolist() == [shared.records[5].label] * 3
    assert torch.equal(item["video"][0], reference["video"])  # clip 0 is the clip_per_video=1 clip
    assert not torch.equal(item["video"][1], item["video"][2])  # the others are augmented on their own
    assert not torch.equal(item["colour"][1], item["colour"][2])
    independent = train_set(synthetic, 3)[5]  # same generators: the augmentation of clip 0 agrees
    assert torch.equal(independent["video"][0], item["video"][0])
    with pytest.raises(ValueError, match="clip_frames must be 'independent' or 'shared'"):
        train_set(synthetic, 2, clip_frames="same")


def test_clip_frames_reaches_the_training_set_from_the_config(synthetic):
    cfg = load_config(None, None, [f"data.root={synthetic}", f"data.train={synthetic / 'train.csv'}",
                                   "data.clips_per_video=2", "data.clip_frames=shared", "data.workers=0"])
    train = build_datasets(cfg, splits=("train",)).train
    assert train.clips_per_video == 2 and train.clip_frames == "shared"


def test_preloaded_clips_equal_clips_from_the_files(synthetic):
    from_files, preloaded = train_set(synthetic, 3), train_set(synthetic, 3)
    preloaded.preload()
    for i in range(len(from_files)):
        assert torch.equal(from_files[i]["video"], preloaded[i]["video"])
        assert torch.equal(from_files[i]["colour"], preloaded[i]["colour"])


def test_a_bad_video_is_replaced_by_one_good_video_for_all_its_clips(synthetic, tmp_path):
    records, _ = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")
    (tmp_path / "bad.mp4").write_text("not a video")
    records = records + [VideoRecord(str(tmp_path / "bad.mp4"), 0)]
    ds = train_set(synthetic, 2, records=records, on_error="skip", bad_files_dir=tmp_path / "bad")
    item = ds[len(records) - 1]
    assert item["index"] != len(records) - 1 and item["video"].shape[0] == 2
    assert item["label"].tolist() == [records[item["index"]].label] * 2
    assert list(ds.bad_videos()) == [str(tmp_path / "bad.mp4")]


def config(synthetic: Path, n: int, batch_size: int) -> Config:
    cfg = load_config(None, None, [f"data.root={synthetic}", f"data.train={synthetic / 'train.csv'}",
                                   f"data.clips_per_video={n}", f"train.batch_size={batch_size}", "data.workers=0"])
    return cfg


def test_an_epoch_visits_every_video_once_in_batches_of_clips(synthetic):
    cfg = config(synthetic, 2, 4)
    ds = train_set(synthetic, 2)
    assert videos_per_batch(cfg) == 2 and train_batches_per_epoch(ds, cfg, world_size=1) == 6
    batches = list(train_loader(ds, cfg, DistEnv(), epoch=0))
    assert len(batches) == 6
    seen = []
    for b in batches:
        assert tuple(b["video"].shape) == (4, 3, 8, 24, 24) and b["label"].shape == (4,)
        idx = b["index"].tolist()
        assert idx[0] == idx[1] and idx[2] == idx[3]  # the clips of one video are consecutive
        seen += idx[::2]
    assert sorted(seen) == list(range(12))
    # two processes with half the batch each cover the same videos, without overlap
    cfg2 = config(synthetic, 2, 2)
    shards = [list(train_loader(ds, cfg2, DistEnv(rank=r, world_size=2), epoch=0)) for r in range(2)]
    per_rank = [[i for b in s for i in b["index"].tolist()[::2]] for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == 6 and sorted(per_rank[0] + per_rank[1]) == list(range(12))
    # resuming at batch 4 gives the same remaining batches
    rest = list(train_loader(ds, cfg, DistEnv(), epoch=0, start_batch=4))
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in batches[4:]]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(rest, batches[4:]))


def test_mixing_works_on_the_flattened_batch(synthetic):
    ds = train_set(synthetic, 2)
    batch = collate_clips([ds[0], ds[1]])
    assert tuple(batch["video"].shape) == (4, 3, 8, 24, 24) and batch["view"].tolist() == [0] * 4
    assert tuple(batch["colour"].shape) == (4, 3, 4) and torch.equal(batch["colour"][2:], ds[1]["colour"])
    video = clips_on_device(batch, ds.transform, torch.device("cpu"))  # what the training step mixes
    mixed, targets = MixupCutmix(num_classes=12)(video, batch["label"], generator=torch.Generator().manual_seed(0))
    assert mixed.shape == video.shape and mixed.dtype == torch.float32 and targets.shape == (4, 12)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_clips_per_video_is_checked(synthetic):
    with pytest.raises(ConfigError, match="clips_per_video must be >= 1"):
        config(synthetic, 0, 4)
    with pytest.raises(ConfigError, match="clip_frames must be 'independent' or 'shared', got 'same'"):
        load_config(None, None, ["data.clip_frames=same"])
    with pytest.raises(ValueError, match="batch_size=6 is not a multiple of data.clips_per_video=4"):
        videos_per_batch(config(synthetic, 4, 6))


# ----------------------------------------------------------------------------- resume after SIGKILL

def tiny(data: Path, out: Path) -> list[str]:
    """A seconds-long run with 2 clips per video and a checkpoint after every update."""
    return tiny_run_args(data, out, "optim.epochs=1", "data.clips_per_video=2", "train.checkpoint_every_steps=1")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_with_two_clips_per_video(tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, 32, 8)
    ref = tmp_path / "uninterrupted"
    done = run_cli("train", *tiny(data, ref), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r["kind"] == "train") == 8  # 32 videos x 2 clips / (4 x 2) per update

    run = tmp_path / "killed"
    proc = start_cli("train", *tiny(data, run))
    kill_when(proc, reached_step(run / "metrics.jsonl", 3), timeout=TIMEOUT, what="step 3")
    assert not (run / "model").exists()
    resumed = run_cli("train", *tiny(data, run), timeout=TIMEOUT)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
