"""The command line wired to the library's newer pieces: class lists restricted to a head's
classes (``--classes kinetics400`` on a Kinetics-710 model), ``watch``, ``--compile`` and the
shared frame grid of ``embed --window``; each end to end on tiny synthetic data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from data_helpers import write_coded_video
from deploy_helpers import TINY_PREPROCESS

from dist_video import cli
from dist_video.label_maps import builtin_class_names

K710 = builtin_class_names("kinetics710")
K400 = builtin_class_names("kinetics400")


def dist_folder(path: Path, clip_factory, names: list[str], rows: torch.Tensor | None = None) -> Path:
    """A tiny DiST model folder (8 frames, alpha 2) with a linear head over ``names``: rows
    ``rows`` (weight | bias), else seeded random ones."""
    from dist_video import DiSTConfig, DiSTVideoModel

    torch.manual_seed(7)
    model = DiSTVideoModel(clip_factory(), DiSTConfig(num_frames=8, alpha=2, temporal_dim=16, integration_dim=64,
                                                      pooling_layers=2), clip_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.branch.named_parameters():
            p.normal_(mean=1.0 if name.endswith("ln.weight") else 0.0, std=0.05)
    model.set_linear_head(len(names), names)
    with torch.no_grad():
        if rows is None:
            rows = torch.cat([torch.randn(len(names), model.head.in_features) * 0.5, torch.randn(len(names), 1)], 1)
        model.head.weight.copy_(rows[:, :-1])
        model.head.bias.copy_(rows[:, -1])
    model.save_pretrained(path, metadata={"preprocess": {**TINY_PREPROCESS, "num_views": 1, "num_frames": 8}})
    return path


def head_rows(folder: Path) -> torch.Tensor:
    from dist_video import VideoClassifier

    model = VideoClassifier.from_pretrained(folder)
    return torch.cat([model.head.weight, model.head.bias[:, None]], 1).detach()


@pytest.fixture(scope="module")
def clip_video(tmp_path_factory) -> Path:
    return write_coded_video(tmp_path_factory.mktemp("wiring") / "v.mp4", 40, width=96, height=72, seed=1)


def run_json(capsys, argv: list[str]):
    assert cli.main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys, argv: list[str], status: int, *needles: str) -> str:
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dist-video {argv[0]}: error: "), lines
    assert all(n in lines[0] for n in needles), lines
    return lines[0]


# ----------------------------------------------------------------------------- --classes on a bigger head

def test_predict_classes_kinetics400_on_a_kinetics710_head_is_the_renormalised_columns(tiny_clip, tmp_path,
                                                                                       clip_video, capsys):
    folder = dist_folder(tmp_path / "k710", tiny_clip, K710)
    common = [str(folder), str(clip_video), "--device", "cpu", "--json"]
    full = run_json(capsys, ["predict", *common, "--topk", "710"])[0]
    probability = {t["class"]: t["probability"] for t in full["top"]}
    assert len(probability) == 710
    for builtin, names in (("kinetics400", K400), ("kinetics600", builtin_class_names("kinetics600"))):
        got = run_json(capsys, ["predict", *common, "--topk", "5", "--classes", builtin])[0]
        # the Kinetics-710 probabilities of these classes, renormalised over them (renamed ones included)
        from dist_video.label_maps import kinetics710_name
        total = sum(probability[kinetics710_name(n)] for n in names)
        want = sorted(((probability[kinetics710_name(n)] / total, n) for n in names), reverse=True)[:5]
        assert [t["class"] for t in got["top"]] == [n for _, n in want], builtin
        for t, (p, _) in zip(got["top"], want):
            assert t["probability"] == pytest.approx(p, rel=1e-3, abs=1e-6)
    # a file of names works as the built-in lists do, in its own order
    subset = tmp_path / "some.txt"
    subset.write_text("balloon blowing\nabseiling\ndrinking\n")
    got = run_json(capsys, ["predict", *common, "--classes", str(subset)])[0]
    assert sorted(t["class"] for t in got["top"]) == ["abseiling", "balloon blowing", "drinking"]
    assert sum(t["probability"] for t in got["top"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_classes_the_head_does_not_know_is_a_one_line_error(tiny_clip, tmp_path, clip_video, capsys):
    folder = dist_folder(tmp_path / "m", tiny_clip, ["abseiling", "archery", "yoga"])
    argv = ["predict", str(folder), str(clip_video), "--device", "cpu"]
    one_error_line(capsys, [*argv, "--classes", "kinetics400"], 2, str(folder), "'",
                   "not among the model's 3 classes")
    one_error_line(capsys, [*argv, "--classes", str(tmp_path / "nope.txt")], 2, "class-name list not found",
                   "kinetics710")


def test_evaluate_a_head_with_more_classes_scores_as_the_head_of_the_dataset_classes(tiny_clip, tmp_path, capsys):
    from dist_video.data.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic(data, num_train=1, num_val=6, seed=0, size=32, num_frames=8, digits=[0],
                   motions=["left", "right", "approach"], workers=1)
    names = (data / "classes.txt").read_text().split("\n")[:3]
    big = dist_folder(tmp_path / "big", tiny_clip, ["yoga", names[2], "surfing", names[0], names[1]])
    rows = head_rows(big)
    small = dist_folder(tmp_path / "small", tiny_clip, names, rows=rows[[3, 4, 1]])
    sets = [f"data.root={data}", f"data.val={data / 'val.csv'}", "data.format=csv",
            f"data.classes={data / 'classes.txt'}", "data.crop_size=64", "data.test_scale=64", "data.num_views=1",
            "data.workers=0", "model.dist.num_frames=8", "train.device=cpu", "model.clip_dtype=fp32"]
    args = [a for s in sets for a in ("--set", s)] + ["--no-progress"]
    scores = {}
    for folder in (big, small):
        out = tmp_path / f"eval-{folder.name}"
        assert cli.main(["evaluate", str(folder), *args, "--output", str(out)]) == 0
        scores[folder.name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        with open(out / "predictions.csv", newline="") as f:
            scores[folder.name + "-rows"] = [{k: v for k, v in r.items() if "prob" not in k} for r in csv.DictReader(f)]
    assert scores["big"]["num_videos"] == 6 and scores["big"] == scores["small"]
    assert scores["big-rows"] == scores["small-rows"] and len(scores["big-rows"]) == 6
    # --classes naming the dataset's classes (a file) gives the same; a list of another length is refused
    listed = tmp_path / "names.txt"
    listed.write_text("\n".join(names) + "\n")
    assert cli.main(["evaluate", str(big), *args, "--output", str(tmp_path / "e2"), "--classes", str(listed)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == scores["small"]
    one_error_line(capsys, ["evaluate", str(big), *args, "--output", str(tmp_path / "e3"), "--classes",
                            "kinetics400"], 2, "--classes has 400 names but the dataset has 3 classes")


# ----------------------------------------------------------------------------- watch

def test_watch_a_file_prints_the_windows_of_the_library_and_a_summary(tiny_clip, tmp_path, capsys):
    from deploy_helpers import CLASS_NAMES, make_tiny_model_folder

    from dist_video import load_model
    from dist_video.live import watch

    folder = make_tiny_model_folder(tmp_path / "m", tiny_clip)
    video = write_coded_video(tmp_path / "w.mp4", 60, width=96, height=64, fps=25)
    loaded = load_model(folder, device="cpu", clip_dtype="fp32")
    *want, _ = watch(loaded.inference(), str(video), window=1, stride=0.5, preprocess=loaded.preprocess, topk=3)
    argv = ["watch", str(folder), str(video), "--window", "1", "--stride", "0.5", "--topk", "3", "--device", "cpu",
            "--clip-dtype", "fp32"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    got = [json.loads(line) for line in captured.out.splitlines()]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert (g["start"], g["end"]) == (w["start"], w["end"]) and len(g["top"]) == 3
        assert [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]]
        assert [t["probability"] for t in g["top"]] == pytest.approx([t["probability"] for t in w["top"]], abs=1e-5)
    assert captured.err.strip().splitlines()[-1].startswith("3 windows, 0 skipped, latency median")
    # --classes restricts the head here too; --csv writes rows under a header
    two = tmp_path / "two.txt"
    two.write_text(f"{CLASS_NAMES[3]}\n{CLASS_NAMES[1]}\n")
    assert cli.main([*argv, "--classes", str(two), "--csv"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0][:7] == ["window", "start", "end", "latency", "skipped", "class_1", "probability_1"]
    assert len(rows) == 4 and all({r[5], r[7]} == {CLASS_NAMES[3], CLASS_NAMES[1]} for r in rows[1:])


def test_watch_bad_inputs_are_one_line_errors(tiny_clip, tmp_path, capsys):
    from deploy_helpers import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "m", tiny_clip)
    base = ["watch", str(folder)]
    missing = str(tmp_path / "missing.mp4")
    assert cli.main([*base, missing, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {missing}: ") and "no such file" in err[0], err
    one_error_line(capsys, [*base, missing, "--window", "0"], 2, "--window must be a finite positive number")
    one_error_line(capsys, [*base, missing, "--timeout", "nan"], 2, "--timeout must be a finite positive")
    one_error_line(capsys, ["watch", str(tmp_path / "nomodel"), missing], 2, "no model at")
    with pytest.raises(SystemExit) as usage:
        cli.main([*base, missing, "--reconnect", "-1"])
    assert usage.value.code == 2 and "must be at least 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --compile

@pytest.fixture
def compile_calls(monkeypatch) -> list:
    """``torch.compile`` recorded and made the identity (compiling itself is the slow test's)."""
    calls: list = []

    def record(target, *args, **kwargs):
        calls.append(target)
        return target

    monkeypatch.setattr(torch, "compile", record)
    return calls


def test_compile_flag_wraps_the_fused_model_of_predict_embed_and_evaluate(tiny_clip, tmp_path, clip_video, capsys,
                                                                          compile_calls):
    from deploy_helpers import make_tiny_model_folder

    from dist_video.fused import FusedDiSTModel
    from dist_video.data.synthetic import make_synthetic

    folder = make_tiny_model_folder(tmp_path / "m", tiny_clip)
    common = [str(folder), str(clip_video), "--device", "cpu", "--clip-dtype", "fp32"]
    eager = run_json(capsys, ["predict", *common, "--json"])
    assert compile_calls == []
    assert run_json(capsys, ["predict", *common, "--json", "--compile"]) == eager
    assert [type(c).__name__ for c in compile_calls] == ["method", "FusedDiSTModel"]
    assert isinstance(compile_calls[1], FusedDiSTModel) and compile_calls[0].__self__ is compile_calls[1]
    compile_calls.clear()
    assert cli.main(["embed", *common, "--out", str(tmp_path / "e"), "--quiet", "--compile"]) == 0
    assert compile_calls[0].__name__ == "encode_video" and isinstance(compile_calls[1], FusedDiSTModel)
    compile_calls.clear()
    data = tmp_path / "data"
    make_synthetic(data, num_train=1, num_val=2, seed=0, size=32, num_frames=8, digits=[0], motions=["left"],
                   workers=1)
    sets = [f"data.root={data}", f"data.val={data / 'val.csv'}", "data.format=csv", "data.crop_size=64",
            "data.test_scale=64", "data.num_views=1", "data.workers=0", "model.dist.num_frames=8",
            "train.device=cpu", "model.clip_dtype=fp32", "train.precision=fp32"]
    one = dist_folder(tmp_path / "one", tiny_clip, (data / "classes.txt").read_text().split("\n")[:1])
    args = ["evaluate", str(one), *[a for s in sets for a in ("--set", s)], "--no-progress"]
    assert cli.main([*args, "--output", str(tmp_path / "eager")]) == 0 and compile_calls == []
    assert cli.main([*args, "--output", str(tmp_path / "compiled"), "--compile"]) == 0
    assert len(compile_calls) == 1 and isinstance(compile_calls[0], FusedDiSTModel)
    eager_metrics, compiled_metrics = capsys.readouterr().out.strip().splitlines()[-2:]
    assert json.loads(compiled_metrics) == json.loads(eager_metrics) and json.loads(eager_metrics)["num_videos"] == 2


@pytest.mark.slow
def test_predict_compiled_gives_the_eager_probabilities(tiny_clip, tmp_path, clip_video, capsys):
    from deploy_helpers import make_tiny_model_folder

    torch._dynamo.reset()
    folder = make_tiny_model_folder(tmp_path / "m", tiny_clip)
    common = ["predict", str(folder), str(clip_video), "--device", "cpu", "--clip-dtype", "fp32", "--json"]
    eager = run_json(capsys, common)[0]
    compiled = run_json(capsys, [*common, "--compile"])[0]
    assert [t["class"] for t in compiled["top"]] == [t["class"] for t in eager["top"]]
    assert [t["probability"] for t in compiled["top"]] == pytest.approx([t["probability"] for t in eager["top"]],
                                                                          abs=1e-4)


# ----------------------------------------------------------------------------- embed --window

def test_embed_window_uses_the_shared_frame_grid(tiny_clip, tmp_path, capsys):
    from deploy_helpers import make_tiny_model_folder

    from dist_video import load_model
    from dist_video.engine.embed import read_embeddings
    from dist_video.engine.timeline import window_outputs

    folder = make_tiny_model_folder(tmp_path / "m", tiny_clip)
    video = write_coded_video(tmp_path / "long.mp4", 90, width=96, height=64, fps=25)
    out = tmp_path / "emb"
    assert cli.main(["embed", str(folder), str(video), "--window", "1.2", "--stride", "0.4", "--out", str(out),
                     "--device", "cpu", "--clip-dtype", "fp32", "--quiet"]) == 0
    got = read_embeddings(out)
    fused = load_model(folder, device="cpu", clip_dtype="fp32").inference()
    common = dict(num_frames=8, window=1.2, stride=0.4)
    with torch.no_grad():
        # each window run on its own, on the grid's frames
        bounds, grid, _, _ = window_outputs(fused.encode_video, video, fused_preprocess(folder), **common,
                                            model=fused, share=False)
        _, sampled, _, _ = window_outputs(fused.encode_video, video, fused_preprocess(folder), **common)
    assert [(r[1], r[2]) for r in got.rows] == [(round(a, 3), round(b, 3)) for a, b in bounds]
    assert len(bounds) == 7
    torch.testing.assert_close(got.embeddings, grid, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grid, sampled, atol=1e-3)  # the grid is not the sampler's frames: the test tells


def fused_preprocess(folder: Path) -> dict:
    from dist_video import load_model

    return load_model(folder, device="cpu", clip_dtype="fp32").preprocess
