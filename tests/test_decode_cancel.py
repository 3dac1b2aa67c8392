"""Decoding stops when its work is cancelled: every backend checks a ``cancel`` event inside
its decoding loop (PyAV before each packet; decord and torchcodec between batches of frames), so
a server request that timed out stops decoding its views mid-file instead of after the whole
read. An event that is never set changes nothing."""

from __future__ import annotations

import threading

import pytest
import torch

from data_helpers import write_coded_video
from dist_video.data import available_backends, read_frames
from dist_video.data.decoding import Cancelled, clear_probe_cache
from dist_video.engine.inference import read_test_clips
from dist_video.engine.predict import predict_file

PREPROCESS = {"sampling": "segment", "num_views": 3, "num_crops": 1, "crop_size": 32, "test_scale": 32,
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class SetAfter(threading.Event):
    """An event that reads as set from its ``after``-th ``is_set()`` call on (counted in ``calls``)."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.calls = after, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.after


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    # 240 frames, a keyframe every 120: reading frames across the file decodes many packets
    return write_coded_video(tmp_path_factory.mktemp("cancel") / "long.mp4", 240, width=64, height=48,
                             options={"g": "120", "keyint_min": "120", "sc_threshold": "0"})


@pytest.mark.parametrize("backend", [b for b in ("pyav", "decord", "torchcodec") if b in available_backends()])
def test_a_cancel_during_decoding_stops_it_at_the_next_check(video, backend):
    clear_probe_cache()
    wanted = list(range(0, 240, 7))
    plain = read_frames(video, wanted, backend)
    assert torch.equal(read_frames(video, wanted, backend, cancel=threading.Event()), plain)  # never set: no change
    after = 2  # the second check: past the first batch of frames for every backend
    cancel = SetAfter(after)
    with pytest.raises(Cancelled, match="long.mp4: cancelled"):
        read_frames(video, wanted, backend, cancel=cancel)
    assert cancel.calls == after  # the first check that saw it set stopped the read: nothing decoded past it


def test_pyav_checks_before_every_packet(video):
    """The default backend's checks are per packet: frame 199 is read from the keyframe at 120
    (a seek), 80 packets, each checked first, so a cancel waits for at most one packet."""
    clear_probe_cache()
    counting = SetAfter(10 ** 9)
    read_frames(video, [199], "pyav", cancel=counting)
    assert counting.calls >= 80, counting.calls


def test_the_test_clips_and_predict_file_pass_the_cancel_down(video):
    model_calls = []

    class Model(torch.nn.Module):
        class config:
            num_frames = 4

        class_names = ["a", "b"]
        num_classes = 2

        def forward(self, x):
            model_calls.append(x.shape)
            return torch.zeros(x.shape[0], 2)

    clips = read_test_clips(video, PREPROCESS, num_frames=4, cancel=threading.Event())
    assert clips.clips.shape[0] == 3
    cancel = SetAfter(2)
    with pytest.raises(Cancelled):
        read_test_clips(video, PREPROCESS, num_frames=4, cancel=cancel)
    assert cancel.calls == 2
    with pytest.raises(Cancelled):
        predict_file(Model(), video, PREPROCESS, views=3, cancel=SetAfter(1))
    assert not model_calls  # cancelled while decoding: the model never ran
    result = predict_file(Model(), video, PREPROCESS, views=3, cancel=threading.Event())
    assert result["views"] == 3 and len(model_calls) == 1


def test_the_server_work_passes_the_request_cancel_to_the_views_decode(video):
    """``serve.work.predict_upload`` (a request's work thread) hands its cancel flag to the
    views' decoding: a request cancelled mid-decode stops there."""
    pytest.importorskip("fastapi")
    from dist_video.serve.requests import RequestOptions
    from dist_video.serve.settings import ServeSettings
    from dist_video.serve.work import predict_upload

    def model(x):
        raise AssertionError("the model must not run")

    model.config = type("config", (), {"num_frames": 4})
    cancel = SetAfter(2)
    with pytest.raises(Cancelled):
        predict_upload(model, str(video), PREPROCESS, RequestOptions(views=3), ServeSettings(), cancel)
    assert cancel.calls == 2  # the first call is the check before decoding; the second, inside it
