"""Clip transforms and batch mixing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_video.data import (CLIP_MEAN, CLIP_STD, MixupCutmix, TestTransform, TrainTransform, flip_label_map,
                             one_hot_smoothed, soft_target_cross_entropy)
from dist_video.data.transforms import color_jitter_matrix, random_resized_crop_box

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1, 1)


def unnormalize(video: torch.Tensor) -> torch.Tensor:
    return video * STD + MEAN


def textured_clip(t=6, h=90, w=120, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


def test_train_transform_shapes_and_same_crop_on_every_frame():
    frame = textured_clip(t=1)
    clip = frame.expand(8, -1, -1, -1).contiguous()  # 8 identical frames
    tr = TrainTransform(crop_size=32)
    for seed in range(10):
        video, label = tr(clip, label=3, generator=torch.Generator().manual_seed(seed))
        assert video.dtype == torch.float32 and tuple(video.shape) == (3, 8, 32, 32)
        assert label == 3
        # identical input frames stay identical: crop, flip and colours are shared by the clip
        assert torch.equal(video, video[:, :1].expand_as(video))


def test_train_crop_follows_the_clip_in_time():
    # a clip whose frames differ only by a constant: the same crop keeps the difference constant
    clip = torch.stack([torch.full((48, 64, 3), v, dtype=torch.uint8) for v in (60, 100, 140)])
    clip[:, 10:40, 10:40] += 50
    tr = TrainTransform(crop_size=24, color_jitter_p=0.0, grayscale_p=0.0, flip=False)
    video, _ = tr(clip, generator=torch.Generator().manual_seed(3))
    raw = unnormalize(video)
    d1, d2 = raw[:, 1] - raw[:, 0], raw[:, 2] - raw[:, 1]
    assert torch.allclose(d1, torch.full_like(d1, 40 / 255), atol=2 / 255)
    assert torch.allclose(d2, torch.full_like(d2, 40 / 255), atol=2 / 255)


def test_random_resized_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(256, 340, (0.4, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 340
        assert 0.39 * 256 * 340 <= h * w <= 256 * 340
        assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03


def test_no_augmentation_is_plain_resize_and_normalisation():
    clip = torch.full((4, 20, 20, 3), 128, dtype=torch.uint8)
    tr = TrainTransform(crop_size=10, color_jitter_p=0.0, grayscale_p=0.0)
    video, _ = tr(clip, generator=torch.Generator().manual_seed(0))
    expected = ((128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(3, 1, 1, 1)
    assert torch.allclose(video, expected.expand_as(video), atol=1e-5)


def test_grayscale_probability_one_gives_grey_clips():
    tr = TrainTransform(crop_size=16, color_jitter_p=0.0, grayscale_p=1.0)
    raw = unnormalize(tr(textured_clip(), generator=torch.Generator().manual_seed(1))[0])
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_colour_jitter_matrices():
    mean = torch.tensor([0.5, 0.4, 0.3])
    m, b = color_jitter_matrix(1.0, 1.0, 1.0, 0.0, order=[0, 1, 2, 3], mean_rgb=mean, grayscale=False)
    assert torch.allclose(m, torch.eye(3, dtype=m.dtype)) and torch.allclose(b, torch.zeros(3, dtype=b.dtype))
    m, b = color_jitter_matrix(1.2, 1.0, 1.0, 0.0, order=[0], mean_rgb=mean, grayscale=False)
    assert torch.allclose(m, 1.2 * torch.eye(3, dtype=m.dtype))
    # contrast 0 maps everything to the clip's mean grey
    m, b = color_jitter_matrix(1.0, 0.0, 1.0, 0.0, order=[1], mean_rgb=mean, grayscale=False)
    grey = 0.299 * 0.5 + 0.587 * 0.4 + 0.114 * 0.3
    x = torch.rand(3, dtype=torch.float64)
    assert torch.allclose(m @ x + b, torch.full((3,), grey, dtype=torch.float64))
    # saturation 0 is grey; hue rotations keep grey colours grey and the luma unchanged
    m, b = color_jitter_matrix(1.0, 1.0, 0.0, 0.0, order=[2], mean_rgb=mean, grayscale=False)
    y = m @ x + b
    assert torch.allclose(y, y[:1].expand(3))
    m, b = color_jitter_matrix(1.0, 1.0, 1.0, 0.1, order=[3], mean_rgb=mean, grayscale=False)
    assert torch.allclose(m @ torch.full((3,), 0.4, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64))
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    assert torch.allclose(luma @ (m @ x), luma @ x, atol=1e-3)
    # without intermediate clamping the four operations commute: any order gives the same map
    maps = [color_jitter_matrix(1.3, 0.7, 0.5, 0.08, order=o, mean_rgb=mean, grayscale=False)
            for o in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2])]
    for m_, b_ in maps[1:]:
        assert torch.allclose(m_, maps[0][0]) and torch.allclose(b_, maps[0][1])


def test_hue_shift_direction_matches_hsv():
    import colorsys
    m, b = color_jitter_matrix(1.0, 1.0, 1.0, 0.05, order=[3], mean_rgb=torch.zeros(3), grayscale=False)
    red = torch.tensor([0.8, 0.2, 0.2], dtype=torch.float64)
    hue = colorsys.rgb_to_hsv(*(m @ red + b).clamp(0, 1).tolist())[0]
    assert 0.02 < hue < 0.09  # moved from red towards yellow by about 0.05 turns


def test_test_transform_three_crops_along_the_long_side():
    clip = torch.zeros((2, 60, 180, 3), dtype=torch.uint8)
    clip[:, :, :60, 0] = 255     # left third red
    clip[:, :, 60:120, 1] = 255  # centre green
    clip[:, :, 120:, 2] = 255    # right third blue
    tt = TestTransform(crop_size=30, short_side=30, num_crops=3)
    for crop, channel in enumerate([0, 1, 2]):
        video, label = tt(clip, crop=crop, label=5)
        assert tuple(video.shape) == (3, 2, 30, 30) and label == 5
        raw = unnormalize(video).mean(dim=(1, 2, 3))
        assert raw.argmax().item() == channel and raw[channel] > 0.95
    portrait = clip.transpose(1, 2).contiguous()  # 180 x 60: crops move down
    raw = unnormalize(TestTransform(crop_size=30, short_side=30, num_crops=3)(portrait, crop=2)[0])
    assert raw.mean(dim=(1, 2, 3)).argmax().item() == 2


def test_test_transform_resizes_short_side_then_centre_crops():
    clip = textured_clip(t=3, h=64, w=96)
    video, _ = TestTransform(crop_size=32, short_side=32)(clip)
    # reference: resize the whole frame to 32 x 48, then take the centre 32 x 32
    ref = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=(32, 48), mode="bilinear",
                        align_corners=False, antialias=True)[..., 8:40]
    ref = ((ref / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
    assert (video.permute(1, 0, 2, 3) - ref).abs().mean() < 0.03


def test_flip_label_map_for_ssv2_names():
    names = ["Pushing something from left to right", "Pushing something from right to left",
             "Moving something up", "Turning the camera left while filming something",
             "Turning the camera right while filming something", "Putting something on the left edge",
             "Left-handed waving"]
    assert flip_label_map(names) == [1, 0, 2, 4, 3, None, None]


def test_flip_swaps_labels_and_image():
    clip = torch.zeros((2, 16, 16, 3), dtype=torch.uint8)
    clip[:, :, 8:] = 255  # right half white
    flips = [1, 0, None]  # class 0 <-> 1; class 2 has no mirrored class
    tr = TrainTransform(crop_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_labels=flips,
                        color_jitter_p=0.0, grayscale_p=0.0)
    outcomes = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        video, label = tr(clip, label=0, generator=g)
        left_bright = unnormalize(video)[:, :, :, :8].mean() > 0.5
        assert label == (1 if left_bright else 0)  # flipped image <=> swapped label
        outcomes.add(bool(left_bright))
        video2, label2 = tr(clip, label=2, generator=torch.Generator().manual_seed(seed))
        assert label2 == 2 and unnormalize(video2)[:, :, :, :8].mean() < 0.5  # never flipped
    assert outcomes == {True, False}


def test_mixup_targets_match_the_mixing_coefficient():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(4, 3, 2, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    mixer = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    mixed, targets = mixer(video, labels, generator=torch.Generator().manual_seed(1))
    lam = mixer.last_lam
    assert mixer.last_mode == "mixup" and 0 < lam < 1
    assert torch.allclose(mixed, lam * video + (1 - lam) * video.flip(0), atol=1e-6)
    smooth = one_hot_smoothed(labels, 5, 0.1)
    assert torch.allclose(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_cutmix_box_is_shared_by_all_frames_and_sets_lambda():
    b, t, h, w = 4, 5, 20, 24
    video = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 3, t, h, w).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    mixer = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    for seed in range(10):
        mixed, targets = mixer(video, labels, generator=torch.Generator().manual_seed(seed))
        assert mixer.last_mode == "cutmix"
        pasted = mixed[0] != video[0]                  # 3 x T x H x W
        assert torch.equal(pasted, pasted[:1, :1].expand_as(pasted))  # same box on every frame/channel
        kept = 1 - pasted[0, 0].float().mean().item()
        assert math.isclose(mixer.last_lam, kept, abs_tol=1e-6)
        assert torch.allclose(targets[0], torch.tensor([kept, 0, 0, 1 - kept]), atol=1e-6)
        assert torch.allclose(targets.sum(1), torch.ones(b))


def test_switching_and_label_smoothing_only():
    labels = torch.tensor([1, 0])
    video = torch.randn(2, 3, 2, 8, 8)
    mixer = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, num_classes=3)
    modes = {mixer(video, labels, generator=torch.Generator().manual_seed(s)) and mixer.last_mode for s in range(30)}
    assert modes == {"mixup", "cutmix"}
    plain = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=4)
    out, targets = plain(video, labels)
    assert out is video
    assert torch.allclose(targets[0], torch.tensor([0.025, 0.925, 0.025, 0.025]))


def test_soft_target_cross_entropy_equals_hard_cross_entropy_for_one_hot():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.allclose(soft_target_cross_entropy(logits, F.one_hot(labels, 5).float()),
                          F.cross_entropy(logits, labels))


def test_a_clip_given_as_frames_gives_the_same_clip_as_one_tensor():
    """The dataset hands the transforms decoded frames one by one (only their crops are copied):
    the same pixels and the same random draws as the stacked clip."""
    clip = torch.randint(0, 256, (6, 30, 41, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = torch.zeros(6, 30, 48, 3, dtype=torch.uint8)
    padded[:, :, :41] = clip
    frames = [padded[i, :, :41] for i in range(6)]  # strided views, as decoded frames with line padding are
    train = TrainTransform(crop_size=16)
    for seed in range(6):
        a = train.geometry(clip, label=1, generator=torch.Generator().manual_seed(seed))
        b = train.geometry(frames, label=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    test = TestTransform(crop_size=16, short_side=20, num_crops=3)
    for crop in range(3):
        assert torch.equal(test.geometry(clip, crop=crop)[0], test.geometry(frames, crop=crop)[0])
    with pytest.raises(ValueError, match="one size"):
        train.geometry([frames[0], frames[1][:20]])
    with pytest.raises(ValueError, match="no frames"):
        test.geometry([])
