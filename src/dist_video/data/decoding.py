"""Exact, frame-indexed video decoding.

``read_frames(path, [i, j, ...])`` returns the i-th, j-th, ... frames *in presentation order*,
exactly, for anything FFmpeg reads. Index i is defined as the i-th frame the decoder outputs
when the whole stream is decoded from the start; every shortcut a backend takes (seeking,
skipping the decoding of frames nobody asked for) is checked against that definition while
it runs and falls back to plain sequential decoding when a check fails.

How a file is indexed (:func:`probe`): :mod:`.frame_index`. How frames are read: one unit per
backend, chosen by name from ``READERS`` (:mod:`.backends.pyav_reader`, the default;
:mod:`.backends.decord_reader`; :mod:`.backends.torchcodec_reader`).

Bad files raise :class:`VideoDecodeError` (message: ``"<path>: <cause>"``). Requested indices
at or beyond the number of decodable frames are clamped to the last decodable frame: when a
file turns out to hold fewer decodable frames than its index said (e.g. a truncated file
whose metadata lied), the file is re-counted by decoding, the cache is corrected, a
``RuntimeWarning`` names the file, and the missing indices get the last decodable frame.

Limits (:class:`DecodeLimits`, ``limits=``): the frame area and the bytes a read returns are
checked from the index before a frame is decoded. ``max_short_side=S`` downscales frames whose
short side is longer than S while they are converted to RGB (FFmpeg's bilinear scaler, one
pass from the decoded YUV frame), so no full-size RGB frame is made: for the test protocol,
which resizes the short side to its test scale anyway.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Sequence

import av
import numpy as np
import torch

from .backends import decord_reader, pyav_reader, torchcodec_reader
from .frame_index import (DEFAULT_LIMITS, ONE_FRAME_PER_PACKET, SEEK_GAP, STATS, THREADING_MIN_PIXELS,
                          BackendUnavailableError, Cancelled, DecodeLimits, FrameIndex, VideoDecodeError, VideoInfo,
                          clear_probe_cache, decoded_frames, decoder_threads, ffmpeg_message, get_index, probe,
                          video_stream)

__all__ = [
    "VideoInfo",
    "VideoDecodeError",
    "Cancelled",
    "BackendUnavailableError",
    "DecodeLimits",
    "DEFAULT_LIMITS",
    "probe",
    "read_frames",
    "read_frame_list",
    "scaled_size",
    "video_stream",
    "decoded_frames",
    "available_backends",
    "clear_probe_cache",
    "decoder_threads",
    "BACKENDS",
    "READERS",
    "ONE_FRAME_PER_PACKET",
    "SEEK_GAP",
    "STATS",
    "THREADING_MIN_PIXELS",
]

Reader = Callable[[str, list[int], FrameIndex, int, tuple[int, int], threading.Event | None],
                  dict[int, np.ndarray]]

#: Backend name -> reader: ``reader(path, wanted, index, threads, (width, height), cancel)`` returns
#: the frames ``wanted`` (ascending, distinct) as uint8 RGB arrays of that size, index -> frame;
#: it raises :class:`Cancelled` once it sees ``cancel`` set (None: never).
READERS: dict[str, Reader] = {
    "pyav": pyav_reader.read,
    "decord": decord_reader.read,
    "torchcodec": torchcodec_reader.read,
}
BACKENDS = tuple(READERS)
#: Optional backends -> their loader (raises :class:`BackendUnavailableError` saying what to install).
_LOADERS = {"decord": decord_reader.load, "torchcodec": torchcodec_reader.load}


def available_backends() -> list[str]:
    """Backends that can be imported here (``"pyav"`` always)."""
    names = ["pyav"]
    for name, load in _LOADERS.items():
        try:
            load()
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def scaled_size(width: int, height: int, max_short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side brought down to ``max_short_side`` (aspect kept,
    rounded, never enlarged); unchanged for None or a short side already within it."""
    short = min(width, height)
    if max_short_side is None or short <= max_short_side:
        return width, height
    if max_short_side < 1:
        raise ValueError(f"max_short_side must be >= 1, got {max_short_side}")
    scale = max_short_side / short
    if width <= height:
        return max_short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_short_side


