"""Long videos: top classes over time, from sliding windows decoded in one streaming pass.

A video of N frames at ``fps`` lasts ``D = N / fps`` seconds. With a window of ``w`` seconds
and a stride of ``s``, window k covers ``[k s, min(k s + w, D)]`` for ``k = 0 .. K - 1``,
``K = max(1, ceil((D - w) / s) + 1)``: the windows cover the whole video, and a video shorter
than one window is one window. Each window is one clip of the model's T dense frames (one
central view, the centre crop), taken in one of two ways:

- **on the grid** (:func:`grid_frames`), when the model's CLIP work is per frame (a fused DiST
  model, or a fused frame-averaging model without adapters; see
  :mod:`dist_video.engine.shared_frames`): the grid step is ``g = max(1, floor(w fps / T))``
  frames (the model's interval, if its test sampler takes frames an interval apart and that is
  smaller), and the sparse frames (every alpha-th) fall on multiples of ``alpha g``. Window k's
  frames are ``first + j g`` (``j = 0 .. T - 1``), ``first`` the multiple of ``alpha g`` nearest
  to where a clip of that span would start centred in the window. So every window's sparse
  frames are points of one grid anchored to the video's first frame, overlapping windows share
  them, and each goes through CLIP once, kept only while a window still needs it;
- **by the model's test sampler** over the window's frames ``[round(k s fps), round(end fps))``
  (:func:`window_frames`), for any other model (e.g. an ONNX runner), run window by window.

Memory is bounded by the window, not by the video: one thread decodes the file from start to
end once (frames nobody asked for are never converted to RGB), crops and resizes each requested
frame as it comes (in uint8) and hands every finished window's clip to a small queue; the
calling thread copies the clips into one reused batch buffer on the model's device, normalises
it there and runs the model while the next ones are decoded. Only the clips of the windows in
progress (about ``w / s`` of them, their frames shared), the queue, the one batch and the CLIP
outputs of the sparse frames of the windows not yet run are held.

Bounds: ``w`` and ``s`` are finite positive seconds, at most ``max_windows`` windows (default
:data:`MAX_WINDOWS`), and no window starts at or after the end of the video. A ``cancel`` event
stops the decoding thread at the next frame and the model loop at the next clip
(:class:`Cancelled` is raised).
"""

from __future__ import annotations

import csv
import math
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
import torch

from ..data.decoding import Cancelled, VideoDecodeError, probe, video_stream
from ..data.sampling import build_sampler
from .data import test_transform
from .inference import class_names_of, model_device
from .shared_frames import SharedFrames, shared_frames

__all__ = ["Timeline", "Cancelled", "MAX_WINDOWS", "window_bounds", "window_frames", "grid_step", "grid_frames",
           "window_outputs", "video_timeline", "write_timeline_csv", "plot_timeline", "annotate_video", "label_font",
           "draw_label"]


#: The most windows one timeline may have (``max_windows``): a 3-hour video at one window per second.
MAX_WINDOWS = 11_000


@dataclass
class Timeline:
    """Class probabilities of a video's windows: ``probabilities`` K x C, window k spanning
    ``starts[k]`` to ``ends[k]`` seconds."""

    video: str
    starts: list[float]
    ends: list[float]
    probabilities: torch.Tensor
    class_names: list[str]
    fps: float
    num_frames: int

    def top(self, k: int, topk: int = 5) -> list[dict]:
        """Window ``k``'s ``[{"class", "probability"}, ...]``, best first."""
        p, idx = self.probabilities[k].topk(min(topk, self.probabilities.shape[1]))
        return [{"class": self.class_names[i], "probability": float(v)} for v, i in zip(p.tolist(), idx.tolist())]

    def to_dict(self, topk: int = 5) -> dict:
        """``{"video", "windows": [{"start", "end", "top": [...]}, ...]}`` (times in seconds)."""
        return {"video": self.video, "windows": [
            {"start": round(a, 3), "end": round(b, 3), "top": self.top(k, topk)}
            for k, (a, b) in enumerate(zip(self.starts, self.ends))]}

    def label_at(self, seconds: float) -> tuple[str, float]:
        """The top class (and its probability) of the window whose centre is nearest ``seconds``."""
        centres = [(a + b) / 2 for a, b in zip(self.starts, self.ends)]
        k = min(range(len(centres)), key=lambda j: abs(centres[j] - seconds))
        p, i = self.probabilities[k].max(dim=0)
        return self.class_names[int(i)], float(p)


