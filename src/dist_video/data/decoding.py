"""Exact, frame-indexed video decoding.

``read_frames(path, [i, j, ...])`` returns the i-th, j-th, ... frames *in presentation order*,
exactly, for anything FFmpeg reads. Index i is defined as the i-th frame the decoder outputs
when the whole stream is decoded from the start; every shortcut below (seeking, skipping the
decoding of frames nobody asked for) is checked against that definition while it runs and
falls back to plain sequential decoding when a check fails.

How a file is indexed (``probe``, cached per path + mtime + size):

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

How frames are read (PyAV backend, the default):

* Packets whose frame is not requested are handed to the decoder with
  ``skip_frame=NONREF``: a frame that no other frame references is then not decoded at all.
  Reference frames are still decoded, so the requested frames are bit-identical to a full
  decode. Each output frame is identified by its pts, so skipped frames cannot shift indices.
* When the next requested frame lies after a keyframe that is more than ``SEEK_GAP``
  frames ahead of the decoder, the reader seeks to that keyframe (MP4/MOV and
  Matroska/WebM only) and verifies that decoding resumes exactly at it.
* Decoding stops at the last requested frame; only requested frames are converted to RGB.

Bad files raise :class:`VideoDecodeError` (message: ``"<path>: <cause>"``). Requested indices
at or beyond the number of decodable frames are clamped to the last decodable frame: when a
file turns out to hold fewer decodable frames than its index said (e.g. a truncated file
whose metadata lied), the file is re-counted by decoding, the cache is corrected, a
``RuntimeWarning`` names the file, and the missing indices get the last decodable frame.
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
    "VideoInfo",
    "VideoDecodeError",
    "BackendUnavailableError",
    "probe",
    "read_frames",
    "read_frame_list",
    "video_stream",
    "decoded_frames",
    "available_backends",
    "clear_probe_cache",
    "decoder_threads",
    "BACKENDS",
    "ONE_FRAME_PER_PACKET",
    "SEEK_GAP",
    "STATS",
    "THREADING_MIN_PIXELS",
]

BACKENDS = ("pyav", "decord", "torchcodec")

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
_SEEKABLE_FAMILIES = ("mov", "mp4", "matroska", "webm")
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


class BackendUnavailableError(RuntimeError):
    """An optional decoding backend (decord, torchcodec) that is not installed or not loadable."""


class _IndexMismatch(Exception):
    """Decoder output disagrees with the pts index: fall back to sequential decoding."""


# ----------------------------------------------------------------------------- pts tables

class _PtsTable:
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
class _FrameIndex:
    info: VideoInfo
    pts: _PtsTable | None          # frame pts in presentation order, None if unusable
    keyframes: np.ndarray          # presentation indices of keyframes (ascending)
    seekable: bool


# ----------------------------------------------------------------------------- cache

_cache: OrderedDict[tuple, _FrameIndex] = OrderedDict()
_cache_lock = threading.Lock()


def clear_probe_cache() -> None:
    """Forget every cached index (files are re-probed on next use)."""
    with _cache_lock:
        _cache.clear()


def _cache_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def _cache_get(key: tuple) -> _FrameIndex | None:
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
        return entry


def _cache_put(key: tuple, entry: _FrameIndex) -> None:
    with _cache_lock:
        _cache[key] = entry
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


# ----------------------------------------------------------------------------- helpers

#: Frames smaller than this (pixels) decode with one thread unless asked otherwise: FFmpeg's
#: frame threads speed up large frames but not small ones (and cost latency when stopping
#: early; benchmarks/README.md, "Video loading").
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


def _open(path: str):
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"cannot open as a video: {_ffmpeg_message(e)}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"cannot open: {e}") from None


def _ffmpeg_message(e: BaseException) -> str:
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


def _configure(stream, threads: int) -> None:
    cc = stream.codec_context
    cc.thread_count = threads
    cc.thread_type = "AUTO" if threads > 1 else "SLICE"


def _family(container) -> tuple[str, ...]:
    return tuple(container.format.name.split(","))


def _decode(cc, packet) -> list:
    """Decode one packet (None flushes); a packet the decoder rejects gives no frames."""
    try:
        return cc.decode(packet)
    except av.FFmpegError:
        return []


def _demux(container, stream):
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
    for packet in _demux(container, stream):
        yield from _decode(cc, packet)
    yield from _decode(cc, None)


def _stream_rate(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            value = float(rate)
            if math.isfinite(value) and value > 0:
                return value
    return 0.0


def _make_info(container, stream, num_frames: int, pts: _PtsTable | None, counted_by: str) -> VideoInfo:
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

def _build_index(path: str, force_decode: bool = False) -> _FrameIndex:
    with _open(path) as container:
        stream = video_stream(container, path)
        family = _family(container)
        meta_frames = int(stream.frames or 0)
        codec = stream.codec_context.name
        if not force_decode and any(f in _INDEXABLE_FAMILIES for f in family) and codec in ONE_FRAME_PER_PACKET:
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
                table = _PtsTable(np.asarray(pts, dtype=np.int64)[order])
                rank = np.empty(n, dtype=np.int64)
                rank[order] = np.arange(n)
                keyframes = np.sort(rank[np.asarray(keys, dtype=bool)]).astype(np.int64)
                info = _make_info(container, stream, n, table, "metadata" if meta_frames else "packets")
                seekable = any(f in _SEEKABLE_FAMILIES for f in family)
                return _FrameIndex(info, table, keyframes, seekable)
    return _index_by_decoding(path)


def _index_by_decoding(path: str) -> _FrameIndex:
    """Count frames by decoding all of them (no RGB conversion)."""
    with _open(path) as container:
        stream = video_stream(container, path)
        _configure(stream, decoder_threads(None, stream.codec_context.width * stream.codec_context.height))
        cc = stream.codec_context
        family = _family(container)
        frame_pts: list[int | None] = []
        packet_pts: list[int | None] = []
        key_pts: list[int] = []
        try:
            for packet in _demux(container, stream):
                if not packet.is_discard:
                    packet_pts.append(packet.pts)
                    if packet.is_keyframe and packet.pts is not None:
                        key_pts.append(packet.pts)
                frame_pts.extend(f.pts for f in _decode(cc, packet))
            frame_pts.extend(f.pts for f in _decode(cc, None))
        except av.FFmpegError as e:  # pragma: no cover - defensive, errors are caught above
            raise VideoDecodeError(path, f"decoding failed: {_ffmpeg_message(e)}") from None
        n = len(frame_pts)
        if n == 0:
            raise VideoDecodeError(path, "no decodable video frames")
        table = None
        keyframes = np.zeros(0, dtype=np.int64)
        increasing = None not in frame_pts and all(b > a for a, b in zip(frame_pts, frame_pts[1:]))
        same_as_packets = None not in packet_pts and sorted(packet_pts) == frame_pts
        if increasing and same_as_packets and any(f in _INDEXABLE_FAMILIES for f in family):
            table = _PtsTable(frame_pts)
            keyframes = np.asarray(sorted(table.index_of(p) for p in key_pts), dtype=np.int64)
        info = _make_info(container, stream, n, table, "decoding")
        seekable = table is not None and any(f in _SEEKABLE_FAMILIES for f in family)
        return _FrameIndex(info, table, keyframes, seekable)


def _get_index(path: str) -> _FrameIndex:
    _check_file(path)
    key = _cache_key(path)
    entry = _cache_get(key)
    if entry is None:
        try:
            entry = _build_index(path)
        except VideoDecodeError:
            raise
        except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as e:
            raise VideoDecodeError(path, f"cannot index: {type(e).__name__}: {_ffmpeg_message(e)}") from None
        _cache_put(key, entry)
    return entry


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count (true, decodable), fps, size and duration of a video file.

    Raises :class:`VideoDecodeError` for a missing, empty, unreadable or non-video file.
    Results are cached per (path, mtime, size)."""
    return _get_index(os.fspath(path)).info


