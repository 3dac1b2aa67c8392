"""Prediction over many files (every bad file reported, none lost), one-line errors for damaged
model files, model folders written with the user's umask, and zero-shot label heads
(``--labels`` / ``--prompt``, CLIP's Kinetics prompt ensemble, plain CLIP weights)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli_env, run_cli
from data_helpers import truncate, write_coded_video, write_synthetic
from zero_shot_helpers import ModuloTokenizer, tiny_text_clip

import dist_video.tokenizer as tk
from dist_video import VideoClassifier, load_official_checkpoint
from dist_video.baselines import FrozenMeanClassifier
from dist_video.engine.predict import DEFAULT_PREPROCESS, predict_file, predict_files, use_labels
from dist_video.loading import load_model
from dist_video.prompts import KINETICS_TEMPLATES, label_embeddings, parse_labels, templates_of

ASSETS = Path(__file__).parent / "assets"
TINY = ASSETS / "official-tiny"
TINY_PREPROCESS = {**DEFAULT_PREPROCESS, "crop_size": 64, "test_scale": 64, "num_views": 2, "num_frames": 16}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    good = [write_coded_video(d / f"good{i}.mp4", 24 + 8 * i, width=96, height=72, seed=i) for i in range(3)]
    text = d / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    truncated = truncate(good[0], d / "truncated.mp4", 0.4)
    return {"good0": good[0], "good1": good[1], "good2": good[2], "missing": d / "missing.mp4", "text": text,
            "empty": empty, "truncated": truncated}


def text_model(official_model, names=("a", "b", "c", "d", "e")):
    torch.manual_seed(0)
    return official_model.set_class_embeddings(torch.randn(len(names), 64), list(names))


# ----------------------------------------------------------------------------- many files, nothing lost
def test_every_good_file_is_predicted_and_every_bad_one_reported(official_model, videos):
    model = text_model(official_model)
    order = ["good0", "missing", "text", "good1", "truncated", "empty", "good2"]
    results = predict_files(model, [str(videos[k]) for k in order], TINY_PREPROCESS, topk=3)
    assert [r["video"] for r in results] == [str(videos[k]) for k in order]
    by_name = dict(zip(order, results))
    fused = model.fuse()
    for k in ("good0", "good1", "good2"):
        r = by_name[k]
        assert "error" not in r and r["views"] == 2 and len(r["top"]) == 3
        assert r == predict_file(fused, videos[k], TINY_PREPROCESS, topk=3)  # the same result alone
    causes = {"missing": "file not found", "empty": "empty file", "text": "cannot open", "truncated": ""}
    for k, cause in causes.items():
        r = by_name[k]
        assert set(r) == {"video", "error"}, r
        assert cause in r["error"] and "\n" not in r["error"] and r["error"], r


def test_predict_file_raises_for_a_bad_file(official_model, videos):
    from dist_video.data.decoding import VideoDecodeError

    with pytest.raises(VideoDecodeError, match="empty file"):
        predict_file(text_model(official_model).fuse(), videos["empty"], TINY_PREPROCESS)


class DuckModel:
    """No torch module at all: the interface an ONNX runner offers (callable, class names,
    num_classes, config.num_frames)."""

    class config:
        num_frames = 16

    class_names = ["x", "y"]
    num_classes = 2

    def __call__(self, video):
        assert video.dtype == torch.float32 and video.shape[1:] == (3, 16, 64, 64)
        return torch.stack([video.mean(dim=(1, 2, 3, 4)), -video.mean(dim=(1, 2, 3, 4))], dim=1)


def test_predict_files_needs_only_the_duck_interface(videos):
    results = predict_files(DuckModel(), [str(videos["good0"]), str(videos["missing"])], TINY_PREPROCESS, topk=2)
    assert [t["class"] for t in results[0]["top"]] in (["x", "y"], ["y", "x"])
    assert results[1]["error"] == "file not found"


# ----------------------------------------------------------------------------- damaged model files
def saved(official_model, folder: Path) -> Path:
    text_model(official_model).save_pretrained(folder)
    return folder


def test_damaged_model_folder_files_give_one_line_errors(official_model, tmp_path):
    good = saved(official_model, tmp_path / "good")
    cases = {}
    for name in ("model.safetensors", "clip.safetensors"):
        bad = tmp_path / f"truncated-{name}"
        shutil.copytree(good, bad)
        truncate(good / name, bad / name, 0.5)
        cases[bad] = (ValueError, f"{bad / name}: damaged or not a safetensors file")
        junk = tmp_path / f"text-{name}"
        shutil.copytree(good, junk)
        (junk / name).write_text("not tensors")
        cases[junk] = (ValueError, f"{junk / name}: damaged or not a safetensors file")
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "model.safetensors").unlink()
    cases[missing] = (FileNotFoundError, "model.safetensors: missing")
    other = tmp_path / "mismatched"
    shutil.copytree(good, other)
    official_model.set_linear_head(7).save_pretrained(tmp_path / "linear")
    shutil.copyfile(tmp_path / "linear" / "model.safetensors", other / "model.safetensors")
    cases[other] = (ValueError, "do not match")
    for folder, (kind, message) in cases.items():
        with pytest.raises(kind) as info:
            VideoClassifier.from_pretrained(folder)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert VideoClassifier.from_pretrained(good).num_classes == 5


def test_damaged_pyth_gives_one_line_error(tmp_path):
    bad = truncate(TINY / "official_checkpoint.pyth", tmp_path / "bad.pyth", 0.5)
    with pytest.raises(ValueError) as info:
        load_official_checkpoint(bad)
    assert str(info.value).startswith(f"{bad}: damaged or not a PyTorch checkpoint") and "\n" not in str(info.value)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_model_folders_are_written_with_the_umask(official_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = saved(official_model, tmp_path / "model")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "clip.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ----------------------------------------------------------------------------- labels and prompts
def test_parse_labels(tmp_path):
    assert parse_labels("juggling, archery ,surfing") == ["juggling", "archery", "surfing"]
    f = tmp_path / "labels.txt"
    f.write_text("playing guitar\n\nsurfing water\n")
    assert parse_labels(str(f)) == ["playing guitar", "surfing water"]
    assert parse_labels(["a", " b "]) == ["a", "b"]
    with pytest.raises(ValueError, match="more than once: a"):
        parse_labels("a, b, a")
    with pytest.raises(ValueError, match="no label names"):
        parse_labels(" , ")


def test_templates():
    assert len(KINETICS_TEMPLATES) == 28 and len(set(KINETICS_TEMPLATES)) == 28
    assert all(t.count("{}") == 1 for t in KINETICS_TEMPLATES)
    assert "a video of a person {}." in KINETICS_TEMPLATES and "a demonstration of a person practicing {}." in \
        KINETICS_TEMPLATES
    assert templates_of(None) == list(KINETICS_TEMPLATES)
    assert templates_of("a video of {}.") == ["a video of {}."]
    assert templates_of("a photo of ") == ["a photo of {}"]  # no {}: a prefix


def test_prompt_ensemble_is_the_mean_of_normalised_embeddings(official_model):
    tok = ModuloTokenizer()
    labels = ["juggling", "archery", "surfing"]
    templates = ["a video of {}.", "a photo of a person {}.", "{}"]
    got = label_embeddings(official_model.encode_text, tok, labels, templates)
    each = [F.normalize(official_model.encode_text(tok([t.format(x) for x in labels])), dim=-1) for t in templates]
    torch.testing.assert_close(got, sum(each) / 3, rtol=0, atol=1e-6)
    one = label_embeddings(official_model.encode_text, tok, labels, ["{}"])
    torch.testing.assert_close(one, F.normalize(official_model.encode_text(tok(labels)), dim=-1))


def test_labels_give_exactly_the_asked_classes_and_the_text_logits(official_model, reference):
    official_model.clip.tokenizer = ModuloTokenizer()
    labels = ["surfing water", "juggling balls", "archery", "abseiling"]
    use_labels(official_model, ", ".join(labels), prompt="a video of a person {}.")
    assert official_model.class_names == labels and official_model.num_classes == 4
    video = reference["video"]
    text = official_model.encode_text(ModuloTokenizer()([f"a video of a person {x}." for x in labels]))
    z = F.normalize(official_model.encode_video(video), dim=-1)
    expected = official_model.clip.logit_scale.exp() * z @ F.normalize(text, dim=-1).t()
    with torch.no_grad():
        torch.testing.assert_close(official_model(video), expected, rtol=1e-5, atol=1e-4)
        fused = official_model.fuse()
        assert fused.class_names == labels
        torch.testing.assert_close(fused(video), expected, rtol=1e-5, atol=1e-4)
    # the default: CLIP's Kinetics ensemble
    use_labels(official_model, labels)
    ensemble = label_embeddings(official_model.encode_text, ModuloTokenizer(), labels, KINETICS_TEMPLATES)
    with torch.no_grad():
        torch.testing.assert_close(official_model(video), official_model.clip.logit_scale.exp() * z
                                   @ F.normalize(ensemble, dim=-1).t(), rtol=1e-5, atol=1e-4)


def test_linear_heads_refuse_labels(official_model):
    official_model.set_linear_head(3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="linear head .* cannot score new label names"):
        use_labels(official_model, "x, y")


def test_a_vocabulary_too_large_for_the_text_tower_is_refused(official_model):
    official_model.clip.tokenizer = None
    with pytest.raises(ValueError, match="has 49408 tokens but the text tower embeds 512"):
        use_labels(official_model, "x, y", vocab=str(ASSETS / "vocab" / tk.OPENAI_VOCAB_NAME))


def test_the_package_ships_openai_vocabulary(monkeypatch):
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "dist_video.assets.vocab"))
    found = tk.find_vocab()
    assert found.parts[-4:] == ("dist_video", "assets", "vocab", tk.OPENAI_VOCAB_NAME)
    digest = hashlib.sha256(found.read_bytes()).hexdigest()
    assert digest == json.loads((ASSETS / "tokenizer" / "expected_ids.json").read_text())["vocab_sha256"]


def test_plain_clip_weights_are_a_zero_shot_model(tmp_path, videos, monkeypatch):
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "dist_video.assets.vocab"))
    weights = tiny_text_clip(tmp_path / "ViT-tiny.pt")
    loaded = load_model(str(weights), labels="juggling, archery, surfing", prompt="a video of {}.", device="cpu",
                        clip_dtype="fp32", num_frames=4)
    model, preprocess = loaded.model, loaded.preprocess
    assert isinstance(model, FrozenMeanClassifier) and model.class_names == ["juggling", "archery", "surfing"]
    assert (preprocess["crop_size"], preprocess["num_frames"], model.config.alpha) == (32, 4, 1)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        images = video.transpose(1, 2).flatten(0, 1)  # frame index fastest
        frames = F.normalize(model.clip.encode_image(images).view(2, 4, -1).mean(1), dim=-1)
        text = F.normalize(model.encode_text(model.clip.tokenizer([f"a video of {x}." for x in model.class_names])),
                           dim=-1)
        torch.testing.assert_close(model(video), model.clip.logit_scale.exp() * frames @ text.t(), rtol=1e-5, atol=1e-4)
    result = predict_files(model, [str(videos["good1"])], preprocess, topk=3)[0]
    assert sorted(t["class"] for t in result["top"]) == ["archery", "juggling", "surfing"]
    with pytest.raises(ValueError, match="plain CLIP weights have no classes: pass --labels"):
        load_model(str(weights), device="cpu").require_head()


def test_serve_takes_the_frames_of_plain_clip_weights(tmp_path, monkeypatch):
    from dist_video.serve import load_served_model

    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "dist_video.assets.vocab"))
    weights = tiny_text_clip(tmp_path / "ViT-tiny.pt")
    served = load_served_model(str(weights), labels="juggling, archery", device="cpu", clip_dtype="fp32", num_frames=4)
    assert served.preprocess["num_frames"] == 4 and served.model.config.num_frames == 4
    assert served.label_heads is not None


# ----------------------------------------------------------------------------- the command line
def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, env=cli_env(**(env or {})))


@pytest.mark.slow
def test_cli_predict_reports_each_file_and_exits_1(official_model, videos, tmp_path):
    model = saved(official_model, tmp_path / "model")
    order = ["good0", "missing", "text", "good1", "truncated", "empty", "good2"]
    paths = [str(videos[k]) for k in order]
    proc = cli("predict", str(model), *paths, "--json", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["video"] for r in results] == paths
    assert [("top" in r) for r in results] == [k.startswith("good") for k in order]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dist-video predict: error: ")]
    assert len(errors) == 4 and "Traceback" not in proc.stderr
    assert f"{videos['missing']}: file not found" in proc.stderr
    plain = cli("predict", str(model), str(videos["good0"]), str(videos["empty"]), "--device", "cpu")
    assert plain.returncode == 1 and plain.stdout.startswith(str(videos["good0"]))
    assert f"dist-video predict: error: {videos['empty']}: empty file (0 bytes)" in plain.stderr
    assert cli("predict", str(model), str(videos["good0"]), "--stride", "2").returncode == 2  # usage error
    assert cli("predict", str(model), str(videos["good0"])).returncode == 0


@pytest.mark.slow
def test_cli_damaged_model_files_give_one_line_errors_in_every_command(official_model, videos, tmp_path):
    good = saved(official_model, tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    truncate(good / "model.safetensors", bad / "model.safetensors", 0.5)
    pyth = truncate(TINY / "official_checkpoint.pyth", tmp_path / "bad.pyth", 0.5)
    video = str(videos["good0"])
    data = tmp_path / "data"
    write_synthetic(data, 2, 3)
    runs = {
        "predict": [("predict", str(bad), video), ("predict", str(pyth), video, "--classes", "kinetics400")],
        "embed": [("embed", str(bad), video, "--out", str(tmp_path / "emb"))],
        "info": [("info", str(bad)), ("info", str(pyth))],
        "convert": [("convert", str(pyth), str(tmp_path / "converted"))],
        "evaluate": [("evaluate", str(bad), *[a for s in (f"data.root={data}", f"data.val={data / 'val.csv'}",
                                                            f"data.classes={data / 'classes.txt'}", "data.format=csv")
                                              for a in ("--set", s)])],
    }
    for command, variants in runs.items():
        for args in variants:
            proc = cli(*args)
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
            assert lines[-1].startswith(f"dist-video {command}: error: "), (args, proc.stderr)
            assert "damaged or not a" in lines[-1], (args, lines[-1])


@pytest.mark.slow
def test_cli_labels_with_plain_clip_weights_and_the_shipped_vocabulary(tmp_path, videos):
    weights = tiny_text_clip(tmp_path / "ViT-tiny.pt")
    proc = cli("predict", str(weights), str(videos["good0"]), "--labels", "surfing, archery, juggling", "--frames",
               "4", "--json", "--topk", "3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    top = json.loads(proc.stdout)[0]["top"]
    assert sorted(t["class"] for t in top) == ["archery", "juggling", "surfing"]
    assert abs(sum(t["probability"] for t in top) - 1) < 1e-5


def test_evaluate_with_labels_is_zero_shot_on_the_dataset_names(tmp_path, monkeypatch):
    """``evaluate --labels``: a model trained on other classes (here: none) is scored on a dataset
    by the text of its class names; the predictions are those of ``predict --labels``."""
    import csv

    from dist_video.baselines import BaselineConfig
    from dist_video.clip_loaders import load_clip
    from dist_video.config import load_config
    from dist_video.engine.run import evaluate_model

    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "dist_video.assets.vocab"))
    data = tmp_path / "data"
    write_synthetic(data, 2, 6)
    clip = load_clip(tiny_text_clip(tmp_path / "clip.pt"))
    FrozenMeanClassifier(clip, BaselineConfig(num_frames=8, alpha=1), clip_dtype="fp32").set_linear_head(2) \
        .save_pretrained(tmp_path / "linear")
    model = FrozenMeanClassifier(clip, BaselineConfig(num_frames=8, alpha=1), clip_dtype="fp32")
    model.save_pretrained(tmp_path / "model", metadata={"preprocess": {**DEFAULT_PREPROCESS, "crop_size": 32,
                                                                       "test_scale": 32, "num_views": 1}})
    sets = [f"data.root={data}", f"data.val={data / 'val.csv'}", f"data.classes={data / 'classes.txt'}",
            "data.format=csv", "data.crop_size=32", "data.test_scale=32", "data.num_views=1", "data.workers=0",
            "model.dist.num_frames=8", f"output_dir={tmp_path / 'run'}", "train.device=cpu", "model.clip_dtype=fp32"]
    cfg = load_config(None, None, sets)
    metrics = evaluate_model(str(tmp_path / "model"), cfg, labels="", prompt="a video of {}.", progress=False)
    assert metrics["num_videos"] == 6
    names = [ln.strip() for ln in (data / "classes.txt").read_text().splitlines() if ln.strip()]
    rows = list(csv.DictReader(open(tmp_path / "run" / "eval" / "predictions.csv")))
    loaded = load_model(str(tmp_path / "model"), labels=names, prompt="a video of {}.", device="cpu", clip_dtype="fp32")
    zero_shot, preprocess = loaded.model, loaded.preprocess
    for row in rows:
        assert row["prediction"] == predict_files(zero_shot, [row["video"]], preprocess, topk=1)[0]["top"][0]["class"]
    with pytest.raises(ValueError, match=f"--labels has 2 names but the dataset has {len(names)} classes"):
        evaluate_model(str(tmp_path / "model"), cfg, labels="a, b", progress=False)
    with pytest.raises(ValueError, match="linear head"):
        evaluate_model(str(tmp_path / "linear"), cfg, labels="", progress=False)
