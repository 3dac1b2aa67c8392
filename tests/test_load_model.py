"""``dist_video.load_model`` on the four kinds of model path, the test protocol it gives a folder
saved without one, the command line's table and its errors (internal errors, non-finite outputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_video.tokenizer as tk
from dist_video import DiSTConfig, DiSTVideoModel, LoadedModel, load_model
from dist_video.baselines import FrozenMeanClassifier
from dist_video.engine import data as engine_data
from dist_video.engine.inference import NonFiniteOutputError

from data_helpers import write_coded_video
from deploy_helpers import CLASS_NAMES, TINY_PREPROCESS, make_tiny_model_folder
from zero_shot_helpers import tiny_text_clip

ASSETS = Path(__file__).parent / "assets"
OFFICIAL = ASSETS / "official-tiny" / "official_checkpoint.pyth"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_coded_video(tmp_path_factory.mktemp("video") / "v.mp4", 24, width=96, height=72, seed=1)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "dist_video.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def small_clip_folder(path: Path, tiny_clip, *, preprocess: dict | None = None, nan: str | None = None) -> Path:
    """A DiST model on a 32-px CLIP, saved from Python (no run config: no recorded protocol).
    ``nan``: the weights whose names start with it (outside the CLIP; "" for all) are NaN."""
    torch.manual_seed(5)
    model = DiSTVideoModel(tiny_clip(image=32, embed=32, width=64, layers=2),
                           DiSTConfig(num_frames=8, alpha=2, temporal_dim=8, integration_dim=64, pooling_layers=1),
                           clip_dtype=torch.float32)
    model.set_linear_head(3, ["a", "b", "c"])
    if nan is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(nan) and not name.startswith("clip."):
                    p.fill_(float("nan"))
    model.save_pretrained(path, metadata={"preprocess": preprocess} if preprocess else None)
    return path


# ----------------------------------------------------------------------------- the four kinds of path

def test_a_model_folder_loads_with_its_recorded_protocol(tmp_path, tiny_clip, video):
    folder = make_tiny_model_folder(tmp_path / "model", tiny_clip)
    loaded = load_model(folder, device="cpu", clip_dtype="fp32")
    assert isinstance(loaded, LoadedModel) and loaded.kind == "folder" and loaded.runtime == "pytorch"
    assert loaded.class_names == CLASS_NAMES and loaded.name == "model"
    assert loaded.preprocess == {**TINY_PREPROCESS, "num_frames": 8}
    [result] = loaded.predict([video], topk=2)
    assert result["views"] == 2 and [t["class"] for t in result["top"]][0] in CLASS_NAMES
    clips = engine_data.test_clips_of_file(video, loaded.preprocess, num_frames=8)
    with torch.no_grad():
        probs = loaded(clips).softmax(dim=1).mean(0)
    assert result["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_a_folder_without_a_recorded_protocol_predicts_at_the_clips_native_size(tmp_path, tiny_clip, video):
    loaded = load_model(small_clip_folder(tmp_path / "m", tiny_clip), device="cpu", clip_dtype="fp32")
    assert (loaded.preprocess["crop_size"], loaded.preprocess["test_scale"]) == (32, 32)
    assert loaded.preprocess["num_frames"] == 8
    clips = engine_data.test_clips_of_file(video, loaded.preprocess, num_frames=8)
    assert clips.shape[-2:] == (32, 32)
    assert loaded.predict([video])[0]["views"] == 3  # the paper's 3 views
    recorded = load_model(small_clip_folder(tmp_path / "r", tiny_clip, preprocess={"crop_size": 48,
                                                                                  "test_scale": 56}),
                          device="cpu", clip_dtype="fp32")
    assert (recorded.preprocess["crop_size"], recorded.preprocess["test_scale"]) == (48, 56)


def test_an_authors_checkpoint_loads_at_its_clips_size_and_asks_for_classes():
    bare = load_model(OFFICIAL, device="cpu", clip_dtype="fp32")
    assert bare.kind == "official" and bare.num_classes is None and bare.name == "official_checkpoint"
    with pytest.raises(ValueError, match="do not store class names"):
        bare.require_head()
    assert (bare.preprocess["crop_size"], bare.preprocess["test_scale"], bare.preprocess["num_frames"]) == (64, 64, 16)
    with pytest.raises(ValueError, match="text tower embeds 512"):  # the shipped vocabulary does not fit it
        load_model(OFFICIAL, classes="kinetics400", device="cpu", clip_dtype="fp32")


def test_the_tokenizer_is_returned_not_written_onto_the_clip(tmp_path, monkeypatch):
    from dist_video.clip_loaders import clip_from_openai_state_dict

    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "dist_video.assets.vocab"))
    clip = clip_from_openai_state_dict(torch.load(tiny_text_clip(tmp_path / "clip.pt")))
    torch.manual_seed(0)
    DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64, pooling_layers=1),
                   clip_dtype=torch.float32).save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", labels="a, b", device="cpu", clip_dtype="fp32")
    assert loaded.class_names == ["a", "b"] and loaded.tokenizer.vocab_size == 49408
    assert loaded.network.clip.tokenizer is None


def test_plain_clip_weights_load_as_the_frozen_mean_zero_shot_model(tmp_path, monkeypatch, video):
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "dist_video.assets.vocab"))
    weights = tiny_text_clip(tmp_path / "ViT-tiny.pt")
    loaded = load_model(weights, labels="juggling, archery", prompt="a video of {}.", device="cpu",
                        clip_dtype="fp32", num_frames=4)
    assert loaded.kind == "clip" and isinstance(loaded.network, FrozenMeanClassifier)
    assert loaded.class_names == ["juggling", "archery"] and loaded.preprocess["crop_size"] == 32
    top = loaded.predict([video], topk=2)[0]["top"]
    assert sorted(t["class"] for t in top) == ["archery", "juggling"]
    assert loaded.text_embedding("juggling").shape == (32,)
    with pytest.raises(ValueError, match="plain CLIP weights have no classes"):
        load_model(weights, device="cpu").require_head()


def test_a_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(tmp_path / "nothing")


def test_trust_checkpoint_is_passed_to_the_checkpoint_readers(monkeypatch, tmp_path):
    import dist_video.checkpoints as checkpoints
    import dist_video.clip_loaders as clip_loaders

    seen = []
    official, clip = checkpoints.load_official_checkpoint, clip_loaders.load_clip

    def official_spy(path, clip=None, **kwargs):
        seen.append(("official", kwargs["trust_checkpoint"]))
        return official(path, clip, **kwargs)

    def clip_spy(path, **kwargs):
        seen.append(("clip", kwargs["trust_checkpoint"]))
        return clip(path, **kwargs)

    monkeypatch.setattr(checkpoints, "load_official_checkpoint", official_spy)
    monkeypatch.setattr(clip_loaders, "load_clip", clip_spy)
    load_model(OFFICIAL, device="cpu", clip_dtype="fp32")
    load_model(OFFICIAL, device="cpu", clip_dtype="fp32", trust_checkpoint=True)
    load_model(tiny_text_clip(tmp_path / "clip.pt"), device="cpu", trust_checkpoint=True)
    assert seen == [("official", False), ("official", True), ("clip", True)]


@pytest.mark.slow
def test_an_exported_folder_loads_behind_the_same_interface(tmp_path, tiny_clip, video):
    from dist_video.export import export_onnx

    folder = small_clip_folder(tmp_path / "m", tiny_clip)
    export_onnx(folder, tmp_path / "onnx")
    record = json.loads((tmp_path / "onnx" / "preprocess.json").read_text())
    assert record["preprocess"]["crop_size"] == 32 and record["input"]["shape"][-2:] == [32, 32]
    exported = load_model(tmp_path / "onnx")
    assert exported.kind == "exported" and exported.runtime == "onnxruntime" and exported.network is None
    assert exported.class_names == ["a", "b", "c"] and exported.preprocess["crop_size"] == 32
    want = load_model(folder, device="cpu", clip_dtype="fp32").predict([video])[0]
    got = exported.predict([video])[0]
    assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
    for g, w in zip(got["top"], want["top"]):
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-4)
    with pytest.raises(ValueError, match="fixed class list"):
        load_model(tmp_path / "onnx", labels="x, y")
    assert exported.labels_refusal() is not None
    # evaluate goes through the same loader: the exported folder scores a dataset as the folder does
    from dist_video.config import load_config
    from dist_video.data.synthetic import make_synthetic
    from dist_video.engine.run import evaluate_model

    data = tmp_path / "data"
    make_synthetic(data, num_train=1, num_val=6, seed=0, size=32, num_frames=8, digits=[0],
                   motions=["left", "right", "approach"], workers=1)
    cfg = load_config(None, None, [f"data.root={data}", f"data.val={data / 'val.csv'}", "data.format=csv",
                                   f"data.classes={data / 'classes.txt'}", "data.crop_size=32", "data.test_scale=32",
                                   "data.num_views=1", "data.workers=0", "model.dist.num_frames=8",
                                   "train.device=cpu", "model.clip_dtype=fp32", f"output_dir={tmp_path / 'run'}"])
    scores = [evaluate_model(str(m), cfg, progress=False, output=str(tmp_path / f"eval-{m.name}"))
              for m in (folder, tmp_path / "onnx")]
    assert scores[0]["num_videos"] == scores[1]["num_videos"] == 6
    assert scores[0]["top1"] == scores[1]["top1"] and scores[0]["top5"] == scores[1]["top5"]


# ----------------------------------------------------------------------------- the command line

def test_every_command_is_one_table_entry_and_clip_is_declared_once():
    from dist_video import cli

    names = [c.name for c in cli.COMMANDS]
    assert names == ["demo", "train", "evaluate", "predict", "embed", "search", "info", "convert", "export", "serve",
                     "watch", "prepare", "scan", "kinetics710", "make-synthetic"]
    source = (SRC / "dist_video" / "cli.py").read_text()
    assert source.count('"--clip"') == 1 and source.count('"--device"') == 1
    parser = cli.build_parser()
    for name in ("predict", "embed", "search", "info", "convert", "export", "serve", "evaluate"):
        args = parser.parse_args([name, *{"search": ["d", "q", "--model", "m"], "convert": ["a", "b"],
                                          "info": [], "embed": ["m", "v", "--out", "o"],
                                          "export": ["m", "o"]}.get(name, ["m", "v"] if name == "predict"
                                                                   else ["m"]), "--trust-checkpoint"])
        assert args.trust_checkpoint is True and args.clip is None, name


def test_a_bug_inside_a_command_is_an_internal_error_on_one_line(monkeypatch, capsys, tmp_path):
    from dist_video import cli
    import dist_video.loading as loading

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loading, "load_model", broken)
    argv = ["predict", str(tmp_path / "m"), str(tmp_path / "v.mp4"), "--device", "cpu"]
    assert cli.main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["dist-video predict: internal error: ZeroDivisionError: a bug (run with --debug for the "
                   "traceback)"]
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", *argv])
    assert cli.main(["predict", str(tmp_path / "m"), "v.mp4", "--stride", "1"]) == 2  # usage errors stay 2


def nan_folder(tmp_path: Path, tiny_clip, prefix: str = "") -> Path:
    """A model folder whose weights (those named ``prefix...``; default all but the CLIP's) are NaN."""
    return small_clip_folder(tmp_path / f"nan{prefix}", tiny_clip, nan=prefix)


def test_non_finite_outputs_are_a_model_error_not_a_file_error(tmp_path, tiny_clip, video):
    loaded = load_model(nan_folder(tmp_path, tiny_clip, "head."), device="cpu", clip_dtype="fp32")
    with pytest.raises(NonFiniteOutputError, match="class probabilities are not finite"):
        loaded.predict([video])
    assert torch.isfinite(loaded.embed([video]).embeddings).all()  # the embeddings come before the head
    broken = load_model(nan_folder(tmp_path, tiny_clip), device="cpu", clip_dtype="fp32")
    with pytest.raises(NonFiniteOutputError, match="embeddings are not finite"):
        broken.embed([video])


def strict_json(constant: str):
    raise AssertionError(f"not valid JSON: a bare {constant}")


@pytest.mark.slow
def test_cli_nan_weights_give_one_line_naming_the_model_and_valid_json(tmp_path, tiny_clip, video):
    folder = nan_folder(tmp_path, tiny_clip)
    proc = cli("predict", str(folder), str(video), "--json", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    answer = json.loads(proc.stdout, parse_constant=strict_json)  # Python's json alone accepts a bare NaN
    assert answer["model"] == str(folder) and "not finite" in answer["error"]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"dist-video predict: error: {folder}: {answer['error']}"]
    assert "Traceback" not in proc.stderr
    plain = cli("predict", str(folder), str(video), "--device", "cpu", "--window", "1")
    assert plain.returncode == 1 and plain.stdout == "" and f"error: {folder}: " in plain.stderr
    embed = cli("embed", str(folder), str(video), "--out", str(tmp_path / "e"), "--quiet", "--device", "cpu")
    assert embed.returncode == 1 and [ln for ln in embed.stderr.splitlines() if ln.strip()] == [
        f"dist-video embed: error: {folder}: the model's embeddings are not finite (NaN or infinity): its weights "
        "are damaged or overflow in this precision"]


def test_window_and_stride_out_of_bounds_are_usage_errors_on_one_line(capsys):
    from dist_video import cli

    for flags in (["--window", "nan"], ["--window", "inf"], ["--window", "-1"], ["--window", "1", "--stride", "0"],
                  ["--window", "1", "--stride", "inf"]):
        assert cli.main(["predict", "m", "v.mp4", *flags]) == 2, flags
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("dist-video predict: error: --") and "finite positive" in err[0]
    assert cli.main(["embed", "m", "v.mp4", "--out", "o", "--window", "nan"]) == 2


def test_a_window_bound_error_from_the_timeline_is_that_files_one_line_error(tmp_path, tiny_clip, video,
                                                                             monkeypatch, capsys):
    from dist_video import cli
    from dist_video.engine import timeline

    def refuse(duration, window, stride=None, **kwargs):
        raise ValueError(f"window={window:g} s gives more than the limit of 3 windows")

    monkeypatch.setattr(timeline, "window_bounds", refuse)
    folder = small_clip_folder(tmp_path / "m", tiny_clip)
    assert cli.main(["predict", str(folder), str(video), "--window", "0.01", "--device", "cpu", "--json"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out) == [{"video": str(video), "error": "window=0.01 s gives more than the limit of 3 "
                                                                  "windows"}]
    assert [ln for ln in out.err.splitlines() if ln.strip()] == [
        f"dist-video predict: error: {video}: window=0.01 s gives more than the limit of 3 windows"]


def test_cli_refuses_an_untrusted_checkpoint_in_one_line_and_trust_checkpoint_loads_it(tmp_path, capsys):
    import argparse

    from dist_video import cli

    official = torch.load(OFFICIAL, weights_only=True)
    path = tmp_path / "with-config.pyth"
    torch.save({**official, "cfg": argparse.Namespace(lr=0.1)}, path)  # needs more than tensors to unpickle
    assert cli.main(["info", str(path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"dist-video info: error: {path}: ") and "--trust-checkpoint" in err[0]
    with pytest.warns(UserWarning, match="weights_only=False"):
        assert cli.main(["info", str(path), "--trust-checkpoint", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "dist"