# ----------------------------------------------------------------------------- PyAV reading

def _to_rgb(frame, width: int, height: int) -> np.ndarray:
    if frame.width == width and frame.height == height:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=width, height=height)


def _read_sequential(path: str, wanted: list[int], index: _FrameIndex, threads: int
                     ) -> tuple[dict[int, np.ndarray], int, object]:
    """Decode from the start, counting output frames. Returns (frames, frames decoded,
    last decoded frame) — the last two let the caller clamp when the file ends early."""
    info = index.info
    need = set(wanted)
    last_needed = wanted[-1]
    got: dict[int, np.ndarray] = {}
    count = 0
    last = None
    with _open(path) as container:
        stream = video_stream(container, path)
        _configure(stream, threads)
        cc = stream.codec_context

        def take(frames) -> bool:
            nonlocal count, last
            for frame in frames:
                if count in need:
                    got[count] = _to_rgb(frame, info.width, info.height)
                last = frame
                count += 1
                if count > last_needed:
                    return True
            return False

        for packet in _demux(container, stream):
            if take(_decode(cc, packet)):
                return got, count, last
        take(_decode(cc, None))
    return got, count, last


def _read_indexed(path: str, wanted: list[int], index: _FrameIndex, threads: int) -> dict[int, np.ndarray]:
    """Decode with the pts index: skip unrequested non-reference frames, seek over long gaps.
    Raises _IndexMismatch when the decoder's output contradicts the index."""
    info, table, keyframes = index.info, index.pts, index.keyframes
    assert table is not None
    need = set(wanted)
    remaining = list(wanted)  # ascending; remaining[0] is the next frame to obtain
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = video_stream(container, path)
        _configure(stream, threads)
        cc = stream.codec_context
        pos = -1            # index of the last frame the decoder output
        min_valid = 0       # after a seek: frames before the keyframe are not trusted
        expect_key = -1     # after a seek: the first trusted frame must be this keyframe
        skipping = None

        def next_seek_target() -> int:
            if not index.seekable or keyframes.size == 0 or not remaining:
                return -1
            k = int(keyframes[np.searchsorted(keyframes, remaining[0], side="right") - 1]) \
                if remaining[0] >= keyframes[0] else -1
            return k if k - max(pos, 0) >= SEEK_GAP and k > pos else -1

        def take(frames) -> None:
            nonlocal pos, expect_key
            for frame in frames:
                i = table.index_of(frame.pts)
                if i < 0:
                    raise _IndexMismatch(f"frame pts {frame.pts} not in the index")
                if i < min_valid:
                    continue
                if expect_key >= 0:
                    if i != expect_key:
                        raise _IndexMismatch(f"seek to keyframe {expect_key} resumed at frame {i}")
                    expect_key = -1
                if i <= pos:
                    raise _IndexMismatch(f"frame {i} after frame {pos}")
                pos = i
                if i in need and i not in got:
                    got[i] = _to_rgb(frame, info.width, info.height)
                    while remaining and remaining[0] in got:
                        remaining.pop(0)

        while remaining:
            target = next_seek_target()
            if target >= 0:
                container.seek(table.pts_of(target), stream=stream, backward=True, any_frame=False)
                STATS["seeks"] += 1
                cc.flush_buffers()
                min_valid = target
                expect_key = target
                pos = target - 1
            sought = False
            for packet in _demux(container, stream):
                i = table.index_of(packet.pts)
                skip = "DEFAULT" if (i >= 0 and i in need and i not in got) else "NONREF"
                if skip != skipping:
                    cc.skip_frame = skip
                    skipping = skip
                before = len(remaining)
                take(_decode(cc, packet))
                if not remaining:
                    break
                if len(remaining) != before and next_seek_target() >= 0:
                    sought = True
                    break
            else:
                if skipping != "DEFAULT":
                    cc.skip_frame = skipping = "DEFAULT"
                take(_decode(cc, None))
                break
            if not sought:
                break
    return got


