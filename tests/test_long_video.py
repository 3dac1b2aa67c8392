"""Long videos: the window timeline (coverage, stride, one streaming decode that gives the same
clips as indexed reading), its CSV / plot / annotated video, and the command line.

The video is a minute of three colour segments in sequence (red, green, blue, 20 s each) with a
moving texture on top; the model is a transparent stand-in for a trained classifier whose
classes are those colours (its logits are the clip's mean channel values), so the top class of
every window inside a segment is known exactly."""

from __future__ import annotations

import csv
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from dist_video.data.decoding import probe, read_frames
from dist_video.engine import data as engine_data
from dist_video.engine.predict import DEFAULT_PREPROCESS, predict_file
from dist_video.engine.timeline import (annotate_video, plot_timeline, video_timeline, window_bounds, window_frames,
                                        write_timeline_csv)
from dist_video.data.sampling import build_sampler
from cli_helpers import run_cli

FPS = 10
SEGMENTS = [("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))]
SEGMENT_SECONDS = 20
PREPROCESS = {**DEFAULT_PREPROCESS, "crop_size": 32, "test_scale": 32, "num_views": 1}


def write_segments(path: Path, width: int = 64, height: int = 48) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "g": "25"}
        yy, xx = np.mgrid[0:height, 0:width]
        for s, (_, colour) in enumerate(SEGMENTS):
            for i in range(SEGMENT_SECONDS * FPS):
                t = s * SEGMENT_SECONDS * FPS + i
                img = np.empty((height, width, 3), np.float32)
                img[:] = colour
                img += 25 * np.sin((xx + 2 * t) / 5.0)[..., None] * np.cos(yy / 7.0)[..., None]
                frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


class ColourModel(torch.nn.Module):
    """Logits = 10 x the clip's mean value of each channel (normalised input): red, green, blue."""

    class config:
        num_frames = 8

    class_names = [name for name, _ in SEGMENTS]
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        assert video.dim() == 5 and video.shape[1:] == (3, 8, 32, 32)
        self.seen.append(video.clone())
        return video.mean(dim=(2, 3, 4))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return 10 * self.encode_video(video)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    return write_segments(tmp_path_factory.mktemp("long") / "segments.mp4")


def test_window_bounds_cover_the_video():
    assert window_bounds(60, 4, 2)[:3] == [(0, 4), (2, 6), (4, 8)]
    for duration, window, stride in [(60, 4, 2), (61.3, 5, 3), (10, 2.5, 2.5), (7, 3, 5), (1.5, 4, 2)]:
        bounds = window_bounds(duration, window, stride)
        assert bounds[0][0] == 0 and bounds[-1][1] == pytest.approx(duration)
        assert all(b[0] == pytest.approx(k * stride) for k, b in enumerate(bounds))
        assert all(b[1] - b[0] <= window + 1e-9 for b in bounds)
        # with stride <= window every instant is inside a window: consecutive windows leave no gap
        covered = 0.0
        for a, b in bounds:
            assert a <= covered + 1e-9 or stride > window
            covered = max(covered, b)
    assert window_bounds(1.5, 4, 2) == [(0, 1.5)]  # shorter than one window: one window
    assert window_bounds(8, 4) == [(0, 4), (4, 8)]  # stride defaults to the window
    with pytest.raises(ValueError, match="positive"):
        window_bounds(8, 0)


def test_window_bounds_refuse_what_is_not_finite_or_too_many_windows():
    for window, stride, bound in [(float("inf"), None, "window must be a finite positive"),
                                  (float("nan"), 1, "window must be a finite positive"),
                                  (1, float("inf"), "stride must be a finite positive"),
                                  (1, -1, "stride must be a finite positive"),
                                  (1e-9, None, "more than the limit of 11000 windows"),
                                  (1, 1e-6, "more than the limit of 11000 windows"),
                                  (1, 5e-324, "more than the limit of 11000 windows"),
                                  (1e-300, 1e-300, "more than the limit of 11000 windows")]:
        with pytest.raises(ValueError, match=bound):
            window_bounds(2.0, window, stride)
    assert len(window_bounds(100, 1, 1, max_windows=100)) == 100
    with pytest.raises(ValueError, match="more than the limit of 99 windows"):
        window_bounds(100, 1, 1, max_windows=99)
    # no window starts at or after the end of the video
    assert window_bounds(2, 0.5, 100) == [(0, 0.5)]
    assert window_bounds(2, 1e308, 1e-300) == [(0, 2)] and window_bounds(2, 1e308, 5e-324) == [(0, 2)]
    assert window_bounds(2, 0.5, 1.5) == [(0, 0.5), (1.5, 2)]
    assert all(a < 7 for a, _ in window_bounds(7, 1, 2.5))


def test_timeline_follows_the_segments(long_video):
    info = probe(long_video)
    assert info.num_frames == 3 * SEGMENT_SECONDS * FPS
    model = ColourModel()
    timeline = video_timeline(model, long_video, PREPROCESS, window=4, stride=2, batch_size=5)
    assert timeline.starts == [2.0 * k for k in range(29)] and timeline.ends[-1] == pytest.approx(60)
    result = timeline.to_dict(topk=2)
    assert result["video"] == str(long_video) and len(result["windows"]) == 29
    for w in result["windows"]:
        segment = int(w["start"] // SEGMENT_SECONDS)
        if int((w["end"] - 1e-6) // SEGMENT_SECONDS) == segment:  # inside one segment
            assert w["top"][0]["class"] == SEGMENTS[segment][0], w
    assert predict_file(model, long_video, PREPROCESS, window=4, stride=2, topk=2) == result


def test_streaming_clips_equal_indexed_reading(long_video):
    """The one-pass decode gives each window exactly the frames the model's sampler picks,
    transformed as the test transform does: the same tensors as reading them by index."""
    model = ColourModel()
    video_timeline(model, long_video, PREPROCESS, window=7, stride=3, batch_size=4)
    got = torch.cat(model.seen)
    info = probe(long_video)
    bounds = window_bounds(info.num_frames / info.fps, 7, 3)
    plan = window_frames(bounds, info.fps, info.num_frames, build_sampler("segment", 8))
    transform = engine_data.test_transform(32, 32, 1, PREPROCESS["mean"], PREPROCESS["std"])
    order = [k for k in range(len(plan))]  # windows finish in order here, so batches arrive in order
    for k in order:
        expected = transform(read_frames(long_video, plan[k]))[0]
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6)
    assert all(plan[k][0] >= round(bounds[k][0] * FPS) and plan[k][-1] < round(bounds[k][1] * FPS) + 1
               for k in order)


def test_batch_size_does_not_change_the_timeline(long_video):
    one = video_timeline(ColourModel(), long_video, PREPROCESS, window=10, stride=7, batch_size=1)
    many = video_timeline(ColourModel(), long_video, PREPROCESS, window=10, stride=7, batch_size=16)
    assert one.starts == many.starts
    torch.testing.assert_close(one.probabilities, many.probabilities, rtol=0, atol=0)


def test_short_video_is_one_window(tmp_path):
    from data_helpers import write_coded_video

    path = write_coded_video(tmp_path / "short.mp4", 12, width=64, height=48, fps=10)
    timeline = video_timeline(ColourModel(), path, PREPROCESS, window=5, stride=1)
    assert (timeline.starts, timeline.ends) == ([0.0], [pytest.approx(1.2)])


def test_csv_plot_and_annotated_video(long_video, tmp_path):
    timeline = video_timeline(ColourModel(), long_video, PREPROCESS, window=6, stride=3)
    rows = list(csv.DictReader(open(write_timeline_csv([timeline], tmp_path / "t.csv", topk=2))))
    assert len(rows) == len(timeline.starts) and rows[0]["video"] == str(long_video)
    assert [float(r["start"]) for r in rows] == timeline.starts and rows[0]["class_1"] == "red"
    png = plot_timeline(timeline, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = annotate_video(timeline, tmp_path / "annotated.mp4")
    src, dst = probe(long_video), probe(out)
    assert (dst.num_frames, dst.fps, dst.width, dst.height) == (src.num_frames, src.fps, src.width, src.height)
    assert dst.codec == "h264"
    frames = read_frames(out, [5, 300, 590]).numpy()
    # the label box (black, white text) is drawn top-left; the rest keeps the segment colour
    assert frames[:, 8:12, 5:7].mean() < 60
    for f, (_, colour) in zip(frames, SEGMENTS):
        assert np.abs(f[30:, 40:].reshape(-1, 3).mean(0) - np.array(colour)).max() < 30


@pytest.mark.slow
def test_cli_window_outputs(long_video, tmp_path):
    from zero_shot_helpers import tiny_text_clip

    weights = tiny_text_clip(tmp_path / "clip.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {k: tmp_path / v for k, v in (("csv", "t.csv"), ("timeline", "t.png"), ("annotate", "a.mp4"))}
    proc = run_cli("predict", str(weights), str(long_video), "--labels", "red, green, blue", "--frames", "4",
                   "--window", "5", "--stride", "5", "--json", "--device", "cpu",
                   *[a for k, p in out.items() for a in (f"--{k}", str(p))], timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    windows = json.loads(proc.stdout)[0]["windows"]
    assert [(w["start"], w["end"]) for w in windows] == [(5.0 * k, 5.0 * k + 5) for k in range(12)]
    assert all(sorted(t["class"] for t in w["top"]) == ["blue", "green", "red"] for w in windows)
    assert len(list(csv.DictReader(open(out["csv"])))) == 12
    assert probe(out["annotate"]).num_frames == 600 and out["timeline"].stat().st_size > 0


def test_window_runs_leave_malloc_alone_and_others_keep_freed_memory(tmp_path, monkeypatch):
    """``predict``/``embed --window`` run a decoding thread beside the model: glibc's default
    behaviour keeps their peak steady, so the CLI does not make malloc keep freed memory there."""
    from data_helpers import write_coded_video
    from zero_shot_helpers import tiny_text_clip

    import dist_video.engine.allocator as allocator
    from dist_video import cli

    calls: list[int] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    weights = tiny_text_clip(tmp_path / "clip.pt")
    video = write_coded_video(tmp_path / "v.mp4", 60, width=64, height=48, fps=30)
    common = ["--frames", "4", "--device", "cpu"]
    assert cli.main(["predict", str(weights), str(video), "--labels", "a, b", "--window", "1", *common]) == 0
    assert cli.main(["embed", str(weights), str(video), "--window", "1", "--out", str(tmp_path / "e"), "--quiet",
                     *common]) == 0
    assert calls == []
    assert cli.main(["predict", str(weights), str(video), "--labels", "a, b", *common]) == 0
    assert calls == [1]
