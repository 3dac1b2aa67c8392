"""The optional decoding backends: when one cannot load, the error says what to install."""

from __future__ import annotations

import sys
import types

import pytest

from dist_video.data import BackendUnavailableError, available_backends, read_frames
from dist_video.data import decoding
from data_helpers import write_coded_video


@pytest.fixture
def video(tmp_path):
    return write_coded_video(tmp_path / "v.mp4", 8)


def test_a_missing_backend_names_the_pip_install(video, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ModuleNotFoundError
    with pytest.raises(BackendUnavailableError, match=r"`pip install decord`.*or use backend='pyav'"):
        read_frames(video, [0], backend="decord")
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # also when the real one was imported before
    with pytest.raises(BackendUnavailableError, match=r"`pip install torchcodec`.*FFmpeg's shared libraries"):
        read_frames(video, [0], backend="torchcodec")
    assert "decord" not in available_backends() and "torchcodec" not in available_backends()


def test_torchcodec_that_cannot_load_ffmpeg_names_the_libraries(video, monkeypatch):
    # torchcodec installed but its FFmpeg-linked core not loadable: importing VideoDecoder fails
    broken = types.ModuleType("torchcodec.decoders")
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", broken)
    with pytest.raises(BackendUnavailableError, match=r"FFmpeg's shared libraries, major version 4 to 7 "
                                                      r"\(Debian/Ubuntu: `apt-get install ffmpeg`\)"):
        read_frames(video, [0], backend="torchcodec")
    assert decoding.BACKENDS == ("pyav", "decord", "torchcodec")
