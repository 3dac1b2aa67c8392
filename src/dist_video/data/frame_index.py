"""The frame index of a video file: what ``probe`` returns and what the readers seek by.

Index i is defined as the i-th frame the decoder outputs when the whole stream is decoded
from the start. How a file is indexed (``probe``, cached per path + mtime + size):

* The container is demuxed once without decoding (a few ms for a 10 s clip). This gives
  every packet's presentation timestamp (pts) and keyframe flag.
* The packet count is trusted as the frame count only where one packet is one frame by
  construction: MP4/MOV, Matroska/WebM and AVI holding a codec from
  ``ONE_FRAME_PER_PACKET``, every packet with a unique pts, no demuxing error, no corrupt
  (truncated) packet, and the container's own ``nb_frames`` either absent (Matroska/WebM
  never store it) or equal to the count.
* Anything else (a metadata count that disagrees, truncated data, MPEG-TS, raw streams,
  packets without timestamps, ...) is counted by decoding every frame (nothing is converted
  to RGB), which is the definition itself.

Limits (:class:`DecodeLimits`) are checked here, from the container's headers, before any
frame is decoded: a frame area over the limit is a :class:`VideoDecodeError` naming the file
and the limit. This module also holds what every backend shares: the errors, the FFmpeg
helpers (open, demux, decode one packet) and the decoder thread count.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import av
import numpy as np
import torch

__all__ = [
    "VideoInfo", "VideoDecodeError", "Cancelled", "check_cancel", "BackendUnavailableError", "IndexMismatch",
    "DecodeLimits", "DEFAULT_LIMITS",
    "PtsTable", "FrameIndex", "probe", "get_index", "index_by_decoding", "recount", "clear_probe_cache",
    "cache_key", "cache_get", "cache_put", "decoder_threads", "open_video", "video_stream", "configure_threads",
    "demux", "decode_packet", "decoded_frames", "ffmpeg_message", "backend_unavailable",
    "ONE_FRAME_PER_PACKET", "SEEK_GAP", "SEEKABLE_FAMILIES", "STATS", "THREADING_MIN_PIXELS",
]

#: Codecs for which one packet (in MP4/MOV, Matroska/WebM, AVI) is exactly one output frame.
ONE_FRAME_PER_PACKET = frozenset({
    "h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg",
    "h263", "msmpeg4v2", "msmpeg4v3", "wmv1", "wmv2", "wmv3", "vc1", "theora", "prores",
    "dnxhd", "ffv1", "huffyuv", "rawvideo", "png", "qtrle", "cinepak", "flv1", "dvvideo",
})

#: Seek forward only when the keyframe before the next requested frame is at least this many
#: frames ahead of the decoder (below that, decoding through is cheaper than a seek).
SEEK_GAP = 6

# Demuxers that turn any bytes into "video" of rendered text (chosen by file extension, e.g.
# .bin): never a real video.
_TEXT_ART_FORMATS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
_INDEXABLE_FAMILIES = ("mov", "mp4", "matroska", "webm", "avi")
SEEKABLE_FAMILIES = ("mov", "mp4", "matroska", "webm")
_CACHE_SIZE = 100_000

#: Counters of this process's decoding decisions (for tests and benchmarks): forward seeks,
#: fall-backs to sequential decoding, files re-counted because they ended early.
STATS = {"seeks": 0, "fallbacks": 0, "recounts": 0}


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds: ``num_frames`` decodable frames of ``width`` x ``height``.

    ``fps`` is the average frame rate, ``duration`` in seconds. ``counted_by`` says where
    ``num_frames`` comes from: ``"metadata"`` (container count, verified against the packet
    count), ``"packets"`` (no container count; packets counted, one frame each) or
    ``"decoding"`` (every frame decoded and counted)."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str = ""
    container: str = ""
    counted_by: str = ""


class VideoDecodeError(Exception):
    """A video that cannot be read; the message is ``"<path>: <cause>"``."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (VideoDecodeError, (self.path, self.cause))


class Cancelled(Exception):
    """The work was cancelled (its ``cancel`` event was set) before it finished."""


