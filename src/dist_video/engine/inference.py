"""What prediction, timelines and embedding need from the model they are given.

An inference model is anything callable on float32 clips B x 3 x T x H x W (CLIP-normalised)
that returns logits B x C, with attributes ``class_names`` (or None), ``num_classes`` and
``config.num_frames`` (``encode_video`` B x 3 x T x H x W -> B x E for embeddings): a
model's fused form (``model.fuse()``), or a runner with no torch module inside (e.g. an ONNX
session). Nothing here asks it for parameters.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from ..data.datasets import load_test_clips
from ..data.decoding import VideoDecodeError
from ..data.sampling import build_sampler
from ..data.transforms import TestTransform

__all__ = ["model_device", "class_names_of", "error_message", "check_finite", "NonFiniteOutputError", "FILE_ERRORS",
           "TestClips", "read_test_clips", "read_ahead"]

Item = TypeVar("Item")
Read = TypeVar("Read")

#: What a bad video file raises while it is read and classified (anything else propagates).
FILE_ERRORS = (VideoDecodeError, ValueError, OSError, RuntimeError)


class NonFiniteOutputError(ArithmeticError):
    """The model computed NaN or infinite outputs: a fault of the model (e.g. damaged weights),
    not of the file it was given, so it is not one of :data:`FILE_ERRORS`."""


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` unchanged, or :class:`NonFiniteOutputError` when any is NaN or infinite."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteOutputError(f"the model's {what} are not finite (NaN or infinity): its weights are "
                                   "damaged or overflow in this precision")
    return values


def model_device(model) -> torch.device:
    """Where ``model`` computes: its ``device`` attribute, else its first buffer or parameter,
    else the CPU (a runner that holds no torch tensors)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    for tensors in (getattr(model, "buffers", None), getattr(model, "parameters", None)):
        if callable(tensors):
            for t in tensors():
                return t.device
    return torch.device("cpu")


def class_names_of(model) -> list[str]:
    """The model's class names, or ``"0" .. "C-1"`` when it has none."""
    names = getattr(model, "class_names", None)
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def error_message(error: BaseException) -> str:
    """The cause of a per-file error on one line (without the path a VideoDecodeError repeats)."""
    text = error.cause if isinstance(error, VideoDecodeError) else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]


class _GeometryOnly(TestTransform):
    """A :class:`TestTransform` whose call stops at the uint8 step (:meth:`TestTransform.geometry`)."""

    def __call__(self, clip, *, label: int = -1, generator=None, crop: int = 0) -> tuple[torch.Tensor, int]:
        frames, _, label = self.geometry(clip, label=label, crop=crop)
        return frames, label


@dataclass
class TestClips:
    """One file's test clips as decoded: ``clips`` uint8 (views x crops) x 3 x T x S x S, and
    the ``transform`` whose ``normalize`` makes them the model's float input."""

    __test__ = False

    clips: torch.Tensor
    transform: TestTransform

    def on(self, device: torch.device) -> torch.Tensor:
        """The float32 clips on ``device``: the uint8 clips are copied there (a quarter of the
        bytes of float clips) and normalised there, as training batches are."""
        return self.transform.normalize(self.clips.to(device, non_blocking=True))


def read_test_clips(path: str | os.PathLike, preprocess: dict, *, num_frames: int, views: int | None = None,
                    pin: bool = False, cancel: threading.Event | None = None) -> TestClips:
    """The test clips of one file under a model's recorded preprocessing, left uint8 (their
    :meth:`TestClips.on` equals :func:`dist_video.engine.data.test_clips_of_file`). ``pin``:
    in page-locked memory, for an asynchronous copy to a GPU. ``cancel``: a set event stops the
    decoding (:class:`~dist_video.data.decoding.Cancelled`)."""
    p = preprocess
    transform = _GeometryOnly(crop_size=p["crop_size"], short_side=p["test_scale"], num_crops=p["num_crops"],
                              mean=tuple(p["mean"]), std=tuple(p["std"]))
    clips = load_test_clips(path, sampler=build_sampler(p["sampling"], num_frames, p.get("interval", 4)),
                            transform=transform, num_views=views or p["num_views"], num_crops=p["num_crops"],
                            cancel=cancel)
    return TestClips(clips.pin_memory() if pin else clips, transform)


def read_ahead(items: Iterable[Item], read: Callable[[Item], Read], *, depth: int = 1
               ) -> Iterator[tuple[Item, Future]]:
    """``(item, future of read(item))`` for each item, in order, while one background thread
    reads the next ``depth`` items during the caller's work on the one handed out (so at most
    ``depth + 1`` reads are held at once). ``future.result()`` returns the read or raises what it raised, so a failed
    read stays its item's error. Closing the generator (use ``contextlib.closing``; also on an
    exception or Ctrl-C in the caller) cancels the reads not started and waits for the one
    running: the thread is gone when it returns."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-video-read-ahead")
    items = iter(items)
    pending: deque[tuple[Item, Future]] = deque((item, pool.submit(read, item)) for item in islice(items, depth + 1))
    try:
        while pending:
            item, future = pending.popleft()
            yield item, future
            pending.extend((nxt, pool.submit(read, nxt)) for nxt in islice(items, 1))
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
