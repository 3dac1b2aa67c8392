"""Live input and shared CLIP work: windows on one frame grid give exactly the per-window
outputs with one CLIP forward per frame; ``watch`` on a loopback stream, a stream that drops and
comes back, a real-time file with a model slower than the stream, bad sources."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from data_helpers import write_coded_video
from deploy_helpers import CLASS_NAMES, TINY_PREPROCESS, free_port, tiny_dist_model

from dist_video import BaselineConfig, FrozenMeanClassifier
from dist_video.data.decoding import probe, read_frames
from dist_video.data.sampling import build_sampler
from dist_video.engine import data as engine_data
from dist_video.engine.shared_frames import SharedFrames
from dist_video.engine.timeline import grid_frames, grid_step, video_timeline, window_bounds
from dist_video.live import run_watch, watch

FPS = 25
PRE = {**TINY_PREPROCESS, "num_views": 1}


def tiny_dist(clip_factory) -> torch.nn.Module:
    """A fused DiST model (tiny CLIP, 8 dense frames, alpha 2) with a random linear head."""
    return tiny_dist_model(clip_factory).fuse()


def tiny_frame_model(clip_factory) -> torch.nn.Module:
    torch.manual_seed(3)
    model = FrozenMeanClassifier(clip_factory(), BaselineConfig(num_frames=8, alpha=2), clip_dtype=torch.float32)
    model.set_linear_head(len(CLASS_NAMES), CLASS_NAMES)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    return model.fuse()


def count_clip_frames(fused) -> list[int]:
    """The number of frames of each call of the model's CLIP (appended as it is called)."""
    seen: list[int] = []
    forward_layers, forward = fused.clip.forward_layers, fused.clip.forward

    def layers(images, which):
        seen.extend([images.shape[0]])
        return forward_layers(images, which)

    def whole(images):
        seen.extend([images.shape[0]])
        return forward(images)

    fused.clip.forward_layers = layers
    fused.clip.forward = whole
    return seen


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_coded_video(tmp_path_factory.mktemp("live") / "v.mp4", 200, width=96, height=64, fps=FPS)


def per_window(fused, path: Path, window: float, stride: float) -> tuple[list[list[int]], torch.Tensor]:
    """Each window run on its own: its grid frames read by index, the model on that one clip."""
    info = probe(path)
    bounds = window_bounds(info.num_frames / info.fps, window, stride)
    step = grid_step(window, info.fps, 8, build_sampler("segment", 8))
    plan = grid_frames(bounds, info.fps, info.num_frames, frames=8, alpha=2, step=step)
    transform = engine_data.test_transform(64, 64, 1, PRE["mean"], PRE["std"])
    with torch.no_grad():
        probs = [fused(transform(read_frames(path, frames))[0][None]).float().softmax(dim=1)[0] for frames in plan]
    return plan, torch.stack(probs)


@pytest.mark.parametrize("make", [tiny_dist, tiny_frame_model], ids=["dist", "frame-model"])
def test_shared_windows_equal_per_window_runs_with_one_clip_forward_per_frame(make, tiny_clip, video, monkeypatch):
    fused = make(tiny_clip)
    plan, expected = per_window(fused, video, window=2, stride=0.5)
    held: list[int] = []
    outputs = SharedFrames.outputs

    def spy(self, windows):
        out = outputs(self, windows)
        held.append(len(self.cache))
        return out

    monkeypatch.setattr(SharedFrames, "outputs", spy)
    seen = count_clip_frames(fused)
    timeline = video_timeline(fused, video, PRE, window=2, stride=0.5, batch_size=3)
    assert len(timeline.starts) == len(plan) == 13
    torch.testing.assert_close(timeline.probabilities, expected, rtol=0, atol=1e-5)
    sparse = {i for frames in plan for i in frames[::2]}
    assert sum(seen) == len(sparse) < 4 * len(plan)  # one CLIP forward per grid frame, shared
    assert max(held) <= 3 * 4 < len(sparse)  # the sparse frames of one batch of windows at most
    # the same frames run window by window (no sharing) give the same timeline
    alone = video_timeline(fused, video, PRE, window=2, stride=0.5, batch_size=3, share=False)
    torch.testing.assert_close(alone.probabilities, expected, rtol=0, atol=1e-5)
    assert sum(seen) == len(sparse) + 4 * len(plan)


