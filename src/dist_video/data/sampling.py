"""Which frames of a video make a clip: segment-based and interval-based sampling.

Both return ``num_frames`` (T) frame indices, the *dense* frames the temporal encoder sees;
the model itself picks every alpha-th of them for CLIP. ``view=None`` draws a random
training clip; ``view=v`` of ``num_views=V`` gives the deterministic v-th test view.
Videos shorter than T frames (even a single frame) give repeated indices, never an error.

Randomness comes only from the ``rng`` passed in (``torch.Generator``, ``random.Random`` or
``numpy.random.Generator``; ``None`` uses torch's global generator), so a clip is a function
of its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

__all__ = ["Rng", "uniform", "randint", "segment_indices", "interval_indices", "SegmentSampler",
           "IntervalSampler", "build_sampler"]

Rng = Union[torch.Generator, random.Random, np.random.Generator, None]


def uniform(rng: Rng, size: int) -> list[float]:
    """``size`` floats uniform in [0, 1) from ``rng``."""
    if isinstance(rng, random.Random):
        return [rng.random() for _ in range(size)]
    if isinstance(rng, np.random.Generator):
        return rng.random(size).tolist()
    return torch.rand(size, generator=rng, dtype=torch.float64).tolist()


def randint(rng: Rng, low: int, high: int) -> int:
    """An integer uniform in [low, high] (both inclusive) from ``rng``."""
    if high < low:
        raise ValueError(f"empty range [{low}, {high}]")
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return int(torch.randint(low, high + 1, (1,), generator=rng).item())


def _check(num_video_frames: int, num_frames: int, view: int | None, num_views: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"cannot sample from a video with {num_video_frames} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if view is not None and not 0 <= view < num_views:
        raise ValueError(f"view {view} out of range for {num_views} views")


def segment_indices(num_video_frames: int, num_frames: int, *, view: int | None = None,
                    num_views: int = 1, rng: Rng = None) -> list[int]:
    """Segment-based sampling (TSN style, as in DiST).

    The video's N frames are cut into T equal segments ``[start_j, end_j)`` with
    ``start_j = j * N / T``. Training (``view=None``): one uniformly random position in each
    segment. Test view v of V: ``start_j + (end_j - start_j) * (v + 1) / V``, except V = 1
    which takes the segment centre ``(start_j + end_j) / 2`` (the authors' code does the
    same). Positions are clamped to ``[0, N - 1]`` and rounded (half to even), so e.g.
    N=100, T=4, V=1 gives ``[12, 38, 62, 88]``."""
    _check(num_video_frames, num_frames, view, num_views)
    n, t = num_video_frames, num_frames
    if view is None:
        offsets = uniform(rng, t)
    elif num_views == 1:
        offsets = [0.5] * t
    else:
        offsets = [(view + 1) / num_views] * t
    out = []
    for j, u in enumerate(offsets):
        start, end = j * n / t, (j + 1) * n / t
        position = min(max(start + (end - start) * u, 0.0), n - 1.0)
        out.append(int(round(position)))
    return out


def interval_indices(num_video_frames: int, num_frames: int, stride: int, *, view: int | None = None,
                     num_views: int = 1, rng: Rng = None) -> list[int]:
    """Interval-based sampling: T frames ``stride`` apart, ``start + k * stride``.

    The clip spans ``L = (T - 1) * stride + 1`` frames; its start is uniform in
    ``[0, N - L]`` for training; test views are evenly placed: ``round((N - L) * v / (V - 1))``
    (V = 1: the centred clip, ``(N - L) // 2``). A video shorter than L frames gives T indices
    evenly spread over the whole video, ``round(k * (N - 1) / (T - 1))`` (repeats when N < T)."""
    _check(num_video_frames, num_frames, view, num_views)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n, t = num_video_frames, num_frames
    span = (t - 1) * stride + 1
    if span > n:
        if t == 1:
            return [(n - 1) // 2 if view is not None else randint(rng, 0, n - 1)]
        return [int(round(k * (n - 1) / (t - 1))) for k in range(t)]
    room = n - span
    if view is None:
        start = randint(rng, 0, room)
    elif num_views == 1:
        start = room // 2
    else:
        start = int(round(room * view / (num_views - 1)))
    return [start + k * stride for k in range(t)]


@dataclass(frozen=True)
class SegmentSampler:
    """Segment-based sampling of ``num_frames`` frames (see :func:`segment_indices`)."""

    num_frames: int

    def __call__(self, num_video_frames: int, *, view: int | None = None, num_views: int = 1,
                 rng: Rng = None) -> list[int]:
        return segment_indices(num_video_frames, self.num_frames, view=view, num_views=num_views, rng=rng)


@dataclass(frozen=True)
class IntervalSampler:
    """Interval-based sampling of ``num_frames`` frames ``stride`` apart (see :func:`interval_indices`)."""

    num_frames: int
    stride: int

    def __call__(self, num_video_frames: int, *, view: int | None = None, num_views: int = 1,
                 rng: Rng = None) -> list[int]:
        return interval_indices(num_video_frames, self.num_frames, self.stride, view=view,
                                num_views=num_views, rng=rng)


def build_sampler(kind: str, num_frames: int, stride: int = 4) -> SegmentSampler | IntervalSampler:
    """``"segment"`` -> :class:`SegmentSampler`, ``"interval"`` -> :class:`IntervalSampler`."""
    if kind == "segment":
        return SegmentSampler(num_frames)
    if kind == "interval":
        return IntervalSampler(num_frames, stride)
    raise ValueError(f"unknown sampling {kind!r}; choose 'segment' or 'interval'")
