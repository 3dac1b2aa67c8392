"""Rolling predictions on live input: a camera, a network stream, standard input, or a file
played at its real speed (:func:`watch`; the command line's ``watch``: :func:`run_watch`).

Stream time is the count of frames received over the stream's frame rate (25 if it declares
none): window k covers ``[k s, k s + w]`` seconds of it and takes its T dense frames on the grid
of :mod:`dist_video.engine.timeline` (step ``max(1, floor(w fps / T))`` frames, sparse frames on
multiples of ``alpha`` steps), so overlapping windows share their sparse frames and a fused
model's CLIP sees each of them once (:mod:`dist_video.engine.shared_frames`). A window is
predicted once its last frame has arrived; its latency is the wall time from that moment to
its prediction.

One reader thread decodes the source, crops and resizes only the grid frames (uint8), keeps the
frames of the window in progress and hands each finished window to a queue of one; the calling
thread runs the model. Real time is a contract: from a live source (or a file with
``realtime=True``) a window that finds the queue full replaces the one waiting there, which is
counted as skipped, so a model slower than the stream falls behind by at most one window and
memory stays flat. A file read without ``realtime`` is read as fast as the model goes, every
window predicted. A live source that drops (an error, or the end of a network stream) is
reopened up to ``reconnect`` times with back-off (0.5 s doubling to 8 s); stream time goes on
from the frames already received.
"""

from __future__ import annotations

import csv as csv_module
import io
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterator

import av
import numpy as np
import torch

from .data.decoding import Cancelled, VideoDecodeError, video_stream
from .data.sampling import build_sampler
from .engine.data import test_transform
from .engine.inference import class_names_of, model_device
from .engine.shared_frames import shared_frames
from .engine.timeline import draw_label, grid_frames, grid_step, join_producer, label_font, window_bounds

__all__ = ["watch", "run_watch", "SourceError", "NETWORK_SCHEMES", "open_source", "format_summary"]

log = logging.getLogger(__name__)

#: URL schemes read as network streams (each where this FFmpeg build has the protocol).
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "srt", "tcp")
#: Seconds to wait for a source to open or for its next data before calling it dropped.
DEFAULT_TIMEOUT = 10.0


class SourceError(Exception):
    """A source that cannot be opened or read: the message is one line naming it."""


def _scheme(source: str) -> str | None:
    head, sep, _ = source.partition("://")
    return head.lower() if sep and head.lower() in NETWORK_SCHEMES else None


def _is_live(source: str) -> bool:
    return source == "-" or source.startswith("/dev/") or _scheme(source) is not None


def open_source(source: str, timeout: float = DEFAULT_TIMEOUT):
    """An open PyAV container with a video stream for ``source`` (see the module docstring),
    or :class:`SourceError` with one line naming it: a missing device or file, a refused or
    timed-out connection, something that is not a video."""
    if source != "-" and _scheme(source) is None and not os.path.exists(source):
        what = "no such camera device" if source.startswith("/dev/") else "no such file"
        raise SourceError(f"{source}: {what}")
    kwargs: dict = {"metadata_errors": "ignore", "timeout": (timeout, timeout)}
    if source.startswith("/dev/"):
        kwargs["format"] = "v4l2"
    try:
        container = av.open("pipe:0" if source == "-" else source, mode="r", **kwargs)
    except av.ExitError:  # the timeout's interrupt
        raise SourceError(f"{source}: cannot open: no data within {timeout:g} s") from None
    except av.FFmpegError as e:
        raise SourceError(f"{source}: cannot open: {getattr(e, 'strerror', None) or e}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{source}: cannot open: {e}") from None
    try:
        video_stream(container, source)
    except VideoDecodeError as e:
        container.close()
        cause = e.cause if e.cause.startswith("not a video") else f"not a video: {e.cause}"
        raise SourceError(f"{source}: {cause}") from None
    return container


@dataclass
class _Job:
    """A window ready to predict: its grid frames' keys, its uint8 clip 3 x T x S x S, when its last
    frame arrived (``time.monotonic``) and the windows skipped before it so far."""

    index: int
    start: float
    end: float
    keys: list[int]
    clip: torch.Tensor
    arrived: float
    skipped: int


@dataclass
class _End:
    reason: str
    error: bool = False


