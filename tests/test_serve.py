"""The prediction server, started for real on a loopback port in a subprocess and called over
HTTP: good, bad and oversized uploads, tokens, a burst of concurrent uploads, and the server
still answering after all of it."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from data_helpers import truncate  # noqa: E402
from deploy_helpers import (CLASS_NAMES, Server, make_tiny_model_folder, same_prediction,  # noqa: E402
                            write_test_videos)

from dist_video.engine.predict import predict_files  # noqa: E402
from dist_video.loading import load_model  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_clip):
    return make_tiny_model_folder(tmp_path_factory.mktemp("serve") / "model", tiny_clip)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_test_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def expected(model_folder, videos):
    """What ``dist-video predict --json --clip-dtype fp32`` gives for each video, by name."""
    loaded = load_model(str(model_folder), device="cpu", clip_dtype="fp32")
    model, preprocess = loaded.model, loaded.preprocess
    return {Path(r["video"]).name: r for r in predict_files(model, [str(v) for v in videos], preprocess, topk=5)}


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server-tmp")
    with Server(model_folder, "--max-upload-mb", "1", "--clip-dtype", "fp32", "--max-concurrent", "2",
                env={"TMPDIR": str(tmp)}, token=TOKEN) as srv:
        srv.tmp = tmp
        yield srv


def post(server, path: Path | None = None, *, data: bytes | None = None, field: str = "video", name=None,
         headers=None, params=None, timeout=120):
    content = data if data is not None else path.read_bytes()
    files = {field: (name or (path.name if path else "clip.mp4"), content, "video/mp4")}
    return httpx.post(server.url + "/predict", files=files, headers=server.headers() if headers is None else headers,
                      params=params, timeout=timeout)


def test_health_names_the_model_and_needs_the_token(server):
    r = httpx.get(server.url + "/health", headers=server.headers())
    assert r.status_code == 200
    info = r.json()
    assert info["model"] == "model" and info["classes"] == CLASS_NAMES and info["device"] == "cpu"
    assert info["runtime"] == "pytorch" and info["num_frames"] == 8
    assert httpx.get(server.url + "/health").status_code == 401
    wrong = httpx.get(server.url + "/health", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    assert wrong.headers["www-authenticate"] == "Bearer"


def test_good_uploads_get_the_json_of_predict(server, videos, expected):
    for video in videos:
        r = post(server, video)
        assert r.status_code == 200, r.text
        [got] = r.json()
        same_prediction(got, expected[video.name], video.name)
    raw = httpx.post(server.url + "/predict", content=videos[0].read_bytes(), params={"topk": 2},
                     headers={**server.headers(), "X-Filename": "../../etc/raw.mp4"}, timeout=120)
    assert raw.status_code == 200, raw.text
    [got] = raw.json()
    assert got["video"] == "raw.mp4" and len(got["top"]) == 2  # a label only: no client path is kept
    assert [t["class"] for t in got["top"]] == [t["class"] for t in expected[videos[0].name]["top"][:2]]
    timeline = post(server, videos[2], params={"window": 0.5, "stride": 0.5, "topk": 1})
    assert timeline.status_code == 200, timeline.text
    [got] = timeline.json()
    assert got["video"] == videos[2].name and len(got["windows"]) == 4  # 57 frames at 30 fps: 1.9 s
    assert [w["start"] for w in got["windows"]] == [0.0, 0.5, 1.0, 1.5]
    assert all(len(w["top"]) == 1 and w["top"][0]["class"] in CLASS_NAMES for w in got["windows"])


def test_bad_uploads_get_a_4xx_json_error_naming_the_problem(server, videos, tmp_path):
    cases = {
        "not a video": (post(server, data=os.urandom(5000), name="noise.mp4"), 422, "noise.mp4"),
        "truncated": (post(server, truncate(videos[2], tmp_path / "cut.mp4", 0.5)), 422, "cut.mp4"),
        "empty": (post(server, data=b"", name="empty.mp4"), 400, "empty"),
        "wrong field": (post(server, videos[0], field="file"), 400, "'video'"),
        "bad topk": (post(server, videos[0], params={"topk": "many"}), 400, "topk"),
        "wrong token": (post(server, videos[0], headers={"Authorization": "Bearer wrong"}), 401, "token"),
        "no token": (post(server, videos[0], headers={}), 401, "token"),
    }
    for case, (r, status, word) in cases.items():
        assert r.status_code == status, (case, r.text)
        assert word in r.json()["error"], (case, r.json())
        assert "/tmp" not in r.json()["error"] and str(server.tmp) not in r.json()["error"], (case, r.json())
    assert httpx.get(server.url + "/health", headers=server.headers()).status_code == 200


def test_oversized_uploads_get_413(server):
    big = os.urandom(int(1.5 * 2 ** 20))
    r = post(server, data=big, name="big.mp4")
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds on the bytes received
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(server.url + "/predict", content=chunks(), headers=server.headers(), timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert httpx.get(server.url + "/health", headers=server.headers()).status_code == 200


def test_twenty_concurrent_uploads_are_answered_and_memory_returns(server, videos, expected):
    warm = post(server, videos[0])
    assert warm.status_code == 200
    before = server.rss_bytes()
    jobs = [videos[i % len(videos)] for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda v: post(server, v, timeout=300), jobs))
    for video, r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        same_prediction(r.json()[0], expected[video.name], video.name)
    after = server.rss_bytes()
    assert after <= 1.10 * before, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"
    leftovers = [p for p in server.tmp.rglob("*") if p.is_file() and not p.name.startswith("server-")]
    assert not leftovers, leftovers  # every upload deleted, none left in the private folder or the spool
    assert httpx.get(server.url + "/health", headers=server.headers()).status_code == 200


def test_the_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="upload-form"' in r.text and 'name="video"' in r.text


def test_serving_an_exported_folder(model_folder, videos, expected, tmp_path):
    pytest.importorskip("onnxruntime")
    from dist_video.export import export_onnx

    export_onnx(model_folder, tmp_path / "onnx")
    with Server(tmp_path / "onnx", env={"TMPDIR": str(tmp_path)}) as srv:
        info = httpx.get(srv.url + "/health").json()
        assert info["runtime"] == "onnxruntime" and info["classes"] == CLASS_NAMES
        r = post(srv, videos[1])
        assert r.status_code == 200, r.text
        same_prediction(r.json()[0], expected[videos[1].name], videos[1].name)


def test_serving_with_compile_answers_as_predict(model_folder, videos, expected, tmp_path):
    with Server(model_folder, "--compile", "--clip-dtype", "fp32", env={"TMPDIR": str(tmp_path)}) as srv:
        assert httpx.get(srv.url + "/health").json()["runtime"] == "pytorch"
        for video in videos[:2]:
            r = post(srv, video, timeout=300)  # the first request per shape compiles
            assert r.status_code == 200, r.text + srv.output()
            same_prediction(r.json()[0], expected[video.name], video.name)
