"""Exact frame access: every kind of file gives back exactly the requested frames."""

from __future__ import annotations

import os
import time

import av
import numpy as np
import pytest
import torch

from data_helpers import (coded_frame, decode_all, frame_code, truncate, write_audio_only,
                          write_coded_video)
from dist_video.data import VideoDecodeError, VideoInfo, available_backends, probe, read_frames
from dist_video.data import decoding, frame_index

# name -> (number of frames, writer keyword arguments)
KINDS = {
    "h264_bframes_long_gop.mp4": (120, dict(options={"bf": "3", "g": "250"})),
    "h264_short_gop.mp4": (120, dict(options={"bf": "2", "g": "8", "keyint_min": "8"})),
    "mpeg4_bframes.avi": (60, dict(codec="mpeg4", options={"bf": "2", "g": "12"})),
    "vp9.webm": (50, dict(codec="libvpx-vp9", options={"g": "20", "deadline": "realtime", "cpu-used": "8"})),
    "mjpeg.mkv": (30, dict(codec="mjpeg", pix_fmt="yuvj420p")),
    "h264_vfr.mkv": (50, dict(options={"bf": "2"}, variable_rate=True)),
    "h264_vfr.mp4": (50, dict(options={"bf": "2"}, variable_rate=True)),
    "h264_grey.mp4": (30, dict(pix_fmt="gray", grey=True)),
    "h264_portrait.mp4": (30, dict(width=120, height=200, options={"bf": "2"})),
    "h264_hd.mp4": (12, dict(width=1280, height=720, options={"bf": "2", "preset": "ultrafast"})),
    "h264.ts": (40, dict(options={"bf": "2"}, fmt="mpegts")),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (n, kwargs) in KINDS.items():
        out[name] = (write_coded_video(root / name, n, **kwargs), n)
    # MP4 with its index at the front, cut at 60%: the index promises frames the file lacks.
    full = write_coded_video(root / "faststart.mp4", 60, options={"bf": "2", "g": "20"},
                             container_options={"movflags": "faststart"})
    out["truncated_faststart.mp4"] = (truncate(full, root / "truncated_faststart.mp4", 0.6), None)
    out["truncated.mkv"] = (truncate(out["h264_vfr.mkv"][0], root / "truncated.mkv", 0.6), None)
    return out


@pytest.fixture(autouse=True)
def fresh_cache():
    decoding.clear_probe_cache()
    yield


@pytest.mark.parametrize("name", list(KINDS))
def test_probe_counts_and_read_frames_exact(videos, name):
    path, n = videos[name]
    info = probe(path)
    assert isinstance(info, VideoInfo)
    assert info.num_frames == n
    h, w = coded_frame(0, KINDS[name][1].get("width", 160), KINDS[name][1].get("height", 120)).shape[:2]
    assert (info.width, info.height) == (w, h)
    assert info.fps > 0 and info.duration > 0
    rng = np.random.default_rng(7)
    indices = rng.integers(0, n, 10).tolist() + [n - 1, 0, n - 1, 3 % n]   # any order, repeats
    frames = read_frames(path, indices)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (len(indices), h, w, 3)
    assert [frame_code(f) for f in frames.numpy()] == indices
    listed = decoding.read_frame_list(path, indices)  # the same frames, not stacked
    assert len(listed) == len(indices) and all(torch.equal(f, g) for f, g in zip(listed, frames))


@pytest.mark.parametrize("name", ["h264_bframes_long_gop.mp4", "h264_short_gop.mp4", "vp9.webm",
                                  "h264_vfr.mkv", "mpeg4_bframes.avi"])
def test_frames_bit_identical_to_sequential_decode(videos, name):
    path, n = videos[name]
    reference = decode_all(path)
    indices = [n - 2, 1, n // 2, n // 2 + 1, 5, n - 1, 17 % n]
    frames = read_frames(path, indices).numpy()
    for frame, i in zip(frames, indices):
        assert np.array_equal(frame, reference[i]), f"frame {i} differs"


def test_seeking_is_used_and_exact(videos):
    path, n = videos["h264_short_gop.mp4"]
    reference = decode_all(path)
    indices = [3, 40, 41, 90, 118]  # far apart: keyframes every 8 frames lie in between
    before = decoding.STATS["seeks"]
    frames = read_frames(path, indices, threads=1).numpy()
    assert decoding.STATS["seeks"] > before, "expected forward seeks over the gaps"
    assert decoding.STATS["fallbacks"] == 0
    for frame, i in zip(frames, indices):
        assert np.array_equal(frame, reference[i])


def test_thread_counts_give_identical_frames(videos):
    path, n = videos["h264_bframes_long_gop.mp4"]
    indices = [0, 33, 34, 90, 119]
    a = read_frames(path, indices, threads=1)
    b = read_frames(path, indices, threads=2)
    assert torch.equal(a, b)


def test_counting_paths(videos):
    # Matroska/WebM store no frame count: counted from packets.
    path, n = videos["vp9.webm"]
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert probe(path).counted_by == "packets"
    # MP4 stores one, checked against the packets.
    assert probe(videos["h264_bframes_long_gop.mp4"][0]).counted_by == "metadata"
    # MPEG-TS: no per-packet index to trust, so it is decoded and counted.
    info = probe(videos["h264.ts"][0])
    assert info.counted_by == "decoding" and info.num_frames == 40


def test_metadata_that_lies_is_recounted(videos):
    path, _ = videos["truncated_faststart.mp4"]
    with av.open(str(path)) as c:
        claimed = c.streams.video[0].frames
    assert claimed == 60
    info = probe(path)
    assert info.counted_by == "decoding"
    n = info.num_frames
    assert 20 <= n < 60
    # The decodable frames, in order: the cut packet's frame is missing, the ones before it
    # are exact, and indices beyond the end clamp to the last decodable frame.
    codes = [frame_code(f) for f in read_frames(path, list(range(n))).numpy()]
    assert codes[:20] == list(range(20))
    assert all(b > a for a, b in zip(codes, codes[1:]))
    frames = read_frames(path, [n - 1, 0, 59, n + 5]).numpy()
    assert [frame_code(f) for f in frames] == [codes[-1], 0, codes[-1], codes[-1]]


def test_truncated_matroska_gives_the_decodable_frames(videos):
    path, _ = videos["truncated.mkv"]
    reference = [frame_code(f) for f in decode_all(path)]  # what a full decode outputs, in order
    n = probe(path).num_frames
    assert n == len(reference) and 10 <= n < 50
    frames = read_frames(path, list(range(n))[::-1]).numpy()
    assert [frame_code(f) for f in frames] == reference[::-1]


def test_index_promising_too_many_frames_is_corrected(videos):
    path, n = videos["h264_bframes_long_gop.mp4"]
    index = frame_index.get_index(str(path))
    lying = frame_index.FrameIndex(
        info=VideoInfo(**{**index.info.__dict__, "num_frames": n + 10}),
        pts=frame_index.PtsTable([index.pts.pts_of(i) for i in range(n)] +
                                 [index.pts.pts_of(n - 1) + k * 512 for k in range(1, 11)]),
        keyframes=index.keyframes, seekable=index.seekable)
    frame_index.cache_put(frame_index.cache_key(str(path)), lying)
    with pytest.warns(RuntimeWarning, match="recounted by decoding"):
        frames = read_frames(path, [n + 4, 2])
    assert [frame_code(f) for f in frames.numpy()] == [n - 1, 2]
    assert probe(path).num_frames == n  # the cache was corrected


def test_probe_cache_follows_file_changes(tmp_path):
    path = write_coded_video(tmp_path / "a.mp4", 10)
    assert probe(path).num_frames == 10
    key = frame_index.cache_key(str(path))
    assert frame_index.cache_get(key) is not None
    write_coded_video(tmp_path / "b.mp4", 14)
    os.replace(tmp_path / "b.mp4", path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert probe(path).num_frames == 14


def _bad_files(tmp_path, videos):
    good = videos["h264_bframes_long_gop.mp4"][0]
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 100)
    noise = np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes()
    (tmp_path / "random.mkv").write_bytes(noise)
    (tmp_path / "random.bin").write_bytes(noise)  # FFmpeg's text-art demuxer would "play" it
    truncate(good, tmp_path / "no_index.mp4", 0.5)  # moov atom at the end: cut off
    (tmp_path / "folder.mp4").mkdir()
    write_audio_only(tmp_path / "audio.wav")
    header_only = tmp_path / "header_only.mp4"
    header_only.write_bytes(good.read_bytes()[:100])
    return {
        "missing": tmp_path / "missing.mp4",
        "empty": tmp_path / "empty.mp4",
        "text": tmp_path / "notes.mp4",
        "random bytes": tmp_path / "random.mkv",
        "random bytes .bin": tmp_path / "random.bin",
        "truncated mp4 without index": tmp_path / "no_index.mp4",
        "directory": tmp_path / "folder.mp4",
        "audio only": tmp_path / "audio.wav",
        "header only": header_only,
    }


@pytest.mark.parametrize("case", ["missing", "empty", "text", "random bytes", "random bytes .bin",
                                  "truncated mp4 without index",
                                  "directory", "audio only", "header only"])
@pytest.mark.parametrize("func", ["probe", "read_frames"])
def test_bad_input_raises_quickly_with_path(tmp_path, videos, case, func):
    path = _bad_files(tmp_path, videos)[case]
    t0 = time.perf_counter()
    with pytest.raises(VideoDecodeError) as err:
        if func == "probe":
            probe(path)
        else:
            read_frames(path, [0, 1])
    assert time.perf_counter() - t0 < 1.0
    assert str(path) in str(err.value)
    assert err.value.path == str(path) and err.value.cause


def test_decode_error_is_picklable():
    import pickle
    e = pickle.loads(pickle.dumps(VideoDecodeError("/x/y.mp4", "empty file (0 bytes)")))
    assert isinstance(e, VideoDecodeError) and str(e) == "/x/y.mp4: empty file (0 bytes)"


def test_bad_indices(videos):
    path, _ = videos["mjpeg.mkv"]
    with pytest.raises(ValueError):
        read_frames(path, [-1])
    with pytest.raises(ValueError):
        read_frames(path, [])
    with pytest.raises(ValueError):
        read_frames(path, [0], backend="opencv")


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
@pytest.mark.parametrize("name", ["h264_bframes_long_gop.mp4", "h264_short_gop.mp4", "vp9.webm", "mjpeg.mkv",
                                  "h264_vfr.mp4", "mpeg4_bframes.avi"])
def test_optional_backends_give_the_same_frames(videos, backend, name):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed or cannot load here")
    path, n = videos[name]
    indices = [n - 1, 0, n // 2, 3, 3, n // 3]
    ours = read_frames(path, indices).numpy()
    theirs = read_frames(path, indices, backend=backend).numpy()
    assert theirs.shape == ours.shape and theirs.dtype == ours.dtype
    assert [frame_code(f) for f in theirs] == indices
    # same frames; MPEG-4 part 2 IDCTs may round differently by a level or two
    tolerance = 3 if name.endswith(".avi") else 0
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= tolerance