def window_bounds(duration: float, window: float, stride: float | None = None, *,
                  max_windows: int = MAX_WINDOWS) -> list[tuple[float, float]]:
    """``[(start, end), ...]`` in seconds covering ``[0, duration]`` (see the module docstring).
    Raises ``ValueError`` naming the bound for a window or stride that is not a finite positive
    number of seconds, or that gives more than ``max_windows`` windows; windows that would
    start at or after ``duration`` are not made."""
    stride = window if stride is None else stride
    for name, value in (("window", window), ("stride", stride)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite positive number of seconds, got {value}")
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"the video's duration is not a finite number of seconds: {duration}")
    # K from the module docstring, less the windows that would start at or after the end; the
    # float estimate first, so that a tiny stride is refused before a huge count is made
    covering, starting = (duration - window) / stride, duration / stride  # either may be infinite
    estimate = max(1.0, min(covering + 1, starting))
    count = math.inf
    if covering <= 0:  # a video shorter than one window
        count = 1
    elif estimate <= max_windows + 1:
        count = max(1, min(math.ceil(covering - 1e-9) + 1 if math.isfinite(covering) else math.inf,
                           math.ceil(starting - 1e-9) if math.isfinite(starting) else math.inf))
    if count > max_windows:
        raise ValueError(f"window={window:g} s and stride={stride:g} s give about {estimate:.4g} windows over "
                         f"this {duration:.3f} s video, more than the limit of {max_windows} windows: "
                         "use a longer window or stride")
    return [(float(k * stride), float(min(k * stride + window, duration))) for k in range(count)]


def window_frames(bounds: Sequence[tuple[float, float]], fps: float, num_frames: int, sampler) -> list[list[int]]:
    """The frame indices of each window's clip: ``sampler`` (the model's test sampler, one view)
    over the window's frames ``[round(start fps), round(end fps))``, clamped to the video."""
    out = []
    for start, end in bounds:
        first = min(int(round(start * fps)), num_frames - 1)
        stop = min(max(int(round(end * fps)), first + 1), num_frames)
        out.append([first + i for i in sampler(stop - first, view=0, num_views=1)])
    return out


def grid_step(window: float, fps: float, num_frames: int, sampler=None) -> int:
    """The grid's step in frames for windows of ``window`` seconds and clips of ``num_frames``
    dense frames: ``max(1, floor(window fps / num_frames))``, or the interval of an interval
    ``sampler`` (one with a ``stride``) if that is smaller."""
    step = max(1, int(math.floor(window * fps / num_frames + 1e-9)))
    interval = getattr(sampler, "stride", None)
    return min(step, int(interval)) if interval else step


def grid_frames(bounds: Sequence[tuple[float, float]], fps: float, num_frames: int, *, frames: int, alpha: int,
                step: int) -> list[list[int]]:
    """The ``frames`` dense frame indices of each window's clip on the grid (see the module
    docstring): ``first + j step``, ``first`` the multiple of ``alpha step`` nearest to the
    centred start (at least 0); frames past the end of the video are its last frame."""
    period, span = alpha * step, (frames - 1) * step
    out = []
    for start, end in bounds:
        centred = (start + end) / 2 * fps - 0.5 - span / 2  # the first frame of a centred clip
        first = max(0, period * int(math.floor(centred / period + 0.5)))
        out.append([min(first + j * step, num_frames - 1) for j in range(frames)])
    return out


def _frame_slots(plan: list[list[int]]) -> dict[int, list[tuple[int, int]]]:
    """Frame index -> the ``(window, slot)`` places it fills in the windows' clips."""
    wanted: dict[int, list[tuple[int, int]]] = {}
    for k, frames in enumerate(plan):
        for slot, i in enumerate(frames):
            wanted.setdefault(i, []).append((k, slot))
    return wanted


