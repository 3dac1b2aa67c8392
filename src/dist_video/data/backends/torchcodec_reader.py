"""The torchcodec backend (optional): exact random access on MP4/MOV and Matroska/WebM.

Elsewhere (AVI with B-frames) torchcodec's random access returns neighbouring frames and it
never outputs the last frame: frames are read in order from the start, and what it does not
give comes from PyAV. torchcodec returns full-size frames; a smaller size is made from them
(bilinear, antialiased) a few frames at a time, so at most ``CHUNK`` full-size frames exist.
A set ``cancel`` event stops the read between calls (:class:`~dist_video.data.frame_index.Cancelled`)."""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from . import pyav_reader
from ..frame_index import SEEKABLE_FAMILIES, Cancelled, FrameIndex, VideoDecodeError, backend_unavailable, check_cancel

__all__ = ["load", "read"]

CHUNK = 16  # frames decoded per call


def load():
    """torchcodec's ``VideoDecoder``, or :class:`BackendUnavailableError` saying what to install."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # ImportError, or OSError/RuntimeError from a library that won't load
        if isinstance(e, ModuleNotFoundError):
            hint = ("install it with `pip install torchcodec` (the release made for your PyTorch version) and "
                    "FFmpeg's shared libraries (Debian/Ubuntu: `apt-get install ffmpeg`)")
        else:
            hint = ("torchcodec needs FFmpeg's shared libraries, major version 4 to 7 (Debian/Ubuntu: `apt-get "
                    "install ffmpeg`), and the torchcodec release made for your PyTorch version (PyPI's builds from "
                    "0.14 on need CUDA's libraries: with a CPU-only PyTorch, `pip install 'torchcodec>=0.12,<0.14'`)")
        raise backend_unavailable("torchcodec", e, hint) from None
    return VideoDecoder


def _resized(frames: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``N x H x W x 3`` -> ``N x height x width x 3`` (numpy), unchanged when it has that size."""
    width, height = size
    if frames.shape[1:3] == (height, width):
        return frames.numpy()
    x = F.interpolate(frames.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last), size=(height, width),
                      mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def read(path: str, wanted: list[int], index: FrameIndex, threads: int, size: tuple[int, int],
         cancel: threading.Event | None = None) -> dict[int, np.ndarray]:
    VideoDecoder = load()
    try:
        decoder = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=threads)
        n = min(len(decoder), index.info.num_frames)
        wanted = sorted({min(i, n - 1) for i in wanted})
        if any(f in SEEKABLE_FAMILIES for f in index.info.container.split(",")):
            got = {}
            for start in range(0, len(wanted), CHUNK):
                check_cancel(cancel, path)
                chunk = wanted[start:start + CHUNK]
                got.update(zip(chunk, _resized(decoder.get_frames_at(indices=chunk).data, size)))
            return got
        got = {}
        need = set(wanted)
        for i in range(wanted[-1] + 1):
            if i % CHUNK == 0:
                check_cancel(cancel, path)
            try:
                frame = decoder[i]
            except RuntimeError:
                break
            if i in need:
                got[i] = _resized(frame[None], size)[0]
        rest = [i for i in wanted if i not in got]
        if rest:
            got.update(pyav_reader.read(path, rest, index, threads, size, cancel))
        return got
    except (VideoDecodeError, Cancelled):
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"torchcodec failed: {type(e).__name__}: {e}") from None