def check_cancel(cancel: threading.Event | None, path: str) -> None:
    """Raise :class:`Cancelled` naming ``path`` when ``cancel`` is set (None: never)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{path}: cancelled")


class BackendUnavailableError(RuntimeError):
    """An optional decoding backend (decord, torchcodec) that is not installed or not loadable."""


class IndexMismatch(Exception):
    """Decoder output disagrees with the pts index: fall back to sequential decoding."""


def backend_unavailable(name: str, error: Exception, hint: str) -> BackendUnavailableError:
    """The error for backend ``name`` whose import failed with ``error``; ``hint``: what to install."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return BackendUnavailableError(f"video backend {name!r} is not usable here ({type(error).__name__}: {first}); "
                                   f"{hint}, or use backend='pyav'")


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one file may cost; checked before a frame is decoded, from the container's
    headers (a frame that turns out larger while decoding is refused too). A video over a
    limit raises :class:`VideoDecodeError` ``"<path>: ... over the decoding limit ..."`` naming
    the limit. ``None`` turns a limit off.

    ``max_frame_pixels``: width x height of the stored frames. Default 4096 x 2160, DCI 4K:
    UHD (3840 x 2160) and portrait 4K pass, 8K does not. A 4K frame is about 13 MB decoded
    (YUV 4:2:0) and the decoder keeps a few dozen at most, whatever the file's size on disk.

    ``max_decoded_bytes``: bytes of the uint8 RGB frames one read returns: frames x height x
    width x 3 at the size returned (after any downscaling while decoding), counting each
    distinct frame once for :func:`~dist_video.data.decoding.read_frame_list` and every index
    for :func:`~dist_video.data.decoding.read_frames` (which stacks them). Default 2 GiB: 85
    UHD frames, or 512 frames (64 views of 8) of a 16:9 video decoded at short side 448."""

    max_frame_pixels: int | None = 4096 * 2160
    max_decoded_bytes: int | None = 2 * 2**30

    def check_frame(self, path: str, width: int, height: int) -> None:
        """Raise when a ``width`` x ``height`` frame is over ``max_frame_pixels``."""
        if self.max_frame_pixels is not None and width * height > self.max_frame_pixels:
            raise VideoDecodeError(path, f"frames of {width}x{height} ({width * height / 1e6:.3g} megapixels) are "
                                         f"over the decoding limit of {self.max_frame_pixels / 1e6:.3g} megapixels "
                                         f"(max_frame_pixels={self.max_frame_pixels})")

    def check_bytes(self, path: str, frames: int, width: int, height: int) -> None:
        """Raise when ``frames`` RGB frames of ``width`` x ``height`` are over ``max_decoded_bytes``."""
        need = frames * width * height * 3
        if self.max_decoded_bytes is not None and need > self.max_decoded_bytes:
            raise VideoDecodeError(path, f"{frames} frames of {width}x{height} need {need / 2**20:.3g} MiB decoded, "
                                         f"over the decoding limit of {self.max_decoded_bytes / 2**20:.3g} MiB "
                                         f"(max_decoded_bytes={self.max_decoded_bytes})")


#: The limits a read uses unless its caller gives others.
DEFAULT_LIMITS = DecodeLimits()


# ----------------------------------------------------------------------------- pts tables

class PtsTable:
    """Presentation timestamps of frames 0..n-1 (strictly increasing), stored compactly:
    an arithmetic progression as (start, step), anything else as an int64 array."""

    __slots__ = ("n", "start", "step", "values", "_lookup")

    def __init__(self, pts: Sequence[int]):
        arr = np.asarray(pts, dtype=np.int64)
        self.n = int(arr.size)
        self._lookup: dict[int, int] | None = None
        diffs = np.diff(arr)
        if self.n >= 2 and np.all(diffs == diffs[0]) and diffs[0] > 0:
            self.start, self.step, self.values = int(arr[0]), int(diffs[0]), None
        elif self.n == 1:
            self.start, self.step, self.values = int(arr[0]), 1, None
        else:
            self.start, self.step, self.values = 0, 0, arr

    def pts_of(self, index: int) -> int:
        if self.values is None:
            return self.start + index * self.step
        return int(self.values[index])

    def index_of(self, pts: int | None) -> int:
        """The frame index of ``pts``, or -1 when no frame has that pts."""
        if pts is None:
            return -1
        if self.values is None:
            offset = pts - self.start
            if offset < 0 or offset % self.step:
                return -1
            i = offset // self.step
            return i if i < self.n else -1
        if self._lookup is None:
            self._lookup = {int(p): i for i, p in enumerate(self.values)}
        return self._lookup.get(int(pts), -1)


@dataclass
class FrameIndex:
    info: VideoInfo
    pts: PtsTable | None          # frame pts in presentation order, None if unusable
    keyframes: np.ndarray          # presentation indices of keyframes (ascending)
    seekable: bool


# ----------------------------------------------------------------------------- cache

_cache: OrderedDict[tuple, FrameIndex] = OrderedDict()
_cache_lock = threading.Lock()


def clear_probe_cache() -> None:
    """Forget every cached index (files are re-probed on next use)."""
    with _cache_lock:
        _cache.clear()


def cache_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def cache_get(key: tuple) -> FrameIndex | None:
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
        return entry


def cache_put(key: tuple, entry: FrameIndex) -> None:
    with _cache_lock:
        _cache[key] = entry
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


# ----------------------------------------------------------------------------- helpers

#: Frames smaller than this (pixels) decode with one thread unless asked otherwise: measured
#: here, FFmpeg's frame threads give no speed-up at 340x256 (and cost latency when stopping
#: early), but 1.6x at 1280x720.
THREADING_MIN_PIXELS = 640 * 480


def decoder_threads(threads: int | None = None, pixels: int | None = None) -> int:
    """Decoder threads to use: ``threads`` if given; 1 for frames under
    ``THREADING_MIN_PIXELS``; inside a DataLoader worker the process's share of the cores
    divided by the number of workers (workers already run in parallel); else up to 4 cores of
    that share. The share: the cores over ``LOCAL_WORLD_SIZE``, the training processes of this
    machine (set by ``torchrun``), each with its own workers."""
    if threads is not None:
        return max(1, int(threads))
    if pixels is not None and pixels < THREADING_MIN_PIXELS:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    worker = torch.utils.data.get_worker_info()
    if worker is not None:
        return max(1, cores // max(1, worker.num_workers))
    return max(1, min(cores, 4))


def _check_file(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoDecodeError(path, "file not found") from None
    except OSError as e:
        raise VideoDecodeError(path, f"cannot access file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VideoDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoDecodeError(path, "permission denied")


def open_video(path: str, max_pixels: int | None = None):
    """``path`` opened for reading. ``max_pixels``: FFmpeg's own frame-area limit, which also
    stops the decoding FFmpeg does while opening (to learn the stream's parameters) from
    allocating a frame larger than that."""
    options = {"max_pixels": str(max_pixels)} if max_pixels else {}
    try:
        return av.open(path, mode="r", metadata_errors="ignore", options=options)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"cannot open as a video: {ffmpeg_message(e)}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"cannot open: {e}") from None


def ffmpeg_message(e: BaseException) -> str:
    strerror = getattr(e, "strerror", None)
    return strerror or str(e) or type(e).__name__


def video_stream(container, path: str):
    """The video stream of an open container (cover art skipped); raises
    :class:`VideoDecodeError` naming ``path`` for text rendered as video, no video stream, or
    no decoder in this FFmpeg build."""
    if container.format.name in _TEXT_ART_FORMATS:
        raise VideoDecodeError(path, f"not a video (FFmpeg would render it as text art, format "
                                     f"{container.format.name!r})")
    candidates = []
    for s in container.streams.video:
        try:
            if s.disposition & av.stream.Disposition.attached_pic:
                continue  # cover art of an audio file, not a video
        except (AttributeError, TypeError):
            pass
        candidates.append(s)
    if not candidates:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
    stream = candidates[0]
    if stream.codec_context is None:
        raise VideoDecodeError(path, "video stream has no decoder in this FFmpeg build")
    return stream


def configure_threads(stream, threads: int) -> None:
    cc = stream.codec_context
    cc.thread_count = threads
    cc.thread_type = "AUTO" if threads > 1 else "SLICE"


def _family(container) -> tuple[str, ...]:
    return tuple(container.format.name.split(","))


def decode_packet(cc, packet) -> list:
    """Decode one packet (None flushes); a packet the decoder rejects gives no frames."""
    try:
        return cc.decode(packet)
    except av.FFmpegError:
        return []


def demux(container, stream):
    """Packets of ``stream`` in decode order; stops quietly at a read error (truncated file)."""
    it = container.demux(stream)
    while True:
        try:
            packet = next(it)
        except StopIteration:
            return
        except av.FFmpegError:
            return
        if packet.size == 0 or packet.is_corrupt:
            continue  # flush marker / truncated packet: never decoded nor counted
        yield packet


def decoded_frames(container, stream):
    """Every frame of ``stream`` in decoder output order, the way this module counts them: a
    packet the decoder rejects gives no frames, a read error (a truncated end) ends the stream."""
    cc = stream.codec_context
    for packet in demux(container, stream):
        yield from decode_packet(cc, packet)
    yield from decode_packet(cc, None)


def _stream_rate(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            value = float(rate)
            if math.isfinite(value) and value > 0:
                return value
    return 0.0


def _make_info(container, stream, num_frames: int, pts: PtsTable | None, counted_by: str) -> VideoInfo:
    cc = stream.codec_context
    tb = float(stream.time_base) if stream.time_base else 0.0
    fps = _stream_rate(stream)
    duration = 0.0
    if stream.duration and tb:
        duration = stream.duration * tb
    elif pts is not None and pts.n >= 2 and tb:
        span = (pts.pts_of(pts.n - 1) - pts.pts_of(0)) * tb
        duration = span * pts.n / (pts.n - 1)
    elif container.duration:
        duration = container.duration / 1_000_000
    variable_rate = pts is not None and pts.values is not None  # irregular timestamps
    if (fps <= 0 or variable_rate) and duration > 0:
        fps = num_frames / duration  # the average rate
    if duration <= 0 and fps > 0:
        duration = num_frames / fps
    return VideoInfo(num_frames=num_frames, fps=float(fps), width=int(cc.width), height=int(cc.height),
                     duration=float(duration), codec=cc.name, container=container.format.name,
                     counted_by=counted_by)


# ----------------------------------------------------------------------------- indexing

def _check_header(path: str, stream, limits: DecodeLimits | None) -> None:
    """The frame area the stream's header declares, against ``limits`` (before decoding)."""
    cc = stream.codec_context
    if limits is not None and cc.width > 0 and cc.height > 0:
        limits.check_frame(path, cc.width, cc.height)


def _build_index(path: str, limits: DecodeLimits | None) -> FrameIndex:
    with open_video(path, limits.max_frame_pixels if limits is not None else None) as container:
        stream = video_stream(container, path)
        _check_header(path, stream, limits)
        family = _family(container)
        meta_frames = int(stream.frames or 0)
        codec = stream.codec_context.name
        if any(f in _INDEXABLE_FAMILIES for f in family) and codec in ONE_FRAME_PER_PACKET:
            pts: list[int | None] = []
            keys: list[bool] = []
            demux_failed = corrupt = False
            it = container.demux(stream)
            while True:
                try:
                    packet = next(it)
                except StopIteration:
                    break
                except av.FFmpegError:
                    demux_failed = True
                    break
                if packet.size == 0:
                    continue
                if packet.is_corrupt:
                    corrupt = True
                    continue
                if packet.is_discard:
                    continue
                pts.append(packet.pts)
                keys.append(bool(packet.is_keyframe))
            n = len(pts)
            trusted = (n > 0 and not demux_failed and not corrupt and None not in pts
                       and len(set(pts)) == n and meta_frames in (0, n))
            if trusted:
                order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
                table = PtsTable(np.asarray(pts, dtype=np.int64)[order])
                rank = np.empty(n, dtype=np.int64)
                rank[order] = np.arange(n)
                keyframes = np.sort(rank[np.asarray(keys, dtype=bool)]).astype(np.int64)
                info = _make_info(container, stream, n, table, "metadata" if meta_frames else "packets")
                seekable = any(f in SEEKABLE_FAMILIES for f in family)
                return FrameIndex(info, table, keyframes, seekable)
    return index_by_decoding(path, limits)


def index_by_decoding(path: str, limits: DecodeLimits | None = None) -> FrameIndex:
    """Count frames by decoding all of them (no RGB conversion); every frame's area is checked
    against ``limits`` as it comes out of the decoder."""
    with open_video(path, limits.max_frame_pixels if limits is not None else None) as container:
        stream = video_stream(container, path)
        _check_header(path, stream, limits)
        configure_threads(stream, decoder_threads(None, stream.codec_context.width * stream.codec_context.height))
        cc = stream.codec_context
        family = _family(container)
        frame_pts: list[int | None] = []
        packet_pts: list[int | None] = []
        key_pts: list[int] = []
        try:
            for packet in demux(container, stream):
                if not packet.is_discard:
                    packet_pts.append(packet.pts)
                    if packet.is_keyframe and packet.pts is not None:
                        key_pts.append(packet.pts)
                frame_pts.extend(_checked_pts(path, decode_packet(cc, packet), limits))
            frame_pts.extend(_checked_pts(path, decode_packet(cc, None), limits))
        except av.FFmpegError as e:  # pragma: no cover - defensive, errors are caught above
            raise VideoDecodeError(path, f"decoding failed: {ffmpeg_message(e)}") from None
        n = len(frame_pts)
        if n == 0:
            raise VideoDecodeError(path, "no decodable video frames")
        table = None
        keyframes = np.zeros(0, dtype=np.int64)
        increasing = None not in frame_pts and all(b > a for a, b in zip(frame_pts, frame_pts[1:]))
        same_as_packets = None not in packet_pts and sorted(packet_pts) == frame_pts
        if increasing and same_as_packets and any(f in _INDEXABLE_FAMILIES for f in family):
            table = PtsTable(frame_pts)
            keyframes = np.asarray(sorted(table.index_of(p) for p in key_pts), dtype=np.int64)
        info = _make_info(container, stream, n, table, "decoding")
        seekable = table is not None and any(f in SEEKABLE_FAMILIES for f in family)
        return FrameIndex(info, table, keyframes, seekable)


def _checked_pts(path: str, frames: list, limits: DecodeLimits | None) -> list[int | None]:
    if limits is not None:
        for f in frames:
            limits.check_frame(path, f.width, f.height)
    return [f.pts for f in frames]


def get_index(path: str, limits: DecodeLimits | None = DEFAULT_LIMITS) -> FrameIndex:
    """The index of ``path`` (cached), its frame area checked against ``limits`` (None: none)
    before anything is decoded."""
    _check_file(path)
    key = cache_key(path)
    entry = cache_get(key)
    if entry is not None:
        if limits is not None:
            limits.check_frame(path, entry.info.width, entry.info.height)
        return entry
    try:
        entry = _build_index(path, limits)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise VideoDecodeError(path, f"cannot index: {type(e).__name__}: {ffmpeg_message(e)}") from None
    cache_put(key, entry)
    if limits is not None:
        limits.check_frame(path, entry.info.width, entry.info.height)
    return entry


def probe(path: str | os.PathLike, *, limits: DecodeLimits | None = DEFAULT_LIMITS) -> VideoInfo:
    """Frame count (true, decodable), fps, size and duration of a video file.

    Raises :class:`VideoDecodeError` for a missing, empty, unreadable or non-video file, and
    for frames over ``limits.max_frame_pixels`` (checked from the headers before decoding;
    ``limits=None``: no limit). Results are cached per (path, mtime, size)."""
    return get_index(os.fspath(path), limits).info


def recount(path: str, old: FrameIndex, reason: str) -> FrameIndex:
    """Index ``path`` again by decoding (its index was wrong: ``reason``), warn when the count
    changed, and cache the new index."""
    STATS["recounts"] += 1
    new = index_by_decoding(path)
    if new.info.num_frames != old.info.num_frames:
        warnings.warn(f"{path}: indexed as {old.info.num_frames} frames but {reason}; "
                      f"recounted by decoding: {new.info.num_frames} frames. Requests beyond "
                      f"the last decodable frame get the last decodable frame.",
                      RuntimeWarning, stacklevel=3)
    cache_put(cache_key(path), new)
    return new
