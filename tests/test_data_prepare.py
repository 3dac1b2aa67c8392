"""``prepare``: every frame kept in order at the same rate (painted frame indices), short GOPs,
annotation files for the prepared copy, bad inputs listed, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import run_cli, start_cli
from data_helpers import decode_all, frame_code, truncate, write_coded_video
from resume_helpers import kill_when
from dist_video.data import parse_csv, probe
from dist_video.data.prepare import (REPORT_NAME, TEMP_MARK, output_size, plan_prepare, prepare_dataset,
                                     prepare_video, write_annotations)

TIMEOUT = 240


def keyframes(path: Path) -> list[int]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts = [(p.pts, p.is_keyframe) for p in c.demux(stream) if p.size]
    order = sorted(pts)
    return [i for i, (_, key) in enumerate(order) if key]


def resized_reference(frames: list[np.ndarray], width: int, height: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    return F.interpolate(x, size=(height, width), mode="area")


def test_output_size_scales_the_short_side_and_never_enlarges():
    assert output_size(1280, 720, 320) == (568, 320)
    assert output_size(720, 1280, 256) == (256, 456)
    assert output_size(160, 120, 320) == (160, 120)
    assert output_size(161, 121, 320) == (160, 120)  # even sides for yuv420p


@pytest.mark.parametrize("codec,suffix,kw", [
    ("libx264", ".mp4", {"options": {"bf": "3", "g": "40"}}),  # B-frames, long GOP
    ("mpeg4", ".avi", {}),
    ("libx264", ".mkv", {"variable_rate": True}),
])
def test_prepare_keeps_every_frame_in_order_at_the_same_rate(tmp_path, codec, suffix, kw):
    n = 45  # the long-GOP source has a keyframe at 40: not copied
    src = write_coded_video(tmp_path / f"src{suffix}", n, codec=codec, width=160, height=120, fps=30, **kw)
    out = tmp_path / "out" / "src.mp4"
    result = prepare_video(src, out, short_side=64, gop=16)
    assert result.status == "done" and result.frames == n, result.cause
    info, before = probe(out), probe(src)
    assert (info.width, info.height) == (86, 64) and info.num_frames == n
    assert info.fps == pytest.approx(before.fps, rel=1e-3)
    frames = decode_all(out)
    assert [frame_code(f) for f in frames] == list(range(n))  # same count, same order
    reference = resized_reference(decode_all(src), 86, 64)
    got = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    error = (got - reference).abs().mean((1, 2, 3))
    shifted = (got[:-1] - reference[1:]).abs().mean((1, 2, 3))
    assert error.max() < 20 and (error[:-1] < shifted).all()  # each frame is its own source frame, resized
    assert keyframes(out) == [0, 16, 32]
    assert not list(out.parent.glob(f"*{TEMP_MARK}*"))
    again = prepare_video(src, out, short_side=64, gop=16)
    assert again.status == "skipped" and again.bytes_after == out.stat().st_size


def x264_settings(path: Path) -> str:
    """The encoder's settings string that x264 writes into the stream (an SEI message)."""
    data = path.read_bytes()
    start = data.index(b"x264 - core")
    return data[start:data.index(b"\x00", start)].decode("ascii", "replace")


def test_prepared_copies_are_tuned_for_decoding_unless_asked_not_to(tmp_path):
    src = write_coded_video(tmp_path / "src.mp4", 20, width=160, height=120, fps=30)
    tuned = prepare_video(src, tmp_path / "tuned.mp4", short_side=64, gop=16)
    plain = prepare_video(src, tmp_path / "plain.mp4", short_side=64, gop=16, tune=None)
    assert tuned.status == plain.status == "done"
    fast, default = x264_settings(tmp_path / "tuned.mp4"), x264_settings(tmp_path / "plain.mp4")
    assert "cabac=0" in fast and "deblock=0" in fast and "weightb=0" in fast
    assert "cabac=1" in default and "deblock=1" in default
    assert len(decode_all(tmp_path / "tuned.mp4")) == 20
    with pytest.raises(ValueError, match="did you mean 'fastdecode'"):
        prepare_dataset([], tune="fastdecod")