def _stream_clips(path: str, plan: list[list[int]], transform, out: queue.Queue, stop: threading.Event,
                  cancel: threading.Event) -> None:
    """Decode ``path`` once, from the start; put ``(k, uint8 clip 3 x T x S x S)`` on ``out`` as soon
    as window k's frames are all decoded, then ``None``; a failure is put as the exception.
    ``stop`` (the consumer has gone) ends it silently, ``cancel`` with :class:`Cancelled`."""
    try:
        wanted = _frame_slots(plan)
        last_needed = max(wanted)
        # Windows in the order their last frame is decoded; each waits for its last frame.
        finish = sorted(range(len(plan)), key=lambda k: (max(plan[k]), k))
        slots: dict[int, list[torch.Tensor | None]] = {}
        done = 0
        last_rgb = None

        def emit_until(i: int) -> None:
            nonlocal done
            while done < len(finish) and max(plan[finish[done]]) <= i:
                k = finish[done]
                out.put((k, torch.cat(slots.pop(k), dim=1)))
                done += 1

        def frame_tensor(frame) -> torch.Tensor:
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).unsqueeze(0)  # 1 x H x W x 3
            return transform.geometry(rgb)[0]  # uint8 3 x 1 x S x S

        index = -1
        with av.open(path, mode="r", metadata_errors="ignore") as container:
            stream = video_stream(container, path)
            stream.thread_type = "AUTO"
            try:
                for frame in container.decode(stream):
                    if stop.is_set():
                        return
                    if cancel.is_set():
                        raise Cancelled(f"{path}: cancelled while decoding")
                    index += 1
                    if index in wanted:
                        x = frame_tensor(frame)
                        for k, slot in wanted.pop(index):
                            slots.setdefault(k, [None] * len(plan[k]))[slot] = x
                        emit_until(index)
                    last_rgb = frame
                    if index >= last_needed:
                        break
            except av.FFmpegError:
                pass  # a damaged or truncated end: windows past it get the last decodable frame
        if index < 0:
            raise VideoDecodeError(path, "no decodable video frames")
        if wanted:  # the file ended early: the missing frames are its last decodable frame
            x = frame_tensor(last_rgb)
            for i in sorted(wanted):
                for k, slot in wanted[i]:
                    slots.setdefault(k, [None] * len(plan[k]))[slot] = x
            emit_until(last_needed)
        out.put(None)
    except av.FFmpegError as e:
        out.put(VideoDecodeError(path, f"decoding failed: {type(e).__name__}: {getattr(e, 'strerror', None) or e}"))
    except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
        out.put(e)


