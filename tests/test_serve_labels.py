"""Per-request ``labels`` on the prediction server: a model with a class-text head scores the
label names a request sends (the JSON of ``predict --labels --json``), with one fused model
shared by requests with different label sets; bad, too many or refused labels get a 400 and
the server keeps serving. The server tests start the real server on a loopback port."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from deploy_helpers import (CLASS_NAMES, Server, make_tiny_model_folder, make_tiny_text_model_folder,
                            same_prediction, write_test_videos)
from zero_shot_helpers import ModuloTokenizer

from dist_video.engine.predict import predict_files, use_labels
from dist_video.loading import load_model
from dist_video.prompts import label_embeddings, templates_of
from dist_video.serve import BatchingModel, LabelHeads, LabelledModel, parse_request_labels

SETS = {"sports": ["surfing", "archery", "juggling balls", "rowing a boat"],
        "home": ["knitting", "yawning", "washing dishes"]}


# ----------------------------------------------------------------------------- in process
def test_request_labels_are_parsed_like_the_cli_and_bounded():
    assert parse_request_labels("juggling, archery ,surfing") == ["juggling", "archery", "surfing"]
    assert parse_request_labels("playing guitar\n\nsurfing, big waves\r\n") == ["playing guitar", "surfing, big waves"]
    assert parse_request_labels("a, b, c", max_labels=3) == ["a", "b", "c"]
    problems = {
        "": "no label names", " , ,": "no label names", " \n\r\n ": "no label names",
        "a, b, c, d": "4 names, more than the limit of 3",
        "a, " + "x" * 21: "longer than the limit of 20 characters",
        "a, b, a": "more than once: a",
        "a, b\tc": "control characters",
    }
    for text, message in problems.items():
        with pytest.raises(ValueError, match=message):
            parse_request_labels(text, max_labels=3, max_chars=20)
    with pytest.raises(ValueError, match="must be text"):
        parse_request_labels(None)


def test_a_label_head_is_the_head_of_predict_labels_and_the_model_is_shared(official_model, reference):
    """Per-call heads on one fused model, in one batch, give each call the logits of the model
    made with ``use_labels`` for its names; the shared model's own head is untouched."""
    official_model.clip.tokenizer = ModuloTokenizer()
    official_model.set_class_embeddings(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)),
                                        list("abcde"))
    fused = official_model.fuse()
    logit_scale = float(official_model.clip.logit_scale)
    heads = LabelHeads(official_model.encode_text, ModuloTokenizer(), lambda e: fused.text_head(e, logit_scale),
                       max_sets=1)
    video = reference["video"]
    want = {}
    for key, names in SETS.items():
        labelled = use_labels(copy.deepcopy(official_model), names, prompt="a video of {}.").fuse()
        assert labelled.class_names == names
        with torch.no_grad():
            want[key] = labelled(video)
    own = fused(video)
    batching = BatchingModel(fused, max_batch=16)
    try:
        views = {key: LabelledModel(batching, heads.head(names, "a video of {}."), names)
                 for key, names in SETS.items()}
        assert heads.made == 2 and len(heads) == 1  # the cache holds max_sets heads
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda k: (k, views[k](video) if k != "own" else batching(video)),
                                ["sports", "home", "own"] * 2))
    finally:
        batching.close()
    for key, logits in got:
        torch.testing.assert_close(logits, want[key] if key != "own" else own, rtol=1e-5, atol=1e-5)
    assert views["home"].num_classes == 3 and views["home"].class_names == SETS["home"]
    torch.testing.assert_close(fused(video), own, rtol=0, atol=0)  # the shared head was not replaced
    assert fused.class_names == list("abcde")
    # the ensemble by default, and the same head object for a set asked again
    ensemble = label_embeddings(official_model.encode_text, ModuloTokenizer(), SETS["home"], templates_of(None))
    torch.testing.assert_close(heads.head(SETS["home"]).weight,
                               fused.text_head(ensemble, logit_scale).weight, rtol=0, atol=0)
    assert heads.head(SETS["home"]) is heads.head(SETS["home"]) and heads.made == 3
    # a server started with --prompt uses it for requests that send none
    with_default = LabelHeads(official_model.encode_text, ModuloTokenizer(),
                              lambda e: fused.text_head(e, logit_scale), default_prompt="a video of {}.")
    torch.testing.assert_close(with_default.head(SETS["home"]).weight,
                               heads.head(SETS["home"], "a video of {}.").weight, rtol=0, atol=0)
    assert not torch.equal(with_default.head(SETS["home"]).weight, heads.head(SETS["home"]).weight)


# ----------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return make_tiny_text_model_folder(tmp_path_factory.mktemp("serve-labels") / "text-model")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_test_videos(tmp_path_factory.mktemp("videos"))


def expected_with_labels(folder: Path, videos, names, prompt=None, **kwargs) -> dict:
    """What ``dist-video predict FOLDER --labels NAMES [--prompt P] --json --clip-dtype fp32`` gives."""
    loaded = load_model(str(folder), labels=", ".join(names), prompt=prompt, device="cpu", clip_dtype="fp32")
    model, preprocess = loaded.model, loaded.preprocess
    assert model.class_names == list(names)
    return {Path(r["video"]).name: r for r in predict_files(model, [str(v) for v in videos], preprocess, **kwargs)}


def post(server, video: Path | None, *, data: dict | None = None, params=None, content: bytes | None = None,
         timeout=120):
    import httpx

    files = {"video": (video.name, video.read_bytes(), "video/mp4")} if video is not None else None
    return httpx.post(server.url + "/predict", files=files, data=data, params=params, timeout=timeout,
                      content=content, headers=server.headers())


