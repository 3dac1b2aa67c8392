"""Decoding limits: frame area and decoded bytes are checked before decoding, and test clips are
decoded at the test scale, so a tiny file with huge frames cannot take gigabytes.

The memory tests decode in a child process under its own address-space limit (RLIMIT_AS, the
child's size after imports plus a margin) and report the growth of its peak RSS: a regression
fails the test (MemoryError or a growth over the bound) instead of exhausting the machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dist_video.data import (DecodeLimits, SegmentSampler, TestTransform, VideoDecodeError, load_test_clips, probe,
                             read_frame_list, read_frames)
from dist_video.data.decoding import DEFAULT_LIMITS, scaled_size
from data_helpers import frame_code, write_coded_video

SRC = Path(__file__).resolve().parents[1] / "src"

MAKE_ONE_FRAME = """
import sys
from fractions import Fraction
import av
path, side = sys.argv[1], int(sys.argv[2])
with av.open(path, "w") as out:
    s = out.add_stream("libx264", rate=Fraction(25))
    s.width = s.height = side
    s.pix_fmt = "yuv420p"
    s.options = {"preset": "ultrafast"}
    frame = av.VideoFrame(side, side, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    for packet in s.encode(frame):
        out.mux(packet)
    for packet in s.encode():
        out.mux(packet)
"""

#: The child: import, cap its address space at its size now + MARGIN, run ``CALL``, report.
CHILD = """
import json, resource, sys
from dist_video.data import *
from dist_video.data.decoding import scaled_size
path = sys.argv[1]
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + {margin}, size + {margin}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    result = {call}
    outcome = "ok"
except VideoDecodeError as e:
    result, outcome = None, "refused: " + str(e)
except MemoryError:
    result, outcome = None, "MemoryError"
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({{"outcome": outcome, "grown": grown, "result": result}}))
"""
MARGIN = 1536 * 2**20  # address space the child may add; the unguarded decodes need several GiB


def one_frame_video(path: Path, side: int) -> Path:
    """An H.264 MP4 of one black ``side`` x ``side`` frame, made in a child process (the encoder
    needs a few hundred MB at 8000 x 8000)."""
    subprocess.run([sys.executable, "-c", MAKE_ONE_FRAME, str(path), str(side)], check=True, timeout=120)
    return path


def run_limited(path: Path, call: str) -> dict:
    code = textwrap.dedent(CHILD).format(margin=MARGIN, call=call)
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    return one_frame_video(tmp_path_factory.mktemp("bomb") / "8000.mp4", 8000)


@pytest.fixture(scope="module")
def megapixel(tmp_path_factory) -> Path:
    return one_frame_video(tmp_path_factory.mktemp("bomb") / "1000.mp4", 1000)


def test_an_8000x8000_frame_is_refused_before_decoding_and_memory_stays_flat(huge):
    assert huge.stat().st_size < 300_000  # a small upload
    report = run_limited(huge, "read_frames(path, [0]).shape")
    assert report["outcome"].startswith(f"refused: {huge}: frames of 8000x8000 (64 megapixels) are over the "
                                        f"decoding limit of 8.85 megapixels (max_frame_pixels=8847360)")
    assert report["grown"] < 64 * 2**20, report  # nothing was decoded
    report = run_limited(huge, "probe(path).width")  # probe says the same, from the headers
    assert report["outcome"].startswith(f"refused: {huge}: frames of 8000x8000")
    assert report["grown"] < 64 * 2**20, report


def test_with_the_area_limit_lifted_a_downscaled_decode_stays_bounded(huge):
    """No full-size RGB frame: 8000 x 8000 decoded straight to short side 224."""
    report = run_limited(huge, "list(read_frames(path, [0], max_short_side=224, limits=None).shape)")
    assert report["outcome"] == "ok" and report["result"] == [1, 224, 224, 3]
    assert report["grown"] < 768 * 2**20, report  # the decoder's YUV frames (96 MB each), not 192 MB x RGB copies


def test_a_megapixel_frame_in_64_views_decodes_once_at_the_test_scale(megapixel):
    call = ("list(load_test_clips(path, sampler=SegmentSampler(8), num_views=64, "
            "transform=TestTransform(crop_size=32, short_side=32)).shape)")
    report = run_limited(megapixel, call)
    assert report["outcome"] == "ok" and report["result"] == [64, 3, 8, 32, 32]
    assert report["grown"] < 128 * 2**20, report  # was 64 x 8 full frames stacked: 1.5 GB


def test_the_limits_are_the_callers(tmp_path):
    path = write_coded_video(tmp_path / "v.mp4", 12, width=160, height=120)
    small = DecodeLimits(max_frame_pixels=100 * 100)
    with pytest.raises(VideoDecodeError, match=r"v\.mp4: frames of 160x120 \(0\.0192 megapixels\) are over the "
                                               r"decoding limit of 0\.01 megapixels \(max_frame_pixels=10000\)"):
        read_frames(path, [0], limits=small)
    with pytest.raises(VideoDecodeError, match="max_frame_pixels=10000"):
        probe(path, limits=small)
    assert probe(path, limits=None).width == 160  # None: no limit (and the cached index is checked again)
    frame_bytes = 160 * 120 * 3
    few = DecodeLimits(max_decoded_bytes=4 * frame_bytes)
    assert len(read_frames(path, [0, 1, 2, 3], limits=few)) == 4
    with pytest.raises(VideoDecodeError, match=r"5 frames of 160x120 need .* MiB decoded, over the decoding limit "
                                               r"of 0\.22 MiB \(max_decoded_bytes=230400\)"):
        read_frames(path, [0, 1, 2, 3, 3], limits=few)  # stacked: every index counts
    assert len(read_frame_list(path, [0, 1, 2, 3, 3], limits=few)) == 5  # a list: each distinct frame once
    with pytest.raises(VideoDecodeError, match="max_decoded_bytes"):
        read_frame_list(path, range(5), limits=few)
    assert len(read_frames(path, range(12), limits=None)) == 12
    # downscaled frames count at the size returned
    assert len(read_frame_list(path, range(12), max_short_side=60, limits=few)) == 12


def test_default_limits_take_4k_and_refuse_8k():
    assert DEFAULT_LIMITS.max_frame_pixels >= 3840 * 2160 and DEFAULT_LIMITS.max_frame_pixels < 7680 * 4320
    DEFAULT_LIMITS.check_frame("uhd.mp4", 3840, 2160)
    DEFAULT_LIMITS.check_frame("portrait.mp4", 2160, 3840)
    with pytest.raises(VideoDecodeError, match="8k.mp4: frames of 7680x4320"):
        DEFAULT_LIMITS.check_frame("8k.mp4", 7680, 4320)


def test_scaled_size_brings_the_short_side_down_only():
    assert scaled_size(1280, 720, 224) == (398, 224)
    assert scaled_size(720, 1280, 224) == (224, 398)
    assert scaled_size(160, 120, 224) == (160, 120)  # never enlarged
    assert scaled_size(160, 120, None) == (160, 120)
    assert scaled_size(8000, 8000, 224) == (224, 224)


def test_downscaled_frames_keep_their_content(tmp_path):
    path = write_coded_video(tmp_path / "v.mp4", 20, width=640, height=480)
    frames = read_frames(path, [3, 17, 9], max_short_side=120)
    assert frames.shape == (3, 120, 160, 3)
    assert [frame_code(f) for f in frames.numpy()] == [3, 17, 9]  # the right frames, at the smaller size


@pytest.mark.parametrize("width, height, side", [(640, 480, 64), (320, 568, 96)])
def test_test_clips_decoded_at_the_test_scale_match_full_size_decoding(tmp_path, width, height, side):
    """The documented tolerance: clips from frames decoded at the test scale (FFmpeg's bilinear
    scaler) against the same frames decoded at full size and resized by the transform (torch,
    antialiased bilinear), on frames full of sharp edges and fine texture (a hard case)."""
    path = write_coded_video(tmp_path / "v.mp4", 24, width=width, height=height)
    transform = TestTransform(crop_size=side, short_side=side, num_crops=3)
    sampler = SegmentSampler(8)
    got = load_test_clips(path, sampler=sampler, transform=transform, num_views=2, num_crops=3)
    full = []
    for v in range(2):
        frames = read_frames(path, sampler(24, view=v, num_views=2))
        full += [transform(frames, crop=c)[0] for c in range(3)]
    expected = torch.stack(full)
    assert got.shape == expected.shape == (6, 3, 8, side, side)
    std = torch.tensor(transform.std).view(1, 3, 1, 1, 1)
    levels = ((got - expected) * std * 255).abs()  # in levels of 255
    assert levels.mean() < 4.0, levels.mean()  # levels of 255, on content that aliases (a sawtooth of 14 px)
    assert torch.quantile(levels.flatten()[::7], 0.99) < 40


def test_test_clips_of_frames_up_to_twice_the_test_scale_are_decoded_as_they_are(tmp_path):
    """The evaluation protocol is untouched for ordinary copies: a 240-px video tested at 160
    (short side <= 2x the test scale) gives exactly the clips of full-size decoding."""
    path = write_coded_video(tmp_path / "v.mp4", 16, width=320, height=240)
    transform = TestTransform(crop_size=160, short_side=160, num_crops=1)
    sampler = SegmentSampler(4)
    got = load_test_clips(path, sampler=sampler, transform=transform, num_views=1)
    expected = transform(read_frames(path, sampler(16, view=0, num_views=1)), crop=0)[0]
    assert torch.equal(got[0], expected)
