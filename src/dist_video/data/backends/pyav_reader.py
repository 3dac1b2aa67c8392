"""The PyAV backend (the default): exact frames by pts, skipping and seeking where it is safe.

* Packets whose frame is not requested are handed to the decoder with
  ``skip_frame=NONREF``: a frame that no other frame references is then not decoded at all.
  Reference frames are still decoded, so the requested frames are bit-identical to a full
  decode. Each output frame is identified by its pts, so skipped frames cannot shift indices.
* When the next requested frame lies after a keyframe that is more than ``SEEK_GAP``
  frames ahead of the decoder, the reader seeks to that keyframe (MP4/MOV and
  Matroska/WebM only) and verifies that decoding resumes exactly at it.
* Decoding stops at the last requested frame; only requested frames are converted to RGB,
  at the size the caller asked for (FFmpeg's scaler converts and downscales in one pass, so
  a full-size RGB frame is never made for a smaller output).

When the decoder's output contradicts the index, or the file ends before frames its index
promised, the file is re-counted by decoding and read sequentially from the start. A ``cancel``
event is checked before each packet: a set one stops the read with
:class:`~dist_video.data.frame_index.Cancelled`.
"""

from __future__ import annotations

import threading

import numpy as np

from ..frame_index import (SEEK_GAP, STATS, FrameIndex, IndexMismatch, VideoDecodeError, check_cancel,
                           configure_threads, decode_packet, demux, open_video, recount, video_stream)

__all__ = ["read", "to_rgb"]

Size = tuple[int, int]  # (width, height) of the frames returned


def to_rgb(frame, size: Size) -> np.ndarray:
    """An FFmpeg frame as uint8 ``height x width x 3`` RGB of ``size``: converted as it is when
    it already has that size, else converted and resized (bilinear, area-weighted when
    shrinking) in one pass of FFmpeg's scaler."""
    width, height = size
    if frame.width == width and frame.height == height:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BILINEAR")


def read(path: str, wanted: list[int], index: FrameIndex, threads: int, size: Size,
         cancel: threading.Event | None = None) -> dict[int, np.ndarray]:
    """Frames ``wanted`` (ascending, distinct, clamped to the index's count) as uint8 RGB of
    ``size``: index -> frame. When the file turns out to hold fewer frames, the frames past its
    end are missing and its last decodable frame is included under its own index."""
    got: dict[int, np.ndarray] | None = None
    if index.pts is not None:
        try:
            got = _IndexedRead(path, wanted, index, size, cancel).run(threads)
        except IndexMismatch:
            got = None  # the index was wrong for this file: recount and decode sequentially
            STATS["fallbacks"] += 1
            index = recount(path, index, reason="its timestamps disagree with decoding")
    if got is not None and len(got) == len(wanted):
        return got
    if got is not None:
        # The file ended before frames its index promised: recount it by decoding.
        index = recount(path, index, reason="it has fewer decodable frames than indexed")
    n = index.info.num_frames
    frames, count, last = _read_sequential(path, [min(i, n - 1) for i in wanted] if n else wanted, threads, size,
                                           cancel)
    if count == 0:
        raise VideoDecodeError(path, "no decodable video frames")
    if count < index.info.num_frames:
        index = recount(path, index, reason="it has fewer decodable frames than indexed")
    if last is not None and count - 1 not in frames and any(i >= count for i in wanted):
        frames[count - 1] = to_rgb(last, size)
    return frames


def _read_sequential(path: str, wanted: list[int], threads: int, size: Size, cancel: threading.Event | None
                     ) -> tuple[dict[int, np.ndarray], int, object]:
    """Decode from the start, counting output frames. Returns (frames, frames decoded,
    last decoded frame): the last two let the caller clamp when the file ends early."""
    need = set(wanted)
    last_needed = wanted[-1]
    got: dict[int, np.ndarray] = {}
    count = 0
    last = None
    with open_video(path) as container:
        stream = video_stream(container, path)
        configure_threads(stream, threads)
        cc = stream.codec_context

        def take(frames) -> bool:
            nonlocal count, last
            for frame in frames:
                if count in need:
                    got[count] = to_rgb(frame, size)
                last = frame
                count += 1
                if count > last_needed:
                    return True
            return False

        for packet in demux(container, stream):
            check_cancel(cancel, path)
            if take(decode_packet(cc, packet)):
                return got, count, last
        take(decode_packet(cc, None))
    return got, count, last