def test_grid_frames_are_one_grid_anchored_to_the_video():
    plan = grid_frames(window_bounds(8, 4, 1), 25, 200, frames=16, alpha=2, step=grid_step(4, 25, 16))
    assert grid_step(4, 25, 16) == 6 and grid_step(4, 25, 16, build_sampler("interval", 16, 4)) == 4
    for frames in plan:
        assert frames[0] % 12 == 0 and all(b - a == 6 for a, b in zip(frames, frames[1:]))
    assert plan[0][0] == 0 and [f[0] for f in plan] == sorted(f[0] for f in plan)
    assert all(k * 25 - 6 <= f[0] and f[-1] <= k * 25 + 100 + 6 for k, f in enumerate(plan))  # inside the window
    end = grid_frames([(0, 1)], 25, 10, frames=8, alpha=2, step=3)[0]
    assert end == [0, 3, 6, 9, 9, 9, 9, 9]  # past the end: the last frame


SERVER = """
import sys, time
from fractions import Fraction
import av, numpy as np
port, frames, first, listen_s, fps = (int(v) for v in sys.argv[1:])
url = f"tcp://127.0.0.1:{port}?listen=1&listen_timeout={listen_s * 1000}"
yy, xx = np.mgrid[0:64, 0:96]
with av.open(url, mode="w", format="mpegts") as out:
    stream = out.add_stream("libx264", rate=Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "10"}
    start = time.monotonic()
    for i in range(first, first + frames):
        time.sleep(max(0.0, start + (i - first) / fps - time.monotonic()))
        img = (np.stack([xx * 2 + i, yy * 3 + 2 * i, xx + yy + 5 * i], axis=-1) % 256).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
"""


