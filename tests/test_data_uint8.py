"""Loader workers ship uint8 clips (issue 16, finding 7): the transforms' uint8 step runs in the
workers, colour jitter, grayscale and normalisation run on the batch on the device, and the
float clips are the ones the one-step float path gave.

``assets/transforms-float-path.pt`` holds the float clips of the float path as it was before
the split (commit e30ff91: ``TrainTransform(crop_size=8, flip_labels=[1, 0, 2])(coded_clip(),
label=0, generator=seed)`` for seeds 0-11, the generator's next ``torch.rand`` float64 draw after
each call, and ``TestTransform(crop_size=8, short_side=10, num_crops=3)``'s three crops)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dist_video.config import load_config
from dist_video.data import MixupCutmix, SegmentSampler, TestTransform, TrainTransform, VideoClipDataset, parse_csv
from dist_video.data.transforms import CLIP_MEAN, CLIP_STD, normalize_clips
from dist_video.engine.data import build_datasets, clips_on_device, train_loader
from dist_video.engine.train import train
from dist_video.engine.distributed import DistEnv

from data_helpers import tiny_run_args

FLOAT_PATH = Path(__file__).parent / "assets" / "transforms-float-path.pt"


def coded_clip() -> torch.Tensor:
    """4 frames of 20 x 28 with distinct, deterministic values in every channel."""
    t, h, w = torch.meshgrid(torch.arange(4), torch.arange(20), torch.arange(28), indexing="ij")
    return torch.stack([(t * 29 + h * 11 + w * 7) % 256, (200 - t * 13 + h * h * 3 + w * 5) % 256,
                        (t * 61 + (h * w) % 97 + 40) % 256], dim=-1).to(torch.uint8)


@pytest.fixture(scope="module")
def synthetic(synthetic_videos) -> Path:
    return synthetic_videos(16, 4)


def batch_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def test_a_worker_ships_a_quarter_of_the_float32_bytes(synthetic):
    records, names = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")
    cfg = load_config(None, None, [f"data.root={synthetic}", f"data.train={synthetic / 'train.csv'}",
                                   "data.clips_per_video=2", "train.batch_size=4", "data.workers=1"])
    for clips_per_video in (1, 2):
        ds = VideoClipDataset(records, sampler=SegmentSampler(8), transform=TrainTransform(crop_size=32),
                              training=True, class_names=names, clips_per_video=clips_per_video)
        if clips_per_video == 1:
            loader = DataLoader(ds, batch_size=4, num_workers=1)
        else:
            loader = train_loader(ds, cfg, DistEnv(), epoch=0)  # one worker, collate_clips
        batch = next(iter(loader))
        video = batch["video"]
        assert video.dtype == torch.uint8 and tuple(video.shape) == (4, 3, 8, 32, 32)
        float32_bytes = video.numel() * 4  # what a float32 clip batch took
        assert batch_bytes(batch) <= 0.26 * float32_bytes  # everything the worker sent: clips, colour maps, labels
        assert tuple(batch["colour"].shape) == (4, 3, 4)
    test = VideoClipDataset(records, sampler=SegmentSampler(8), transform=TestTransform(crop_size=32, short_side=32),
                            training=False, num_views=2)
    batch = next(iter(DataLoader(test, batch_size=4, num_workers=1)))
    assert batch["video"].dtype == torch.uint8 and "colour" not in batch
    assert batch_bytes(batch) <= 0.26 * batch["video"].numel() * 4


def test_normalised_batches_equal_the_float_path_clip_by_clip():
    reference = torch.load(FLOAT_PATH, weights_only=True)
    clip = coded_clip()
    transform = TrainTransform(crop_size=8, flip_labels=[1, 0, 2])
    frames, colours, labels, draws = [], [], [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        f, colour, label = transform.geometry(clip, label=0, generator=g)
        assert f.dtype == torch.uint8 and tuple(f.shape) == (3, 4, 8, 8) and tuple(colour.shape) == (3, 4)
        frames.append(f)
        colours.append(colour)
        labels.append(label)
        draws.append(torch.rand(1, generator=g, dtype=torch.float64).item())
    colours = torch.stack(colours)
    # the reference covers clips without colour change, with jitter, with grayscale, flipped or not
    identity = [bool(torch.equal(c, torch.eye(3, 4))) for c in colours]
    grey = [bool(torch.allclose(c[0], c[1]) and torch.allclose(c[1], c[2])) for c in colours]
    assert any(identity) and any(grey) and not all(a or b for a, b in zip(identity, grey))
    assert set(labels) == {0, 1}
    assert labels == reference["train_labels"] and draws == reference["draw_after"]  # the same random draws
    batch = normalize_clips(torch.stack(frames), transform.mean, transform.std, colours)  # one batch, 12 colour maps
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, reference["train"], atol=1e-6, rtol=1e-6)
    for seed in range(12):  # the one-step call is the same computation
        video, label = transform(clip, label=0, generator=torch.Generator().manual_seed(seed))
        assert label == labels[seed] and torch.equal(video, batch[seed])

    test = TestTransform(crop_size=8, short_side=10, num_crops=3)
    crops = [test.geometry(clip, crop=c) for c in range(3)]
    assert all(colour is None for _, colour, _ in crops)
    batch = test.normalize(torch.stack([f for f, _, _ in crops]))
    torch.testing.assert_close(batch, reference["test"], atol=1e-6, rtol=1e-6)
    assert torch.equal(test(clip, crop=2)[0], batch[2])


def test_normalize_clips_checks_its_inputs():
    clips = torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 clips"):
        normalize_clips(clips.float(), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="colour maps 2 x 3 x 4"):
        normalize_clips(clips, (0.5,) * 3, (0.5,) * 3, torch.eye(3, 4)[None])
    # identity colour maps give the test clips' normalisation
    out = normalize_clips(clips + 255, (0.5,) * 3, (0.25,) * 3, torch.eye(3, 4).expand(2, 3, 4))
    assert torch.equal(out, torch.full_like(out, 2.0))
    with pytest.raises(ValueError, match="out must be float32"):
        normalize_clips(clips, (0.5,) * 3, (0.5,) * 3, out=torch.empty(2, 3, 4, 8, 8, dtype=torch.float64))


def test_normalize_clips_into_a_reused_buffer_gives_the_same_values():
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (3, 3, 4, 8, 8), dtype=torch.uint8, generator=g)
    colour = torch.cat([torch.rand(3, 3, 3, generator=g), torch.rand(3, 3, 1, generator=g) - 0.5], dim=2)
    for maps in (None, colour):
        want = normalize_clips(clips, CLIP_MEAN, CLIP_STD, maps)
        buffer = torch.full(clips.shape, float("nan"))
        got = normalize_clips(clips, CLIP_MEAN, CLIP_STD, maps, out=buffer)
        assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, want)


def test_the_training_step_mixes_the_clips_normalised_on_the_device(synthetic, tmp_path, monkeypatch):
    args = tiny_run_args(synthetic, tmp_path / "run", "train.max_steps=1", "train.accumulation=1",
                         "data.clips_per_video=2", "train.precision=fp32", "model.clip_dtype=fp32")
    sets = [a for a in args[3:] if a != "--set"]
    cfg = load_config(None, None, [*sets, f"output_dir={tmp_path / 'run'}"])
    mixed_inputs = []
    real_mix = MixupCutmix.__call__

    def mix(self, video, labels, **kw):
        mixed_inputs.append(video.detach().clone())
        return real_mix(self, video, labels, **kw)

    monkeypatch.setattr(MixupCutmix, "__call__", mix)
    result = train(cfg, resume=False, progress=False)
    assert result.status == "max_steps" and len(mixed_inputs) == 1
    video = mixed_inputs[0]
    assert video.dtype == torch.float32 and tuple(video.shape) == (4, 3, 8, 32, 32)
    # what the float path gives for the same items: each clip's colour map, then mean and std
    dataset = build_datasets(cfg, splits=("train",), verbose=False).train
    first = next(iter(train_loader(dataset, cfg, DistEnv(), epoch=0)))
    assert first["video"].dtype == torch.uint8
    expected = torch.stack([dataset.transform.normalize(v[None], c[None])[0]
                            for v, c in zip(first["video"], first["colour"])])
    torch.testing.assert_close(video, expected, atol=1e-6, rtol=1e-6)
    plain = clips_on_device({"video": first["video"]}, TestTransform(crop_size=32, short_side=32), torch.device("cpu"))
    assert not torch.allclose(video, plain, atol=1e-3)  # the colour maps were applied