class _IndexedRead:
    """One read with the pts index: skip unrequested non-reference frames, seek over long
    gaps; every frame the decoder outputs is checked against the index (``IndexMismatch``)."""

    def __init__(self, path: str, wanted: list[int], index: FrameIndex, size: Size,
                 cancel: threading.Event | None = None):
        assert index.pts is not None
        self.path, self.index, self.table, self.size, self.cancel = path, index, index.pts, size, cancel
        self.need = set(wanted)
        self.remaining = list(wanted)  # ascending; remaining[0] is the next frame to obtain
        self.got: dict[int, np.ndarray] = {}
        self.pos = -1            # index of the last frame the decoder output
        self.min_valid = 0       # after a seek: frames before the keyframe are not trusted
        self.expect_key = -1     # after a seek: the first trusted frame must be this keyframe
        self.skipping: str | None = None

    def next_seek_target(self) -> int:
        """The keyframe to seek to for the next requested frame, or -1 to decode on."""
        keyframes = self.index.keyframes
        if not self.index.seekable or keyframes.size == 0 or not self.remaining:
            return -1
        first = self.remaining[0]
        if first < keyframes[0]:
            return -1
        k = int(keyframes[np.searchsorted(keyframes, first, side="right") - 1])
        return k if k - max(self.pos, 0) >= SEEK_GAP and k > self.pos else -1

    def take(self, frames) -> None:
        for frame in frames:
            i = self.table.index_of(frame.pts)
            if i < 0:
                raise IndexMismatch(f"frame pts {frame.pts} not in the index")
            if i < self.min_valid:
                continue
            if self.expect_key >= 0:
                if i != self.expect_key:
                    raise IndexMismatch(f"seek to keyframe {self.expect_key} resumed at frame {i}")
                self.expect_key = -1
            if i <= self.pos:
                raise IndexMismatch(f"frame {i} after frame {self.pos}")
            self.pos = i
            if i in self.need and i not in self.got:
                self.got[i] = to_rgb(frame, self.size)
                while self.remaining and self.remaining[0] in self.got:
                    self.remaining.pop(0)

    def seek(self, container, stream, target: int) -> None:
        container.seek(self.table.pts_of(target), stream=stream, backward=True, any_frame=False)
        STATS["seeks"] += 1
        stream.codec_context.flush_buffers()
        self.min_valid = self.expect_key = target
        self.pos = target - 1

    def set_skip(self, cc, skip: str) -> None:
        if skip != self.skipping:
            cc.skip_frame = self.skipping = skip

    def decode_until_seek(self, container, stream) -> bool:
        """Decode packets until every frame is obtained or a seek pays off; True when the
        caller should seek, False when done (all frames, or the end of the stream)."""
        cc = stream.codec_context
        for packet in demux(container, stream):
            check_cancel(self.cancel, self.path)
            i = self.table.index_of(packet.pts)
            self.set_skip(cc, "DEFAULT" if (i >= 0 and i in self.need and i not in self.got) else "NONREF")
            before = len(self.remaining)
            self.take(decode_packet(cc, packet))
            if not self.remaining:
                return False
            if len(self.remaining) != before and self.next_seek_target() >= 0:
                return True
        self.set_skip(cc, "DEFAULT")
        self.take(decode_packet(cc, None))
        return False

    def run(self, threads: int) -> dict[int, np.ndarray]:
        with open_video(self.path) as container:
            stream = video_stream(container, self.path)
            configure_threads(stream, threads)
            while self.remaining:
                target = self.next_seek_target()
                if target >= 0:
                    self.seek(container, stream, target)
                if not self.decode_until_seek(container, stream):
                    break
        return self.got
