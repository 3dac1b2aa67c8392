"""Issue 25's inference paths: predict/embed read the next file in a background thread while
the model runs (same results, one bad file stays its own error, the thread stops with the
caller), send uint8 clips to the device and normalise there, evaluation transfers its
probabilities once instead of once per batch, and ``serve --compile`` serves the compiled form."""

from __future__ import annotations

import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
from data_helpers import write_coded_video

import dist_video.engine.embed as embed_module
import dist_video.engine.predict as predict_module
from dist_video.data.decoding import VideoDecodeError
from dist_video.data.transforms import TestTransform
from dist_video.engine import data as engine_data
from dist_video.engine.distributed import DistEnv
from dist_video.engine.embed import embed_files
from dist_video.engine.evaluate import predict_dataset
from dist_video.engine.inference import TestClips, read_ahead, read_test_clips
from dist_video.engine.predict import DEFAULT_PREPROCESS, predict_file, predict_files

PREPROCESS = {**DEFAULT_PREPROCESS, "crop_size": 64, "test_scale": 64, "num_views": 2, "num_frames": 16}
READ_THREAD = "dist-video-read-ahead"
PAUSE = 0.15  # seconds a stubbed read and a stubbed model each take


def read_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(READ_THREAD)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("pipelined")
    return [str(write_coded_video(d / f"v{i}.mp4", 20 + 6 * i, width=80, height=64, seed=i)) for i in range(3)]


# ----------------------------------------------------------------------------- read_ahead
def test_read_ahead_keeps_the_order_and_each_items_error():
    def read(i: int) -> int:
        if i == 2:
            raise ValueError(f"item {i} is bad")
        return i * i

    got = []
    with closing(read_ahead(range(5), read)) as reads:
        for i, future in reads:
            try:
                got.append((i, future.result()))
            except ValueError as e:
                got.append((i, str(e)))
    assert got == [(0, 0), (1, 1), (2, "item 2 is bad"), (3, 9), (4, 16)]
    assert read_threads() == []


def test_read_ahead_overlaps_reading_with_the_callers_work_and_stays_bounded():
    started = []

    def read(i: int) -> int:
        started.append(i)
        time.sleep(PAUSE)
        return i

    ahead = []
    t0 = time.perf_counter()
    with closing(read_ahead(range(4), read, depth=1)) as reads:
        for i, future in reads:
            assert future.result() == i
            time.sleep(PAUSE)  # the caller's work on item i
            ahead.append(len(started) - 1 - i)  # reads started beyond the current item
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.8 * 4 * 2 * PAUSE  # serial: 4 x (read + work)
    assert max(ahead) <= 1  # depth 1: never more than one file read ahead


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_the_read_thread_stops_when_the_caller_raises(interrupt):
    started = []

    def read(i: int) -> int:
        started.append(i)
        time.sleep(0.02)
        return i

    with pytest.raises(interrupt):
        with closing(read_ahead(range(50), read, depth=2)) as reads:
            for i, future in reads:
                future.result()
                if i == 1:
                    raise interrupt("stop")
    assert read_threads() == []  # joined, not left running
    assert len(started) <= 4  # items 0, 1 and at most two ahead: the other reads were cancelled


# ----------------------------------------------------------------------------- pipelined predict / embed
class SlowModel:
    """An inference model that takes PAUSE seconds per call (as a device would)."""

    class config:
        num_frames = 4

    class_names = ["a", "b", "c"]
    num_classes = 3

    def __init__(self):
        self.inputs: list[torch.Tensor] = []

    def _features(self, video: torch.Tensor) -> torch.Tensor:
        time.sleep(PAUSE)
        self.inputs.append(video)
        m = video.mean(dim=(2, 3, 4))
        return torch.cat([m, -m.sum(dim=1, keepdim=True)], dim=1)[:, :3]

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self._features(video)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self._features(video)


def slow_reader(path, preprocess, *, num_frames, views=None, pin=False) -> TestClips:
    """read_test_clips that takes PAUSE seconds and fails for files named bad*."""
    time.sleep(PAUSE)
    name = Path(path).name
    if name.startswith("bad"):
        raise VideoDecodeError(path, "cannot open: not a video")
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    clips = torch.randint(0, 256, (views or 2, 3, num_frames, 8, 8), dtype=torch.uint8, generator=g)
    return TestClips(clips, TestTransform(crop_size=8, short_side=8))


@pytest.mark.parametrize("module", [predict_module, embed_module])
def test_pipelined_files_equal_the_serial_path_in_less_time(module, monkeypatch):
    monkeypatch.setattr(module, "read_test_clips", slow_reader)
    paths = ["v0.mp4", "v1.mp4", "bad.mp4", "v3.mp4"]
    model = SlowModel()
    run = (lambda p: predict_files(model, p, PREPROCESS, topk=2)) if module is predict_module else \
        (lambda p: embed_files(model, p, PREPROCESS))
    t0 = time.perf_counter()
    piped = run(paths)
    elapsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    serial = [run([p]) for p in paths]  # one file per call: nothing to read ahead
    serial_elapsed = time.perf_counter() - t0
    assert elapsed < 0.8 * serial_elapsed
    if module is predict_module:
        assert piped == [r for [r] in serial]
        assert piped[2] == {"video": "bad.mp4", "error": "cannot open: not a video"}
        assert [r["video"] for r in piped] == paths and all("top" in piped[i] for i in (0, 1, 3))
    else:
        assert [r[0] for r in piped.rows] == ["v0.mp4", "v1.mp4", "v3.mp4"]
        assert piped.errors == [{"video": "bad.mp4", "error": "cannot open: not a video"}]
        torch.testing.assert_close(piped.embeddings, torch.cat([s.embeddings for s in serial if s.rows]),
                                   rtol=0, atol=0)
    assert read_threads() == []