def _clips(path: str, plan: list[list[int]], transform, depth: int, cancel: threading.Event
           ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(window, clip)`` pairs from a decoding thread, at most ``depth`` waiting; the thread has
    ended when this generator is closed."""
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    worker = threading.Thread(target=_stream_clips, args=(path, plan, transform, out, stop, cancel), daemon=True,
                              name="dist-video-decode")
    worker.start()
    try:
        while True:
            if cancel.is_set():
                raise Cancelled(f"{path}: cancelled")
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        join_producer(worker, out)


def join_producer(producer: threading.Thread, items: queue.Queue) -> None:
    """Wait for ``producer`` to end once it has been told to stop, emptying ``items`` meanwhile:
    a producer blocked on ``items.put`` into the full bounded queue could not see the stop."""
    while producer.is_alive():
        try:
            items.get(timeout=0.05)
        except queue.Empty:
            pass
    producer.join()


class _WindowRunner:
    """The model loop of :func:`window_outputs`: window clips in, ``batch_size`` at a time, into
    one reused uint8 and one float buffer on ``device``; outputs K x D on the CPU. With ``shared``
    the clips go through :meth:`SharedFrames.outputs` and each frame's CLIP outputs are dropped
    once the last window that reads it has run."""

    def __init__(self, fn, plan: list[list[int]], transform, batch_size: int, device,
                 shared: SharedFrames | None):
        self.fn, self.plan, self.transform, self.shared = fn, plan, transform, shared
        self.batch_size, self.device = batch_size, device
        self.uses: dict[int, int] = {}  # frame -> windows not yet run that read it
        for frames in plan:
            for i in set(frames):
                self.uses[i] = self.uses.get(i, 0) + 1
        self.outputs: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None
        self.normalized: torch.Tensor | None = None
        self.batch: list[tuple[int, torch.Tensor]] = []

    def add(self, item: tuple[int, torch.Tensor]) -> None:
        self.batch.append(item)
        if len(self.batch) == self.batch_size:
            self.run()

    def run(self) -> None:
        batch = self.batch
        if not batch:
            return
        if self.inputs is None:
            self.inputs = torch.empty((self.batch_size, *batch[0][1].shape), dtype=torch.uint8, device=self.device)
            self.normalized = torch.empty(self.inputs.shape, dtype=torch.float32, device=self.device)
        x = self.inputs[:len(batch)]
        for row, (_, clip) in zip(x, batch):
            row.copy_(clip, non_blocking=True)
        if self.shared is None:
            y = self.fn(self.transform.normalize(x, out=self.normalized[:len(batch)])).float().cpu()
        else:
            y = self.shared.outputs([(self.plan[k], row) for row, (k, _) in zip(x, batch)]).float().cpu()
            self._release([k for k, _ in batch])
        if self.outputs is None:
            self.outputs = torch.empty(len(self.plan), y.shape[1])
        self.outputs[[k for k, _ in batch]] = y
        batch.clear()

    def _release(self, windows: list[int]) -> None:
        done = []
        for k in windows:
            for i in set(self.plan[k]):
                self.uses[i] -= 1
                if self.uses[i] == 0:
                    done.append(i)
        self.shared.forget(done)


@torch.no_grad()
def window_outputs(fn, path: str | os.PathLike, preprocess: dict, *, num_frames: int, window: float,
                   stride: float | None = None, batch_size: int = 8, device: torch.device | str = "cpu",
                   max_windows: int = MAX_WINDOWS, cancel: threading.Event | None = None, model=None,
                   then=None, share: bool = True
                   ) -> tuple[list[tuple[float, float]], torch.Tensor, float, int]:
    """``fn`` (B x 3 x T x S x S -> B x D) of every window's clip, decoded in one streaming pass
    and run ``batch_size`` clips at a time: ``(bounds, outputs K x D (CPU), fps, frame count)``.
    ``model``: the fused model behind ``fn`` (``fn(x) == then(model.encode_video(x))``,
    ``then`` default the identity); when its CLIP work is per frame the windows are on the grid
    and each grid frame goes through CLIP once (see the module docstring; ``share=False``: ``fn``
    runs per window on the same grid frames), else ``fn`` runs per window on the sampler's frames.
    Raises :class:`VideoDecodeError` for a file that cannot be read, ``ValueError`` for windows
    out of bounds (:func:`window_bounds`), :class:`Cancelled` once ``cancel`` is set."""
    path = os.fspath(path)
    cancel = cancel or threading.Event()
    info = probe(path)
    fps = info.fps if info.fps > 0 else 25.0
    n = info.num_frames
    bounds = window_bounds(n / fps, window, stride, max_windows=max_windows)
    p = preprocess
    transform = test_transform(p["crop_size"], p["test_scale"], 1, p["mean"], p["std"])
    shared = None if model is None else shared_frames(model, lambda x: transform.normalize(x), then)
    sampler = build_sampler(p["sampling"], num_frames, p.get("interval", 4))
    if shared is not None:
        plan = grid_frames(bounds, fps, n, frames=num_frames, alpha=shared.alpha,
                           step=grid_step(window, fps, num_frames, sampler))
    else:
        plan = window_frames(bounds, fps, n, sampler)
    runner = _WindowRunner(fn, plan, transform, batch_size, device, shared if share else None)
    for item in _clips(path, plan, transform, depth=batch_size, cancel=cancel):
        runner.add(item)
    runner.run()
    return bounds, runner.outputs, fps, n


def video_timeline(model, path: str | os.PathLike, preprocess: dict, *, window: float,
                   stride: float | None = None, batch_size: int = 8, max_windows: int = MAX_WINDOWS,
                   cancel: threading.Event | None = None, share: bool = True) -> Timeline:
    """The timeline of one video through an inference-form model (callable on B x 3 x T x H x W
    -> B x C logits, with ``class_names``, ``num_classes``, ``config.num_frames``): window
    clips decoded in one streaming pass (see the module docstring), classified ``batch_size``
    at a time; a fused model's CLIP work is shared between windows (``share=False``: each window
    on its own, on the same grid frames). Raises as :func:`window_outputs`."""
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=1)

    bounds, probs, fps, n = window_outputs(lambda x: probabilities(model(x)), path, preprocess,
                                           num_frames=model.config.num_frames, window=window, stride=stride,
                                           batch_size=batch_size, device=model_device(model),
                                           max_windows=max_windows, cancel=cancel,
                                           model=model, then=lambda z: probabilities(model.classify(z)),
                                           share=share)
    return Timeline(video=os.fspath(path), starts=[a for a, _ in bounds], ends=[b for _, b in bounds],
                    probabilities=probs, class_names=class_names_of(model), fps=fps, num_frames=n)


def write_timeline_csv(timelines: Sequence[Timeline], path: str | os.PathLike, topk: int = 5) -> Path:
    """One row per window: ``video, start, end``, then ``class_1, probability_1, ...`` (top-k)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "start", "end"] + [c for r in range(1, topk + 1) for c in (f"class_{r}",
                                                                                          f"probability_{r}")])
        for t in timelines:
            for k, (a, b) in enumerate(zip(t.starts, t.ends)):
                top = t.top(k, topk)
                w.writerow([t.video, f"{a:.3f}", f"{b:.3f}"]
                           + [v for item in top for v in (item["class"], f"{item['probability']:.6f}")])
    return path


