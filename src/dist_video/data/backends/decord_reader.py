"""The decord backend (optional): random access through decord's index, exact for MP4/MOV
and Matroska/WebM; elsewhere (AVI with B-frames, its issue #195) frames are read in order
from the start. Frames are resized by decord while decoding when a smaller size is asked. A
set ``cancel`` event stops the read between batches of frames
(:class:`~dist_video.data.frame_index.Cancelled`)."""

from __future__ import annotations

import threading

import numpy as np

from ..frame_index import SEEKABLE_FAMILIES, Cancelled, FrameIndex, VideoDecodeError, backend_unavailable, check_cancel

__all__ = ["load", "read"]

CHUNK = 32  # frames per batch


def load():
    """The ``decord`` module, or :class:`BackendUnavailableError` saying what to install."""
    try:
        import decord
    except Exception as e:  # ImportError, or OSError/RuntimeError from a library that won't load
        hint = ("install it with `pip install decord` (0.6.0: wheels for Linux x86_64)"
                if isinstance(e, ModuleNotFoundError) else "reinstall it with `pip install --force-reinstall decord`")
        raise backend_unavailable("decord", e, hint) from None
    return decord


def read(path: str, wanted: list[int], index: FrameIndex, threads: int, size: tuple[int, int],
         cancel: threading.Event | None = None) -> dict[int, np.ndarray]:
    decord = load()
    info = index.info
    width, height = (-1, -1) if size == (info.width, info.height) else size  # -1: as stored
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads, width=width, height=height)
        n = min(len(reader), info.num_frames)
        wanted = sorted({min(i, n - 1) for i in wanted})
        got: dict[int, np.ndarray] = {}
        if any(f in SEEKABLE_FAMILIES for f in info.container.split(",")):
            for start in range(0, len(wanted), CHUNK):
                check_cancel(cancel, path)
                chunk = wanted[start:start + CHUNK]
                got.update(zip(chunk, reader.get_batch(chunk).asnumpy()))
            return got
        need = set(wanted)
        for start in range(0, wanted[-1] + 1, CHUNK):
            check_cancel(cancel, path)
            chunk = list(range(start, min(start + CHUNK, wanted[-1] + 1)))
            for i, frame in zip(chunk, reader.get_batch(chunk).asnumpy()):
                if i in need:
                    got[i] = frame
        return got
    except (VideoDecodeError, Cancelled):
        raise
    except Exception as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoDecodeError(path, f"decord failed: {cause}") from None