class _Windows:
    """Window k's grid frames and the uint8 frames kept for the window in progress."""

    def __init__(self, fps: float, window: float, stride: float, frames: int, alpha: int, step: int, geometry):
        self.fps, self.window, self.stride = fps, window, stride
        self.frames, self.alpha, self.step, self.geometry = frames, alpha, step, geometry
        self.k = 0
        self.kept: dict[int, torch.Tensor] = {}

    def plan(self, k: int) -> list[int]:
        bounds = [(k * self.stride, k * self.stride + self.window)]
        return grid_frames(bounds, self.fps, 2 ** 62, frames=self.frames, alpha=self.alpha, step=self.step)[0]

    def add(self, i: int, frame: av.VideoFrame, skipped: int) -> list[_Job]:
        """Frame ``i`` has arrived: the windows it completes."""
        current = self.plan(self.k)
        if i % self.step == 0 and i >= current[0]:
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).unsqueeze(0)  # 1 x H x W x 3
            self.kept[i] = self.geometry(rgb)  # uint8 3 x 1 x S x S
        jobs = []
        while i >= current[-1]:
            clip = torch.cat([self.kept[j] for j in current], dim=1)
            jobs.append(_Job(self.k, self.k * self.stride, self.k * self.stride + self.window, current, clip,
                             time.monotonic(), skipped))
            self.k += 1
            current = self.plan(self.k)
            for j in [j for j in self.kept if j < current[0]]:
                del self.kept[j]
        return jobs


@dataclass
class _Annotator:
    """The stream re-encoded (H.264, MP4) with the running label drawn on every frame."""

    path: str
    fps: float
    label: str = "..."
    out: object = None
    stream: object = None
    font: object = None
    rate: Fraction = Fraction(25)
    count: int = 0

    def write(self, frame: av.VideoFrame) -> None:
        if self.out is None:
            self.out = av.open(self.path, mode="w")
            self.rate = Fraction(self.fps).limit_denominator(1001)
            self.stream = self.out.add_stream("libx264", rate=self.rate)
            self.stream.width, self.stream.height = frame.width // 2 * 2, frame.height // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            self.font = label_font(self.stream.height)
        image = frame.to_image().crop((0, 0, self.stream.width, self.stream.height))
        draw_label(image, self.label, self.font)
        new = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
        new.pts, new.time_base = self.count, 1 / self.rate
        self.count += 1
        for packet in self.stream.encode(new):
            self.out.mux(packet)

    def close(self) -> None:
        if self.out is not None:
            for packet in self.stream.encode():
                self.out.mux(packet)
            self.out.close()


class _Reader(threading.Thread):
    """Decodes the source, pacing a ``realtime`` file, and offers finished windows to ``jobs``
    (see the module docstring); puts an :class:`_End` (or the exception) last."""

    def __init__(self, container, source: str, windows: _Windows, jobs: queue.Queue, *, realtime: bool,
                 reconnect: int, timeout: float, annotator: _Annotator | None):
        super().__init__(name="dist-video-watch", daemon=True)
        self.container, self.source, self.windows, self.jobs = container, source, windows, jobs
        self.live, self.realtime = _is_live(source), realtime
        self.drop = self.live or realtime
        self.reconnect, self.timeout, self.annotator = reconnect, timeout, annotator
        self.stop = threading.Event()
        self.index = self.skipped = self.reconnects = 0

    def run(self) -> None:
        try:
            self._put(self._read_all())
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            self._put(e)

    def _read_all(self) -> _End:
        container, attempts = self.container, 0
        while True:
            lost = self._read(container)
            if lost is None or self.stop.is_set():
                return _End("end of stream")
            while True:
                if attempts >= self.reconnect:
                    tried = f" ({attempts} reconnects failed)" if self.reconnect else ""
                    return _End(f"{self.source}: {lost}{tried}", error=True)
                attempts += 1
                delay = min(8.0, 0.5 * 2 ** (attempts - 1))
                log.warning("%s: %s; reconnecting in %.1f s (%d of %d)", self.source, lost, delay, attempts,
                            self.reconnect)
                if self.stop.wait(delay):
                    return _End("stopped")
                try:
                    container = open_source(self.source, self.timeout)
                except SourceError as e:
                    lost = str(e).removeprefix(f"{self.source}: ")
                    continue
                self.reconnects += 1
                attempts = 0
                break

    def _read(self, container) -> str | None:
        """Decode until the end (None for a file or stdin) or a drop (its cause)."""
        try:
            stream = video_stream(container, self.source)
            stream.thread_type = "AUTO"
            paced = None
            for frame in container.decode(stream):
                if self.stop.is_set():
                    return None
                if self.realtime and frame.time is not None:
                    paced = paced if paced is not None else time.monotonic() - frame.time
                    if self.stop.wait(max(0.0, paced + frame.time - time.monotonic())):
                        return None
                if self.annotator is not None:
                    self.annotator.write(frame)
                for job in self.windows.add(self.index, frame, self.skipped):
                    self._offer(job)
                self.index += 1
        except (av.FFmpegError, OSError, VideoDecodeError) as e:
            return f"the stream dropped: {getattr(e, 'strerror', None) or e}"
        finally:
            container.close()
        return "the stream ended" if _scheme(self.source) else None

    def _offer(self, job: _Job) -> None:
        """Queue ``job``; when dropping, the window waiting in the queue (if any) is skipped."""
        while not self.drop and not self.stop.is_set():
            try:
                self.jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue
        while self.drop:
            try:
                self.jobs.put_nowait(job)
                return
            except queue.Full:
                try:
                    self.jobs.get_nowait()
                    self.skipped += 1
                    job.skipped = self.skipped
                except queue.Empty:
                    pass

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.jobs.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