def plot_timeline(timeline: Timeline, path: str | os.PathLike, classes: int = 5) -> Path:
    """A PNG of the probabilities over time (window centres) of the ``classes`` classes that are
    most probable in some window."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = timeline.probabilities
    shown = probs.max(dim=0).values.argsort(descending=True)[:classes].tolist()
    centres = [(a + b) / 2 for a, b in zip(timeline.starts, timeline.ends)]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for c in shown:
        ax.plot(centres, probs[:, c].tolist(), marker="o" if len(centres) < 60 else None, label=timeline.class_names[c])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(timeline.ends))
    ax.set_title(Path(timeline.video).name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def label_font(height: int):
    """The font labels are drawn in on frames ``height`` pixels high."""
    from PIL import ImageFont  # Pillow comes with matplotlib
    size = max(12, height // 18)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def draw_label(image, text: str, font) -> None:
    """Draw ``text`` (white on a black box) at the top left of a PIL ``image``, in place."""
    from PIL import ImageDraw  # Pillow comes with matplotlib

    draw = ImageDraw.Draw(image)
    box = draw.textbbox((8, 6), text, font=font)
    draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
    draw.text((8, 6), text, fill=(255, 255, 255), font=font)


def annotate_video(timeline: Timeline, out: str | os.PathLike, *, crf: int = 23) -> Path:
    """Re-encode the timeline's video (H.264, MP4) with the current top label and its
    probability drawn on every frame: the source's frames, frame count and frame rate (an odd
    width or height loses its last pixel row/column, which H.264's 4:2:0 needs)."""
    src = timeline.video
    rate = Fraction(timeline.fps).limit_denominator(1001)
    out = Path(out)
    with av.open(src, mode="r", metadata_errors="ignore") as container:
        stream = video_stream(container, src)
        stream.thread_type = "AUTO"
        rate = stream.average_rate or rate
        width, height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
        font = label_font(height)
        with av.open(str(out), mode="w") as target:
            ost = target.add_stream("libx264", rate=rate)
            ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
            ost.options = {"crf": str(crf)}
            index = 0
            try:
                for frame in container.decode(stream):
                    image = frame.to_image().crop((0, 0, width, height))
                    name, p = timeline.label_at(index / timeline.fps)
                    draw_label(image, f"{name}  {100 * p:.0f}%", font)
                    new = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
                    new.pts = index
                    new.time_base = 1 / Fraction(rate)
                    for packet in ost.encode(new):
                        target.mux(packet)
                    index += 1
            except av.FFmpegError:
                pass  # a damaged end: the frames decoded so far are written
            for packet in ost.encode():
                target.mux(packet)
    return out