@pytest.fixture(scope="module")
def server(text_folder, tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    tmp = tmp_path_factory.mktemp("server-tmp")
    with Server(text_folder, "--clip-dtype", "fp32", "--max-labels", "6", env={"TMPDIR": str(tmp)}) as srv:
        yield srv


@pytest.mark.slow
def test_labels_in_a_request_give_exactly_those_classes_and_the_scores_of_predict(server, text_folder, videos):
    import httpx

    info = httpx.get(server.url + "/health").json()
    assert info["accepts_labels"] is True and info["max_labels"] == 6 and info["classes"] == CLASS_NAMES
    names = SETS["sports"]
    want = expected_with_labels(text_folder, videos, names, topk=5)
    for video in videos:
        r = post(server, video, data={"labels": ", ".join(names), "topk": "5"})
        assert r.status_code == 200, r.text
        [got] = r.json()
        assert sorted(t["class"] for t in got["top"]) == sorted(names)  # exactly the classes asked
        same_prediction(got, want[video.name], video.name)
    # one per line, in the raw-body form's query, under a prompt of the request's own
    prompt = "a video of a person {}."
    want = expected_with_labels(text_folder, videos[:1], SETS["home"], prompt=prompt, topk=2)
    r = post(server, None, content=videos[0].read_bytes(),
             params={"labels": "\n".join(SETS["home"]), "prompt": prompt, "topk": 2})
    assert r.status_code == 200, r.text
    got = r.json()[0]
    got["video"] = videos[0].name
    same_prediction(got, want[videos[0].name], videos[0].name)
    # a timeline with labels; and the model's own classes when a request names none
    r = post(server, videos[2], data={"labels": ", ".join(names), "window": "0.5", "topk": "1"})
    assert r.status_code == 200, r.text
    windows = r.json()[0]["windows"]
    assert len(windows) == 4 and all(w["top"][0]["class"] in names for w in windows)
    own = post(server, videos[1], data={"topk": "5"})
    assert own.status_code == 200 and sorted(t["class"] for t in own.json()[0]["top"]) == sorted(CLASS_NAMES)


@pytest.mark.slow
def test_concurrent_requests_with_different_label_sets_each_get_their_own(server, text_folder, videos):
    want = {key: expected_with_labels(text_folder, videos, names, topk=4) for key, names in SETS.items()}
    loaded = load_model(str(text_folder), device="cpu", clip_dtype="fp32")
    model, preprocess = loaded.model, loaded.preprocess
    want["own"] = {Path(r["video"]).name: r for r in predict_files(model, [str(v) for v in videos], preprocess, topk=4)}
    jobs = [(key, videos[i % len(videos)]) for i, key in enumerate(["sports", "home", "own"] * 4)]

    def ask(job):
        key, video = job
        data = {"topk": "4"} if key == "own" else {"topk": "4", "labels": ", ".join(SETS[key])}
        return post(server, video, data=data, timeout=300)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (key, video), r in zip(jobs, answers):
        assert r.status_code == 200, (key, r.text)
        same_prediction(r.json()[0], want[key][video.name], video.name)


@pytest.mark.slow
def test_bad_labels_get_a_400_naming_the_problem_and_the_server_goes_on(server, videos):
    import httpx

    cases = {
        "empty": ({"labels": ""}, "no label names"),
        "only commas": ({"labels": " , ,"}, "no label names"),
        "too many": ({"labels": ", ".join(f"class {i}" for i in range(7))}, "7 names, more than the limit of 6"),
        "too long": ({"labels": "a, " + "x" * 300}, "longer than the limit of 200 characters"),
        "repeated": ({"labels": "a, b, a"}, "more than once: a"),
        "bad prompt": ({"labels": "a, b", "prompt": "{} and {}"}, "prompt"),
        "prompt alone": ({"prompt": "a video of {}."}, "send labels too"),
    }
    for case, (data, message) in cases.items():
        r = post(server, videos[0], data=data)
        assert r.status_code == 400, (case, r.text)
        assert message in r.json()["error"], (case, r.json())
    r = post(server, None, content=videos[0].read_bytes(), params={"labels": ""})
    assert r.status_code == 400 and "no label names" in r.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200
    r = post(server, videos[0], data={"labels": "a, b"})
    assert r.status_code == 200 and sorted(t["class"] for t in r.json()[0]["top"]) == ["a", "b"]


@pytest.mark.slow
def test_a_linear_head_or_an_exported_folder_refuses_labels(videos, tmp_path, tiny_clip):
    pytest.importorskip("fastapi")
    import httpx

    linear = make_tiny_model_folder(tmp_path / "linear", tiny_clip)
    folders = {"linear": (linear, "linear head")}
    try:
        import onnxruntime  # noqa: F401

        from dist_video.export import export_onnx

        export_onnx(linear, tmp_path / "onnx")
        folders["exported"] = (tmp_path / "onnx", "exported model has a fixed class list")
    except ImportError:
        pass
    for kind, (folder, message) in folders.items():
        with Server(folder, "--clip-dtype", "fp32", env={"TMPDIR": str(tmp_path)}) as srv:
            info = httpx.get(srv.url + "/health").json()
            assert info["accepts_labels"] is False and message in info["labels_refusal"], (kind, info)
            r = post(srv, videos[0], data={"labels": "juggling, archery"})
            assert r.status_code == 400 and message in r.json()["error"], (kind, r.text)
            assert r.json()["error"].startswith("labels: "), (kind, r.text)
            ok = post(srv, videos[0], data={"topk": "5"})
            assert ok.status_code == 200, (kind, ok.text)
            assert sorted(t["class"] for t in ok.json()[0]["top"]) == sorted(CLASS_NAMES)