@dataclass
class _Stats:
    """Windows predicted, skipped, and a sample of their latencies for the percentiles: every
    ``every``-th one, at most ``keep`` (when full, every other one is dropped and ``every``
    doubles, so memory stays flat over a long run)."""

    windows: int = 0
    skipped: int = 0
    latencies: list[float] = field(default_factory=list)
    every: int = 1
    keep: int = 20_000

    def add(self, latency: float, skipped: int) -> None:
        self.windows += 1
        self.skipped = max(self.skipped, skipped)
        if self.windows % self.every == 0:
            self.latencies.append(latency)
        if len(self.latencies) >= self.keep:
            self.latencies, self.every = self.latencies[::2], 2 * self.every

    def summary(self, ended: str, error: bool = False) -> dict:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, math.ceil(q * len(lat)) - 1)], 4) if lat else None

        return {"type": "summary", "windows": self.windows, "skipped": self.skipped,
                "latency_median": pct(0.5), "latency_p95": pct(0.95), "ended": ended, "error": error}


def format_summary(summary: dict) -> str:
    """The summary record on one line."""
    def ms(v):
        return "-" if v is None else f"{1000 * v:.0f} ms"

    return (f"{summary['windows']} windows, {summary['skipped']} skipped, latency median "
            f"{ms(summary['latency_median'])}, p95 {ms(summary['latency_p95'])} ({summary['ended']})")


def _predictor(model, head, transform) -> tuple[Callable, int]:
    """``(predict(keys, clip uint8 3 x T x S x S) -> C probabilities, alpha)``: CLIP shared
    between windows when the model allows, else the model on each window's clip."""
    device = model_device(model)

    def probabilities(z: torch.Tensor) -> torch.Tensor:
        return model.classify(z, head).float().softmax(dim=1)

    shared = shared_frames(model, lambda x: transform.normalize(x), probabilities)
    if shared is not None:
        def predict(keys, clip):
            out = shared.outputs([(keys, clip.to(device))])[0]
            shared.forget_before(keys[0])
            return out
        return predict, shared.alpha
    if head is not None:
        raise ValueError("a separate head needs a fused model")

    def predict_alone(keys, clip):
        return model(transform.normalize(clip[None].to(device))).float().softmax(dim=1)[0]
    return predict_alone, getattr(model, "alpha", None) or 1


def _fused(model):
    from .classifier import VideoClassifier
    return model.fuse() if isinstance(model, VideoClassifier) else model


def _records(jobs: queue.Queue, reader: _Reader, predict, names: list[str], topk: int, stats: _Stats,
             cancel: threading.Event) -> Iterator[dict]:
    """The window records as the reader's windows are predicted; returns the :class:`_End`."""
    while True:
        try:
            item = jobs.get(timeout=0.1)
        except queue.Empty:
            if cancel.is_set():
                raise Cancelled(f"{reader.source}: cancelled") from None
            continue
        if isinstance(item, _End):
            return item
        if isinstance(item, BaseException):
            raise item
        with torch.no_grad():
            p = predict(item.keys, item.clip)
        latency = time.monotonic() - item.arrived
        stats.add(latency, item.skipped)
        values, idx = p.topk(min(topk, p.shape[0]))
        top = [{"class": names[i], "probability": round(float(v), 6)} for v, i in zip(values.tolist(), idx.tolist())]
        if reader.annotator is not None:
            reader.annotator.label = f"{top[0]['class']}  {100 * top[0]['probability']:.0f}%"
        yield {"type": "window", "window": item.index, "start": round(item.start, 3), "end": round(item.end, 3),
               "top": top, "latency": round(latency, 4), "skipped": item.skipped}