def read_frames(path: str | os.PathLike, indices: Sequence[int], backend: str | None = None, *,
                threads: int | None = None, max_short_side: int | None = None,
                limits: DecodeLimits | None = DEFAULT_LIMITS, cancel: threading.Event | None = None) -> torch.Tensor:
    """Frames ``indices`` (presentation order, any order, repeats allowed) of a video file.

    Returns a ``torch.uint8`` tensor ``len(indices) x H x W x 3`` (RGB). Indices at or beyond
    the decodable frame count are clamped to the last decodable frame (see the module
    docstring). ``backend``: ``"pyav"`` (default), ``"decord"`` or ``"torchcodec"``;
    ``threads``: decoder threads (default: :func:`decoder_threads`); ``max_short_side``:
    downscale while decoding (see :func:`scaled_size`); ``limits``: see :class:`DecodeLimits`
    (here every index counts, as the frames are stacked; None: no limit); ``cancel``: an event
    the decoding loop checks (PyAV: before each packet; decord, torchcodec: between batches of
    frames), raising :class:`Cancelled` once it is set.
    Raises :class:`VideoDecodeError` for a bad file or one over a limit, ``ValueError`` for
    negative indices."""
    if limits is not None and limits.max_decoded_bytes is not None:
        info = probe(path, limits=limits)
        limits.check_bytes(os.fspath(path), len(indices), *scaled_size(info.width, info.height, max_short_side))
    return torch.stack(read_frame_list(path, indices, backend, threads=threads, max_short_side=max_short_side,
                                       limits=limits, cancel=cancel))


def read_frame_list(path: str | os.PathLike, indices: Sequence[int], backend: str | None = None, *,
                    threads: int | None = None, max_short_side: int | None = None,
                    limits: DecodeLimits | None = DEFAULT_LIMITS,
                    cancel: threading.Event | None = None) -> list[torch.Tensor]:
    """:func:`read_frames` as a list of ``H x W x 3`` uint8 frames, one per index (a repeated
    index repeats the same tensor), without copying the decoded frames into one tensor: for
    consumers that copy only a crop of each frame (the clip transforms). ``limits`` count each
    distinct frame once."""
    path = os.fspath(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"negative frame index {min(indices)} requested from {path}")
    name = (backend or "pyav").lower()
    if name not in READERS:
        raise ValueError(f"unknown video backend {name!r}; choose one of {', '.join(BACKENDS)}")
    index = get_index(path, limits)
    info = index.info
    clamped = [min(i, info.num_frames - 1) for i in indices]
    wanted = sorted(set(clamped))
    size = scaled_size(info.width, info.height, max_short_side)
    if limits is not None:
        limits.check_bytes(path, len(wanted), *size)
    nthreads = decoder_threads(threads, info.width * info.height)
    try:
        got = READERS[name](path, wanted, index, nthreads, size, cancel)
    except (VideoDecodeError, BackendUnavailableError, Cancelled):
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise VideoDecodeError(path, f"decoding failed: {type(e).__name__}: {ffmpeg_message(e)}") from None
    return _in_request_order(path, got, clamped)


def _in_request_order(path: str, got: dict[int, np.ndarray], clamped: list[int]) -> list[torch.Tensor]:
    """The decoded frames in the order asked for; indices past the last decodable frame get it."""
    if not got:
        raise VideoDecodeError(path, "no decodable video frames")
    last = max(got)
    frames = {i: torch.from_numpy(array) for i, array in got.items()}
    rows = []
    for i in clamped:
        if i in frames:
            rows.append(frames[i])
        elif i > last:  # beyond the last decodable frame: clamp
            rows.append(frames[last])
        else:
            raise VideoDecodeError(path, f"frame {i} could not be decoded")
    return rows