# ----------------------------------------------------------------------------- other backends

def available_backends() -> list[str]:
    """Backends that can be imported here (``"pyav"`` always)."""
    names = ["pyav"]
    for name in ("decord", "torchcodec"):
        try:
            _import_backend(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def _import_backend(name: str):
    try:
        if name == "decord":
            import decord
            return decord
        if name == "torchcodec":
            from torchcodec.decoders import VideoDecoder
            return VideoDecoder
    except Exception as e:  # ImportError, or OSError/RuntimeError from a library that won't load
        raise BackendUnavailableError(
            f"video backend {name!r} is not usable here "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
            f"{_install_hint(name, e)}, or use backend='pyav'") from None
    raise ValueError(f"unknown video backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _install_hint(name: str, error: Exception) -> str:
    """What to install for a backend that failed to import with ``error``."""
    if isinstance(error, ModuleNotFoundError):
        if name == "torchcodec":
            return ("install it with `pip install torchcodec` (the release made for your PyTorch version) and "
                    "FFmpeg's shared libraries (Debian/Ubuntu: `apt-get install ffmpeg`)")
        return "install it with `pip install decord` (0.6.0: wheels for Linux x86_64)"
    if name == "torchcodec":
        return ("torchcodec needs FFmpeg's shared libraries, major version 4 to 7 (Debian/Ubuntu: `apt-get install "
                "ffmpeg`), and the torchcodec release made for your PyTorch version (PyPI's builds from 0.14 on need "
                "CUDA's libraries: with a CPU-only PyTorch, `pip install 'torchcodec>=0.12,<0.14'`)")
    return "reinstall it with `pip install --force-reinstall decord`"


def _read_decord(path: str, wanted: list[int], index: _FrameIndex, threads: int) -> dict[int, np.ndarray]:
    decord = _import_backend("decord")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        n = min(len(reader), index.info.num_frames)
        wanted = sorted({min(i, n - 1) for i in wanted})
        fmt = index.info.container.split(",")
        if any(f in _SEEKABLE_FAMILIES for f in fmt):
            frames = reader.get_batch(wanted).asnumpy()
            return dict(zip(wanted, frames))
        # decord's random access returns wrong frames for AVI with B-frames (its issue #195):
        # read sequentially from the start in chunks, which it decodes exactly.
        got: dict[int, np.ndarray] = {}
        need = set(wanted)
        for start in range(0, wanted[-1] + 1, 32):
            chunk = list(range(start, min(start + 32, wanted[-1] + 1)))
            frames = reader.get_batch(chunk).asnumpy()
            for i, frame in zip(chunk, frames):
                if i in need:
                    got[i] = frame
        return got
    except VideoDecodeError:
        raise
    except Exception as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VideoDecodeError(path, f"decord failed: {cause}") from None


def _read_torchcodec(path: str, wanted: list[int], index: _FrameIndex, threads: int) -> dict[int, np.ndarray]:
    VideoDecoder = _import_backend("torchcodec")
    try:
        decoder = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=threads)
        n = min(len(decoder), index.info.num_frames)
        wanted = sorted({min(i, n - 1) for i in wanted})
        if any(f in _SEEKABLE_FAMILIES for f in index.info.container.split(",")):
            frames = decoder.get_frames_at(indices=wanted).data.numpy()
            return dict(zip(wanted, frames))
        # Elsewhere (AVI with B-frames) torchcodec's random access returns neighbouring frames and
        # it never outputs the last frame: read in order from the start, and what it does not
        # give from PyAV.
        got: dict[int, np.ndarray] = {}
        need = set(wanted)
        for i in range(wanted[-1] + 1):
            try:
                frame = decoder[i]
            except RuntimeError:
                break
            if i in need:
                got[i] = frame.numpy()
        rest = [i for i in wanted if i not in got]
        if rest:
            got.update(_read_pyav(path, rest, index, threads))
        return got
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"torchcodec failed: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- public reading

def read_frames(path: str | os.PathLike, indices: Sequence[int], backend: str | None = None, *,
                threads: int | None = None) -> torch.Tensor:
    """Frames ``indices`` (presentation order, any order, repeats allowed) of a video file.

    Returns a ``torch.uint8`` tensor ``len(indices) x H x W x 3`` (RGB). Indices at or beyond
    the decodable frame count are clamped to the last decodable frame (see the module
    docstring). ``backend``: ``"pyav"`` (default), ``"decord"`` or ``"torchcodec"``;
    ``threads``: decoder threads (default: :func:`decoder_threads`).
    Raises :class:`VideoDecodeError` for a bad file, ``ValueError`` for negative indices."""
    return torch.stack(read_frame_list(path, indices, backend, threads=threads))


def read_frame_list(path: str | os.PathLike, indices: Sequence[int], backend: str | None = None, *,
                    threads: int | None = None) -> list[torch.Tensor]:
    """:func:`read_frames` as a list of ``H x W x 3`` uint8 frames, one per index (a repeated
    index repeats the same tensor), without copying the decoded frames into one tensor: for
    consumers that copy only a crop of each frame (the clip transforms)."""
    path = os.fspath(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"negative frame index {min(indices)} requested from {path}")
    backend = (backend or "pyav").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    index = _get_index(path)
    n = index.info.num_frames
    clamped = [min(i, n - 1) for i in indices]
    wanted = sorted(set(clamped))
    nthreads = decoder_threads(threads, index.info.width * index.info.height)
    try:
        if backend == "decord":
            got = _read_decord(path, wanted, index, nthreads)
        elif backend == "torchcodec":
            got = _read_torchcodec(path, wanted, index, nthreads)
        else:
            got = _read_pyav(path, wanted, index, nthreads)
    except (VideoDecodeError, BackendUnavailableError):
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise VideoDecodeError(path, f"decoding failed: {type(e).__name__}: {_ffmpeg_message(e)}") from None
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


def _read_pyav(path: str, wanted: list[int], index: _FrameIndex, threads: int) -> dict[int, np.ndarray]:
    got: dict[int, np.ndarray] | None = None
    if index.pts is not None:
        try:
            got = _read_indexed(path, wanted, index, threads)
        except _IndexMismatch:
            got = None  # the index was wrong for this file: recount and decode sequentially
            STATS["fallbacks"] += 1
            index = _recount(path, index, reason="its timestamps disagree with decoding")
    if got is not None and len(got) == len(wanted):
        return got
    if got is not None:
        # The file ended before frames its index promised: recount it by decoding.
        index = _recount(path, index, reason="it has fewer decodable frames than indexed")
    frames, count, last = _read_sequential(path, [min(i, index.info.num_frames - 1) for i in wanted]
                                           if index.info.num_frames else wanted, index, threads)
    if count == 0:
        raise VideoDecodeError(path, "no decodable video frames")
    if count < index.info.num_frames:
        index = _recount(path, index, reason="it has fewer decodable frames than indexed")
    if last is not None and count - 1 not in frames and any(i >= count for i in wanted):
        frames[count - 1] = _to_rgb(last, index.info.width, index.info.height)
    return frames


def _recount(path: str, old: _FrameIndex, reason: str) -> _FrameIndex:
    STATS["recounts"] += 1
    new = _index_by_decoding(path)
    if new.info.num_frames != old.info.num_frames:
        warnings.warn(f"{path}: indexed as {old.info.num_frames} frames but {reason}; "
                      f"recounted by decoding: {new.info.num_frames} frames. Requests beyond "
                      f"the last decodable frame get the last decodable frame.",
                      RuntimeWarning, stacklevel=3)
    _cache_put(_cache_key(path), new)
    return new
