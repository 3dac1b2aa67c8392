"""Probe-time checks: what an upload would cost is bounded before any frame is decoded.

From the container's header (nothing decoded): the frame size (``max_frame_pixels``). From
:func:`~dist_video.data.decoding.probe` (frames counted, not converted): a file whose header
lists more frames than can be decoded is truncated (422); for the test views, views x frames
per clip (``max_frames``) and the RGB bytes of those frames at the upload's size
(``max_decoded_bytes``); for a timeline, the window count (``max_windows``, checked by
:func:`~dist_video.engine.timeline.window_bounds`) and the bytes the streaming pass holds (one
frame at the upload's size, and the clips of the windows in progress at the crop size).
"""

from __future__ import annotations

import math

import av

from ..data.decoding import VideoDecodeError, VideoInfo, probe, video_stream
from ..engine.timeline import window_bounds
from .requests import RequestError, RequestOptions
from .settings import ServeSettings

__all__ = ["check_upload", "header_size"]

#: Clips a timeline holds besides the windows in progress: a queue and a batch (8 each).
TIMELINE_CLIPS_IN_FLIGHT = 16


def header_size(path: str) -> tuple[int, int, int]:
    """``(width, height, frames)`` of the video stream from the container's header (frames: the
    count the header lists, 0 when it lists none); nothing is decoded."""
    try:
        with av.open(path, mode="r", metadata_errors="ignore") as container:
            stream = video_stream(container, path)
            return int(stream.codec_context.width), int(stream.codec_context.height), int(stream.frames or 0)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"cannot open: {type(e).__name__}: {getattr(e, 'strerror', None) or e}") \
            from None


def check_upload(path: str, name: str, options: RequestOptions, settings: ServeSettings, *,
                 num_frames: int, preprocess: dict) -> VideoInfo:
    """The upload's :class:`VideoInfo`, once it is within the server's bounds; else
    :class:`RequestError` (400 naming the bound, 422 for a truncated file) or
    :class:`VideoDecodeError` (not a readable video). ``num_frames``: frames per clip."""
    width, height, listed = header_size(path)
    if width * height > settings.max_frame_pixels:
        raise RequestError(400, f"{name}: frames of {width}x{height} pixels are larger than the limit of "
                                f"{settings.max_frame_pixels} pixels (max_frame_pixels)")
    info = probe(path)
    if listed and info.num_frames < listed:
        raise RequestError(422, f"{name}: the file is truncated or damaged: {info.num_frames} of the {listed} "
                                "frames its header lists can be decoded")
    frame_bytes = width * height * 3
    if options.window is None:
        views = options.views or int(preprocess["num_views"])
        frames = views * num_frames
        if frames > settings.max_frames:
            raise RequestError(400, f"views={views} x {num_frames} frames per clip = {frames} frames, more than the "
                                    f"limit of {settings.max_frames} frames per request (max_frames)")
        held = frames * frame_bytes
    else:
        fps = info.fps if info.fps > 0 else 25.0
        try:
            bounds = window_bounds(info.num_frames / fps, options.window, options.stride,
                                   max_windows=settings.max_windows)
        except ValueError as e:
            raise RequestError(400, f"{name}: {e}") from None
        ratio = options.window / (options.stride or options.window)  # windows in progress at once
        overlap = min(len(bounds), math.ceil(ratio) + 1) if math.isfinite(ratio) else len(bounds)
        crop = int(preprocess["crop_size"])
        held = frame_bytes + (overlap + TIMELINE_CLIPS_IN_FLIGHT) * num_frames * 3 * crop * crop
    if held > settings.max_decoded_bytes:
        raise RequestError(400, f"{name}: the request would hold {held} bytes of decoded frames, more than the "
                                f"limit of {settings.max_decoded_bytes} bytes (max_decoded_bytes): ask for fewer "
                                "views, a longer stride, or send a smaller video")
    return info