# ----------------------------------------------------------------------------- uint8 to the device
def test_uint8_clips_normalised_on_the_device_equal_the_float_clips(files):
    for path in files:
        clips = read_test_clips(path, PREPROCESS, num_frames=16)
        assert clips.clips.dtype == torch.uint8
        want = engine_data.test_clips_of_file(path, PREPROCESS, num_frames=16)
        torch.testing.assert_close(clips.on(torch.device("cpu")), want, rtol=0, atol=0)


@pytest.fixture
def moves_to_device(monkeypatch) -> list[torch.dtype]:
    """The dtypes of the clip tensors (5-D, 3 channels) that ``.to(device)`` is called on."""
    moved = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self.dim() == 5 and self.shape[1] == 3 and any(
                isinstance(a, (torch.device, str)) for a in (*args, kwargs.get("device"))):
            moved.append(self.dtype)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return moved


def test_predict_and_embed_send_uint8_and_give_the_float_paths_results(official_model, files, moves_to_device):
    torch.manual_seed(0)
    model = official_model.set_class_embeddings(torch.randn(5, 64), list("abcde"))
    fused = model.fuse()
    results = predict_files(fused, files, PREPROCESS, topk=5)
    index = embed_files(fused, files, PREPROCESS)
    assert moves_to_device and set(moves_to_device) == {torch.uint8}
    moves_to_device.clear()
    with torch.no_grad():
        for i, path in enumerate(files):
            clips = engine_data.test_clips_of_file(path, PREPROCESS, num_frames=16)  # the float32 path
            probs = fused(clips).float().softmax(dim=1).mean(dim=0)
            top = results[i]["top"]
            torch.testing.assert_close(torch.tensor([t["probability"] for t in top]),
                                       probs.sort(descending=True).values, rtol=0, atol=1e-6)
            assert [t["class"] for t in top] == [model.class_names[j] for j in probs.argsort(descending=True)]
            torch.testing.assert_close(index.embeddings[i], fused.encode_video(clips).mean(dim=0), rtol=0, atol=1e-6)
    assert results[0] == predict_file(fused, files[0], PREPROCESS, topk=5)


# ----------------------------------------------------------------------------- evaluation: one transfer
class ClipItems(torch.utils.data.Dataset):
    """``videos`` videos x 2 views of uint8 clips, as a test dataset gives them."""

    items_per_video = 2

    def __init__(self, videos: int):
        g = torch.Generator().manual_seed(videos)
        self.clips = torch.randint(0, 256, (videos * 2, 3, 4, 8, 8), dtype=torch.uint8, generator=g)
        self.transform = TestTransform(crop_size=8, short_side=8)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.clips[i], "label": (i // 2) % 3, "index": i // 2}


def test_evaluation_moves_probabilities_to_the_host_once(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 3)

    def model(video: torch.Tensor) -> torch.Tensor:  # an inference form (no ``fuse``)
        return head(video.mean(dim=(2, 3, 4)))

    calls = {"cpu": 0, "item": 0}
    cpu, item = torch.Tensor.cpu, torch.Tensor.item

    def counting(name, method):
        def spy(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return spy

    monkeypatch.setattr(torch.Tensor, "cpu", counting("cpu", cpu))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    transfers = []
    for videos in (2, 6):  # 2 and 6 batches of one video's two views
        dataset = ClipItems(videos)
        calls.update(cpu=0, item=0)
        with torch.no_grad():
            scores, labels, order = predict_dataset(model, dataset, DistEnv(0, 1, 0, torch.device("cpu")),
                                                    batch_size=2, workers=0)
            transfers.append(dict(calls))
            probs = model(dataset.transform.normalize(dataset.clips)).softmax(dim=1)
        assert order == list(range(videos)) and labels.tolist() == [v % 3 for v in range(videos)]
        torch.testing.assert_close(scores, probs.view(videos, 2, 3).mean(dim=1), rtol=0, atol=1e-6)
    # one transfer whatever the number of batches (the loader's seed is its one .item())
    assert transfers[0] == transfers[1] and transfers[0]["cpu"] == 1 and transfers[0]["item"] <= 1


# ----------------------------------------------------------------------------- serve --compile
def test_serve_compile_serves_the_compiled_inference_form(tiny_clip, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from deploy_helpers import make_tiny_model_folder

    from dist_video import cli
    from dist_video.serve import load_served_model

    compiled = []

    def record(fn, *args, **kwargs):  # compiling itself is the slow test's (test_serve.py)
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    folder = make_tiny_model_folder(tmp_path / "model", tiny_clip)
    eager = load_served_model(str(folder), device="cpu", clip_dtype="fp32")
    assert compiled == []
    served = load_served_model(str(folder), device="cpu", clip_dtype="fp32", compile=True)
    assert [getattr(c, "__name__", type(c).__name__) for c in compiled] == ["encode_video", "FusedDiSTModel"]
    assert served.model is compiled[1]
    video = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(served.model(video), eager.model(video), rtol=0, atol=0)
    seen = {}
    monkeypatch.setattr("dist_video.serve.run_server", lambda model, **kw: seen.update(kw, model=model))
    assert cli.main(["serve", str(folder), "--compile", "--port", "1"]) == 0
    assert seen["compile"] is True and seen["model"] == str(folder)
    assert cli.main(["serve", str(folder), "--port", "1"]) == 0 and seen["compile"] is False