def watch(model, source: str, *, window: float, stride: float | None = None, preprocess: dict, topk: int = 5,
          realtime: bool = False, reconnect: int = 0, head=None, class_names=None,
          cancel: threading.Event | None = None, annotate: str | os.PathLike | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> Iterator[dict]:
    """Rolling predictions on ``source`` (see the module docstring): one record per window,
    ``{"type": "window", "window", "start", "end" (stream seconds), "top": [{"class",
    "probability"}, ...], "latency" (s), "skipped" (windows skipped so far)}``, then one
    ``{"type": "summary", "windows", "skipped", "latency_median", "latency_p95", "ended",
    "error"}`` at the end of the stream, on Ctrl-C, or when the source is lost for good
    (``error`` true). ``model``: an inference model (a fused model, or a classifier, fused
    here; anything callable on clips as for ``predict``); ``head``/``class_names``: another
    head of the fused model (e.g. :meth:`text_head` of label names) and its names;
    ``reconnect``: reopen a dropped live source this many times; ``annotate``: an MP4 of the
    stream with the running label. Raises :class:`SourceError` for a source that cannot be
    opened, ``ValueError`` for a window or stride that is not a positive number of seconds,
    :class:`~dist_video.data.decoding.Cancelled` once ``cancel`` is set."""
    window_bounds(window, window, stride)  # the window and stride are finite positive seconds
    stride = window if stride is None else stride
    model, cancel = _fused(model), cancel or threading.Event()
    p = preprocess
    transform = test_transform(p["crop_size"], p["test_scale"], 1, p["mean"], p["std"])
    predict, alpha = _predictor(model, head, transform)
    names = list(class_names) if class_names is not None else class_names_of(model)
    frames = model.config.num_frames
    container = open_source(source, timeout)
    rate = video_stream(container, source).average_rate
    fps = float(rate) if rate else 25.0
    step = grid_step(window, fps, frames, build_sampler(p["sampling"], frames, p.get("interval", 4)))
    windows = _Windows(fps, window, stride, frames, alpha, step, lambda rgb: transform.geometry(rgb)[0])
    jobs: queue.Queue = queue.Queue(maxsize=1)
    annotator = _Annotator(os.fspath(annotate), fps) if annotate is not None else None
    reader = _Reader(container, source, windows, jobs, realtime=realtime, reconnect=reconnect, timeout=timeout,
                     annotator=annotator)
    stats = _Stats()
    reader.start()
    try:
        end = yield from _records(jobs, reader, predict, names, topk, stats, cancel)
    except KeyboardInterrupt:
        end = _End("interrupted")
    finally:
        reader.stop.set()
        join_producer(reader, jobs)
        if annotator is not None:
            annotator.close()
    stats.skipped = max(stats.skipped, reader.skipped)
    yield stats.summary(end.reason, end.error)


def _csv_line(record: dict, topk: int) -> str:
    buffer = io.StringIO()
    row = [record["window"], record["start"], record["end"], record["latency"], record["skipped"]]
    row += [v for t in record["top"][:topk] for v in (t["class"], t["probability"])]
    csv_module.writer(buffer).writerow(row)
    return buffer.getvalue().rstrip("\r\n")


def run_watch(*, model, source: str, preprocess: dict, window: float, stride: float | None = None, topk: int = 5,
              realtime: bool = False, reconnect: int = 0, csv: bool = False, annotate: str | None = None,
              head=None, class_names=None, timeout: float = DEFAULT_TIMEOUT, out=None, err=None,
              cancel: threading.Event | None = None) -> int:
    """The ``watch`` command: :func:`watch`'s window records as JSON lines (or CSV rows, with a
    header) on ``out`` (stdout), the summary line on ``err`` (stderr). Exit status: 0 when the
    stream ended or was interrupted, 1 for a source that cannot be opened or was lost (one line
    on ``err``)."""
    out, err = out or sys.stdout, err or sys.stderr
    if csv:
        print(",".join(["window", "start", "end", "latency", "skipped"]
                       + [c for r in range(1, topk + 1) for c in (f"class_{r}", f"probability_{r}")]), file=out)
    stats, summary = _Stats(), None
    try:
        for record in watch(model, source, window=window, stride=stride, preprocess=preprocess, topk=topk,
                            realtime=realtime, reconnect=reconnect, head=head, class_names=class_names,
                            cancel=cancel, annotate=annotate, timeout=timeout):
            if record["type"] == "summary":
                summary = record
                break
            stats.add(record["latency"], record["skipped"])
            print(_csv_line(record, topk) if csv else json.dumps(record), file=out, flush=True)
    except (SourceError, ValueError) as e:
        print(f"error: {e}", file=err)
        return 1
    except (KeyboardInterrupt, Cancelled):
        summary = stats.summary("interrupted")
    if summary is None:
        summary = stats.summary("stopped")
    if summary["error"]:
        print(f"error: {summary['ended']}", file=err)
    print(format_summary(summary), file=err)
    if annotate and summary["windows"]:
        print(f"wrote {annotate}", file=err)
    return 1 if summary["error"] else 0
