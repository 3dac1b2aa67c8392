"""Baselines: what they train, what they compute, and that they save/load like DiST."""

from __future__ import annotations

import pytest
import torch

from dist_video.baselines import AdapterClassifier, BaselineConfig, FrozenMeanClassifier, FullFinetuneClassifier
from dist_video.classifier import VideoClassifier

CFG = BaselineConfig(num_frames=4, alpha=2, adapter_dim=8)


def swap_sparse_frames(video):
    """The clip with its two CLIP frames (dense frames 0 and 2) in the opposite order."""
    out = video.clone()
    out[:, :, 0], out[:, :, 2] = video[:, :, 2], video[:, :, 0]
    return out


def test_frozen_mean_is_the_average_of_clip_frame_embeddings(tiny_clip):
    clip = tiny_clip(width=64, layers=2)
    model = FrozenMeanClassifier(clip, CFG, clip_dtype="fp32")
    video = torch.randn(2, 3, 4, 64, 64)
    z = model.encode_video(video)
    with torch.no_grad():
        f0 = clip.encode_image(video[:, :, 0])
        f2 = clip.encode_image(video[:, :, 2])
    torch.testing.assert_close(z, (f0 + f2) / 2, atol=1e-5, rtol=0)
    assert model.trainable_parameters() == []
    # frame order cannot matter
    torch.testing.assert_close(model.encode_video(swap_sparse_frames(video)), z, atol=1e-5, rtol=0)


def test_full_finetune_trains_the_image_tower_only(tiny_clip):
    model = FullFinetuneClassifier(tiny_clip(width=64, layers=2), CFG)
    model.set_linear_head(3)
    names = {n for n, _ in model.trainable_parameters()}
    assert any(n.startswith("clip.visual.") for n in names) and "head.weight" in names
    assert not any(n.startswith("clip.transformer.") or n == "clip.logit_scale" for n in names)
    model(torch.randn(2, 3, 4, 64, 64)).sum().backward()
    assert model.clip.visual.conv1.weight.grad is not None


def test_adapter_starts_as_clip_and_backpropagates_through_it(tiny_clip):
    clip = tiny_clip(width=64, layers=2)
    model = AdapterClassifier(clip, CFG, clip_dtype="fp32")
    video = torch.randn(2, 3, 4, 64, 64)
    mean = FrozenMeanClassifier(clip, CFG, clip_dtype="fp32")
    torch.testing.assert_close(model.encode_video(video), mean.encode_video(video), atol=1e-5, rtol=0)
    model.set_linear_head(3)
    with torch.no_grad():
        for a in model.adapters:
            a.up.weight.normal_(0, 0.1)
    model(video).sum().backward()
    names = {n for n, _ in model.trainable_parameters()}
    assert names and all(n.startswith(("adapters.", "head.")) for n in names)
    assert model.adapters[0].down.weight.grad.abs().sum() > 0  # reached through CLIP's blocks
    assert all(p.grad is None for p in model.clip.parameters())
    # the adapters see time: reversing the frames changes the embedding
    assert not torch.allclose(model.encode_video(swap_sparse_frames(video)), model.encode_video(video), atol=1e-4)


@pytest.mark.parametrize("cls", [FrozenMeanClassifier, FullFinetuneClassifier, AdapterClassifier])
def test_baselines_save_and_load(cls, tmp_path, tiny_clip):
    model = cls(tiny_clip(width=64, layers=2), CFG, clip_dtype="fp32").eval()
    model.set_linear_head(3, ["a", "b", "c"])
    with torch.no_grad():
        model.head.weight.normal_()
    video = torch.randn(1, 3, 4, 64, 64)
    model.save_pretrained(tmp_path / "m")
    loaded = VideoClassifier.from_pretrained(tmp_path / "m", clip_dtype="fp32").eval()
    assert type(loaded) is cls and loaded.class_names == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model(video), atol=1e-5, rtol=0)
