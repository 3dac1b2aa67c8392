"""Frame sampling formulas with known answers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dist_video.data import IntervalSampler, SegmentSampler, build_sampler, interval_indices, segment_indices


def test_segment_centre_single_view():
    # segments of 25 frames: centres 12.5, 37.5, 62.5, 87.5, rounded half to even
    assert segment_indices(100, 4, view=0, num_views=1) == [12, 38, 62, 88]


def test_segment_three_views_formula_and_clamp():
    # start_j + 25 * (v + 1) / 3: 8.33, 16.67, 25 (segment 0) ... 100 clamped to 99 (segment 3)
    views = [segment_indices(100, 4, view=v, num_views=3) for v in range(3)]
    assert views == [[8, 33, 58, 83], [17, 42, 67, 92], [25, 50, 75, 99]]


def test_segment_short_videos_repeat_frames():
    assert segment_indices(3, 8, view=0, num_views=1) == [0, 1, 1, 1, 2, 2, 2, 2]
    assert segment_indices(1, 8, view=0, num_views=1) == [0] * 8
    assert segment_indices(1, 8, rng=torch.Generator().manual_seed(0)) == [0] * 8


def test_segment_train_stays_in_segments_and_covers_them():
    n, t = 32, 4
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = segment_indices(n, t, rng=gen)
        for j, i in enumerate(idx):
            # rounding may reach the first frame of the next segment, never further
            assert j * n // t <= i <= min((j + 1) * n // t, n - 1)
        assert idx == sorted(idx)
        seen.update(idx)
    assert seen == set(range(n))


@pytest.mark.parametrize("make_rng", [lambda s: torch.Generator().manual_seed(s), random.Random,
                                      np.random.default_rng])
def test_train_sampling_is_a_function_of_the_seed(make_rng):
    a = [segment_indices(300, 16, rng=make_rng(5)) for _ in range(2)]
    b = segment_indices(300, 16, rng=make_rng(6))
    assert a[0] == a[1]
    assert a[0] != b
    c = [interval_indices(300, 16, 4, rng=make_rng(5)) for _ in range(2)]
    assert c[0] == c[1]


def test_interval_test_views_known_answers():
    # span = 3 * 5 + 1 = 16, room = 84: one view centred, three views at 0, 42, 84
    assert interval_indices(100, 4, 5, view=0, num_views=1) == [42, 47, 52, 57]
    assert [interval_indices(100, 4, 5, view=v, num_views=3) for v in range(3)] == [
        [0, 5, 10, 15], [42, 47, 52, 57], [84, 89, 94, 99]]


def test_interval_train_has_exact_stride_and_fits():
    gen = torch.Generator().manual_seed(1)
    starts = set()
    for _ in range(300):
        idx = interval_indices(40, 8, 3, rng=gen)
        assert [b - a for a, b in zip(idx, idx[1:])] == [3] * 7
        assert 0 <= idx[0] and idx[-1] <= 39
        starts.add(idx[0])
    assert starts == set(range(0, 40 - 22 + 1))


def test_interval_short_videos_spread_over_the_video():
    assert interval_indices(10, 4, 5, view=0, num_views=1) == [0, 3, 6, 9]
    assert interval_indices(3, 6, 4, view=0, num_views=1) == [0, 0, 1, 1, 2, 2]
    assert interval_indices(1, 4, 2, rng=torch.Generator().manual_seed(0)) == [0, 0, 0, 0]


def test_samplers_and_errors():
    assert SegmentSampler(4)(100, view=0, num_views=1) == [12, 38, 62, 88]
    assert IntervalSampler(4, 5)(100, view=0) == [42, 47, 52, 57]
    assert isinstance(build_sampler("interval", 8, 2), IntervalSampler)
    with pytest.raises(ValueError):
        build_sampler("random", 8)
    with pytest.raises(ValueError):
        segment_indices(0, 8, view=0)
    with pytest.raises(ValueError):
        segment_indices(10, 8, view=3, num_views=3)