class StreamServer:
    """MPEG-TS over TCP on 127.0.0.1 from a subprocess (FFmpeg's listen holds the GIL): listens for
    one client (at most ``listen_s``), sends ``frames`` frames at ``FPS`` frames per second (real
    time), then closes; ``join`` waits for it, and kills it if it is still there."""

    def __init__(self, port: int, frames: int, first: int = 0, listen_s: int = 20):
        self.args = [str(v) for v in (port, frames, first, listen_s, FPS)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, *self.args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def join(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    @property
    def error(self) -> str | None:
        if self.proc.poll() is None or self.proc.returncode == 0:
            return None
        return self.proc.stderr.read()


def watch_when_listening(*args, **kwargs) -> list[dict]:
    """``watch`` once the server is listening (a refused connection is retried, 30 s at most)."""
    from dist_video.live import SourceError

    deadline = time.monotonic() + 30
    while True:
        try:
            return list(watch(*args, **kwargs))
        except SourceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def expected_windows(frames: int, window: float, stride: float) -> int:
    """Windows whose last grid frame is among the first ``frames`` frames."""
    step = grid_step(window, FPS, 8)
    k = 0
    while grid_frames([(k * stride, k * stride + window)], FPS, 10 ** 9, frames=8, alpha=2, step=step)[0][-1] < frames:
        k += 1
    return k


@pytest.mark.slow
def test_watch_a_loopback_stream_end_to_end(tiny_clip):
    fused, port = tiny_dist(tiny_clip), free_port()
    server = StreamServer(port, frames=75)
    server.start()
    records = watch_when_listening(fused, f"tcp://127.0.0.1:{port}", window=1, stride=0.5, preprocess=PRE, topk=2,
                                   timeout=5)
    assert server.join(30) == 0, server.error
    *windows, summary = records
    want = expected_windows(75, 1, 0.5)
    assert want == 4 and summary["windows"] + summary["skipped"] == want and summary["type"] == "summary"
    assert summary["ended"] == "end of stream" or summary["error"]  # a network stream that ends is a drop
    assert [w["start"] for w in windows] == sorted(w["start"] for w in windows)
    for w in windows:
        assert w["end"] - w["start"] == 1 and len(w["top"]) == 2 and 0 <= w["latency"] < 5
        assert w["top"][0]["class"] in CLASS_NAMES


@pytest.mark.slow
def test_a_stream_that_stops_mid_way_is_reconnected_then_given_up(tiny_clip):
    fused, port = tiny_dist(tiny_clip), free_port()
    first, second = StreamServer(port, frames=50), StreamServer(port, frames=50, first=50)
    first.start()

    def second_after_first():
        first.join(30)
        second.start()

    threading.Thread(target=second_after_first, daemon=True).start()
    records = watch_when_listening(fused, f"tcp://127.0.0.1:{port}", window=1, stride=0.5, preprocess=PRE,
                                   reconnect=2, timeout=3)
    assert second.join(30) == 0 and first.join(1) == 0, (first.error, second.error)
    *windows, summary = records
    # the windows go on over both connections (stream time counts the frames received) ...
    assert summary["windows"] + summary["skipped"] == expected_windows(100, 1, 0.5) > expected_windows(50, 1, 0.5)
    # ... then, the stream gone, two reconnects fail and it ends with a clear message
    assert summary["error"] and summary["ended"].endswith("(2 reconnects failed)"), summary
    assert f"127.0.0.1:{port}" in summary["ended"]


@pytest.mark.slow
def test_realtime_file_with_a_slow_model_skips_windows_and_keeps_latency_bounded(tiny_clip, tmp_path):
    fused = tiny_dist(tiny_clip)
    video = write_coded_video(tmp_path / "rt.mp4", 75, width=96, height=64, fps=FPS)
    branch = fused.branch.forward

    def slow(*args):
        time.sleep(0.3)
        return branch(*args)

    fused.branch.forward = slow
    started = time.monotonic()
    *windows, summary = list(watch(fused, str(video), window=0.4, stride=0.08, preprocess=PRE, realtime=True))
    elapsed = time.monotonic() - started
    total = expected_windows(75, 0.4, 0.08)
    assert summary["windows"] + summary["skipped"] == total and summary["skipped"] >= total // 2
    assert windows[-1]["skipped"] == summary["skipped"] or summary["skipped"] > windows[-1]["skipped"]
    assert max(w["latency"] for w in windows) < 1.0  # at most one window waits: about 2 x 0.3 s
    assert elapsed < 3 + 1.5  # played at its real speed (3 s), not queued behind the model
    assert summary["latency_p95"] < 1.0 and summary["latency_median"] >= 0.3


def test_run_watch_writes_json_lines_csv_and_an_annotated_video(tiny_clip, tmp_path):
    fused = tiny_dist(tiny_clip)
    video = write_coded_video(tmp_path / "f.mp4", 60, width=96, height=64, fps=FPS)
    out, err = io.StringIO(), io.StringIO()
    assert run_watch(model=fused, source=str(video), window=1, stride=0.5, preprocess=PRE, topk=3, out=out,
                     err=err) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == expected_windows(60, 1, 0.5) == 3 and all(len(r["top"]) == 3 for r in lines)
    assert err.getvalue().strip().startswith("3 windows, 0 skipped, latency median")
    out, err = io.StringIO(), io.StringIO()
    annotated = tmp_path / "a.mp4"
    assert run_watch(model=fused, source=str(video), window=1, stride=0.5, preprocess=PRE, csv=True, out=out,
                     err=err, annotate=str(annotated)) == 0
    rows = out.getvalue().splitlines()
    assert rows[0].startswith("window,start,end,latency,skipped,class_1,probability_1") and len(rows) == 4
    assert probe(annotated).num_frames == 60
    first = read_frames(annotated, [59]).numpy()[0]
    assert first[8:12, 5:7].mean() < 60  # the label box, top left


def test_cancel_ends_with_a_summary(tiny_clip, tmp_path):
    fused = tiny_dist(tiny_clip)
    video = write_coded_video(tmp_path / "c.mp4", 250, width=96, height=64, fps=FPS)
    cancel = threading.Event()
    timer = threading.Timer(1.5, cancel.set)
    timer.start()
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    assert run_watch(model=fused, source=str(video), window=1, stride=0.5, preprocess=PRE, realtime=True,
                     cancel=cancel, out=out, err=err) == 0
    assert time.monotonic() - started < 5 and "(interrupted)" in err.getvalue()
    assert 1 <= len(out.getvalue().splitlines()) < expected_windows(250, 1, 0.5)


def test_bad_sources_give_one_line_errors(tiny_clip, tmp_path):
    fused = tiny_dist(tiny_clip)
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    cases = {"/dev/video-missing-77": "no such camera device", str(tmp_path / "missing.mp4"): "no such file",
             f"http://127.0.0.1:{free_port()}/live": "cannot open: Connection refused",
             f"tcp://127.0.0.1:{free_port()}": "cannot open: Connection refused",
             str(text): "not a video"}
    for source, message in cases.items():
        out, err = io.StringIO(), io.StringIO()
        assert run_watch(model=fused, source=source, window=1, preprocess=PRE, timeout=2, out=out, err=err) == 1
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {source}: ") and message in lines[0], lines
        assert out.getvalue() == ""
    err = io.StringIO()
    assert run_watch(model=fused, source=str(text), window=0, preprocess=PRE, out=io.StringIO(), err=err) == 1
    assert "window must be a finite positive" in err.getvalue()