def test_bad_inputs_are_listed_and_the_others_prepared(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    good = [write_coded_video(src / "a" / f"v{i}.mp4", 20, seed=i) for i in range(2)]
    (src / "b" / "empty.mp4").write_bytes(b"")
    (src / "b" / "text.mp4").write_text("not a video")
    truncate(good[0], src / "b" / "cut.mp4", 0.05)
    jobs, ann = plan_prepare(src, tmp_path / "dst")
    assert ann is None and len(jobs) == 5
    results = {Path(r.source).name: r for r in prepare_dataset(jobs, short_side=64, workers=2)}
    assert {k: r.status for k, r in results.items()} == {"v0.mp4": "done", "v1.mp4": "done", "empty.mp4": "failed",
                                                        "text.mp4": "failed", "cut.mp4": "failed"}
    assert "empty file" in results["empty.mp4"].cause and results["text.mp4"].cause
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*.mp4")) == [
        "a/v0.mp4", "a/v1.mp4"]


def test_annotation_files_point_at_the_prepared_videos(tmp_path):
    src = tmp_path / "src"
    (src / "videos").mkdir(parents=True)
    for i in range(3):
        write_coded_video(src / "videos" / f"clip{i}.avi", 12, codec="mpeg4", seed=i)
    (src / "train.csv").write_text("path,label\nvideos/clip0.avi,jump\nvideos/clip1.avi,run\nvideos/clip2.avi,jump\n")
    jobs, ann = plan_prepare(src / "train.csv", tmp_path / "dst", fmt="csv")
    assert [Path(j.output).relative_to(tmp_path / "dst").as_posix() for j in jobs] == [
        "videos/clip0.mp4", "videos/clip1.mp4", "videos/clip2.mp4"]
    results = prepare_dataset(jobs, short_side=64)
    files = write_annotations(jobs, results, ann, tmp_path / "dst", "train")
    records, names = parse_csv(files[0], classes=files[1])
    assert names == ["jump", "run"]
    assert [(Path(r.path).resolve(), r.label) for r in records] == [
        ((tmp_path / "dst" / "videos" / f"clip{i}.mp4").resolve(), y) for i, y in enumerate([0, 1, 0])]
    assert all(probe(r.path).num_frames == 12 for r in records)


@pytest.mark.slow
def test_cli_resumes_after_sigkill_without_redoing_finished_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    n = 10
    for k in range(2):
        (src / f"class{k}").mkdir(parents=True)
    for i in range(n):
        write_coded_video(src / f"class{i % 2}" / f"v{i}.mp4", 90, width=192, height=144, seed=i)
    (src / "class1" / "broken.mp4").write_text("not a video")
    args = ["prepare", str(src), str(dst), "--short-side", "64", "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = start_cli(*args, env=env)
    kill_when(proc, lambda: len(list(dst.rglob("v*.mp4"))) >= 2, timeout=TIMEOUT, what="two files were done",
              poll=0.01)
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.rglob("v*.mp4")}
    assert 2 <= len(finished) < n
    time.sleep(0.5)  # let an orphaned worker give up

    again = run_cli(*args, timeout=TIMEOUT, env=env)
    assert again.returncode == 1, again.stderr  # the broken input is reported
    report = json.loads((dst / REPORT_NAME).read_text())
    assert report["skipped"] >= len(finished) and report["done"] + report["skipped"] == n
    assert report["failed"] == 1 and report["failures"][0]["source"].endswith("broken.mp4")
    assert report["bytes_before"] > report["bytes_after"] > 0
    assert "failed" in again.stdout and "report" in again.stdout
    for p, stamp in finished.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{p} was redone"
    assert not [p for p in dst.rglob("*") if TEMP_MARK in p.name]
    for i in range(n):
        out = dst / f"class{i % 2}" / f"v{i}.mp4"
        assert [frame_code(f) for f in decode_all(out)] == list(range(90)), out
