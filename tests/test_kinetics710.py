"""Kinetics-710: the union builder on synthetic release folders, the shipped class lists and
label map, and label maps on models (head rows carried by class name, logits restricted to a
subset of classes), through to a tiny pre-train -> fine-tune run."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from dist_video.data.datasets import parse_kinetics
from dist_video.data.kinetics710 import build_kinetics710, format_report, label_map, read_release_annotations
from dist_video.label_maps import (KINETICS_RENAMES, builtin_class_names, class_index_map, class_key, init_from,
                                   kinetics710_name, knows_classes, restrict_classes)

K710 = builtin_class_names("kinetics710")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def video(path: Path) -> None:
    """The builder finds videos by name only: an empty file stands for one."""
    write(path, "")


@pytest.fixture
def releases(tmp_path) -> dict[str, Path]:
    """Three release folders shaped like the real ones (see the module's expected counts)."""
    k400, k600, k700 = tmp_path / "k400", tmp_path / "k600", tmp_path / "k700"
    # Kinetics-400: header with is_cc, annotations/ folder, unlabelled test file, an unknown class
    write(k400 / "annotations" / "train.csv", "label,youtube_id,time_start,time_end,split,is_cc\n"
          "abseiling,aaa,0,10,train,0\nballoon blowing,bbb,5,15,train,0\narchery,ccc,1,11,train,0\n"
          "not a kinetics class,zzz,0,10,train,0\n")
    write(k400 / "annotations" / "validate.csv", "label,youtube_id,time_start,time_end,split,is_cc\n"
          "abseiling,vvv,0,10,validate,0\narchery,www,0,10,validate,0\n")
    write(k400 / "annotations" / "test.csv", "youtube_id,time_start,time_end,split\nttt,0,10,test\n")
    # Kinetics-600: CSVs in the folder itself; a duplicate of a K400 clip, renamed classes,
    # a clip of K400's test split
    write(k600 / "train.csv", "label,youtube_id,time_start,time_end,split\nabseiling,aaa,0,10,train\n"
          "picking fruit,ppp,3,13,train\npassing american football (not in game),qqq,0,10,train\n"
          "air drumming,ttt,0,10,train\n")
    write(k600 / "validate.csv", "label,youtube_id,time_start,time_end,split\narchery,www,0,10,validate\n"
          "air drumming,uuu,2,12,validate\n")
    write(k600 / "test.csv", "youtube_id,time_start,time_end,split\nyyy,0,10,test\n")
    # Kinetics-700-2020 variant: no header, no split column (the file name says it), float times;
    # a K400 validation clip, a renamed class, a missing video and a bad row
    write(k700 / "annotations" / "kinetics700_2020_train.csv",
          "abseiling,vvv,0.0,10.0\n\"throwing ball (not baseball or American football)\",kkk,0.0,10.0\n"
          "acting in play,lll,0,10\nacting in play,mmm,0,10\nacting in play,nnn,abc,10\n")
    write(k700 / "annotations" / "kinetics700_2020_validate.csv", "acting in play,xxx,0,10\n")
    for stem in ("train/abseiling/aaa_000000_000010", "train/balloon blowing/bbb_000005_000015",
                 "train/archery/ccc_000001_000011", "val/vvv_000000_000010", "val/www_000000_000010"):
        video(k400 / f"{stem}.mp4")
    for stem in ("ppp_000003_000013", "qqq_000000_000010", "ttt_000000_000010", "uuu_000002_000012"):
        video(k600 / "videos" / "vol_00" / f"{stem}.mp4")
    video(k700 / "kkk.mkv")  # named by id only
    video(k700 / "lll_000000_000010.mp4")
    video(k700 / "xxx_000000_000010.webm")
    video(k700 / "aaa_000000_000010.mp4")  # also in the K400 folder, which is searched first
    return {"k400": k400, "k600": k600, "k700": k700}


def build(releases, out: Path, **kw) -> dict:
    return build_kinetics710(**releases, out=out, **kw)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_counts_are_exact(releases, tmp_path):
    report = build(releases, tmp_path / "k710")
    assert report["classes"] == 710
    files = {Path(p).relative_to(tmp_path).as_posix(): s for p, s in report["files"].items()}
    assert files["k400/annotations/train.csv"] == {"release": "kinetics400", "rows": 4, "bad_rows": 0,
                                                   "train": 4, "val": 0, "test": 0}
    assert files["k400/annotations/test.csv"] == {"release": "kinetics400", "rows": 1, "bad_rows": 0,
                                                  "train": 0, "val": 0, "test": 1}
    assert files["k600/validate.csv"] == {"release": "kinetics600", "rows": 2, "bad_rows": 0, "train": 0,
                                          "val": 2, "test": 0}
    assert files["k700/annotations/kinetics700_2020_train.csv"] == {"release": "kinetics700", "rows": 5,
                                                                    "bad_rows": 1, "train": 4, "val": 0, "test": 0}
    assert files["k700/annotations/kinetics700_2020_validate.csv"]["val"] == 1
    assert report["rows_read"] == 20 and len(report["files"]) == 8
    assert report["train"] == {"rows": 12, "unknown_label": 1, "duplicates_removed": 1, "label_conflicts": 0,
                               "in_validation_or_test_removed": 2, "missing_video": 1, "written": 7}
    assert report["val"] == {"rows": 5, "unknown_label": 0, "duplicates_removed": 1, "label_conflicts": 0,
                             "missing_video": 0, "written": 4}
    assert report["videos_found_in"] == {"kinetics400": 5, "kinetics600": 3, "kinetics700": 3}
    assert sum(report["class_counts"]["train"].values()) == 7
    assert report["class_counts"]["train"]["inflating balloons"] == 1
    assert report["class_counts"]["val"]["archery"] == 1 and len(report["class_counts"]["val"]) == 710
    assert format_report(report).splitlines() == [
        "710 classes, 20 rows read from 8 files (clips matched by youtube_id)",
        "train: 7 clips written (12 rows, 1 duplicates, 2 in a validation/test split, 1 unknown labels, "
        "1 missing videos)",
        "val: 4 clips written (5 rows, 1 duplicates, 0 unknown labels, 0 missing videos)"]


def test_train_and_val_csvs_read_back_with_k710_labels_and_no_validation_clip(releases, tmp_path):
    out = tmp_path / "k710"
    build(releases, out)
    train, val = read_rows(out / "train.csv"), read_rows(out / "val.csv")
    labels = {r["youtube_id"]: r["label"] for r in train}
    assert labels == {"aaa": "abseiling", "bbb": "inflating balloons", "ccc": "archery", "ppp": "picking apples",
                      "qqq": "passing American football (not in game)", "kkk": "throwing ball",
                      "lll": "acting in play"}
    assert {r["youtube_id"] for r in val} == {"vvv", "www", "uuu", "xxx"}
    held_out = {"vvv", "www", "uuu", "xxx", "ttt", "yyy"}  # every release's validation and test ids
    assert not held_out & set(labels)
    assert [r["label"] for r in read_rows(out / "missing.csv")] == ["acting in play"]
    names = (out / "classes.txt").read_text().splitlines()
    assert names == K710
    ann = parse_kinetics(out / "train.csv", out / "videos", class_names=names)
    got = {Path(r.path).name: names[r.label] for r in ann.records}
    assert got["bbb_000005_000015.mp4"] == "inflating balloons" and got["kkk_000000_000010.mkv"] == "throwing ball"
    assert len(ann.records) == 7
    # the search order: the K400 folder first, then K600, then K700
    assert Path(os.readlink(out / "videos" / "aaa_000000_000010.mp4")).is_relative_to(releases["k400"].resolve())
    assert Path(os.readlink(out / "videos" / "kkk_000000_000010.mkv")).name == "kkk.mkv"
    assert len(parse_kinetics(out / "val.csv", out / "videos", class_names=names).records) == 4


def test_segment_matching_keeps_other_segments_of_a_held_out_video(releases, tmp_path):
    write(releases["k700"] / "annotations" / "kinetics700_2020_train.csv",
          "abseiling,vvv,20.0,30.0\nacting in play,lll,0,10\n")
    by_id = build(releases, tmp_path / "by_id")
    by_segment = build(releases, tmp_path / "by_segment", match_by="segment")
    assert by_id["train"]["in_validation_or_test_removed"] == 2  # ttt (K400 test), vvv (K400 validation)
    assert by_segment["train"]["in_validation_or_test_removed"] == 1  # ttt only: vvv 20-30 is another clip
    with pytest.raises(ValueError, match="match_by"):
        build(releases, tmp_path / "x", match_by="url")


def test_rerun_is_byte_identical(releases, tmp_path):
    out = tmp_path / "k710"
    build(releases, out)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    links = {p.name: os.readlink(p) for p in (out / "videos").iterdir()}
    build(releases, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first
    assert {p.name: os.readlink(p) for p in (out / "videos").iterdir()} == links
    assert set(first) == {"train.csv", "val.csv", "classes.txt", "label_map.json", "report.json", "missing.csv"}


def test_without_videos_every_labelled_row_is_kept(releases, tmp_path):
    report = build(releases, tmp_path / "k710", find_videos=False)
    assert report["train"]["written"] == 8 and report["train"]["missing_video"] == 0
    assert not (tmp_path / "k710" / "videos").exists()


def test_bad_rows_are_counted_not_fatal(tmp_path):
    path = write(tmp_path / "validate.csv", "label,youtube_id,time_start,time_end,split\nabseiling,a,0,10,val\n"
                 "abseiling,b,x,10,val\nabseiling,c,0,10,somewhere\n,,,,\n")
    clips, stats = read_release_annotations(path, "kinetics400")
    assert [c.youtube_id for c in clips] == ["a"] and stats["bad_rows"] == 2 and stats["val"] == 1


def test_shipped_class_lists_and_label_map_agree_both_ways():
    lists = {r: builtin_class_names(r) for r in ("kinetics400", "kinetics600", "kinetics700", "kinetics710")}
    assert {r: len(set(map(class_key, n))) for r, n in lists.items()} == \
        {"kinetics400": 400, "kinetics600": 600, "kinetics700": 700, "kinetics710": 710}
    mapping = label_map(K710)
    assert mapping["num_classes"] == 710
    reached = set()
    for release, entry in mapping["releases"].items():
        own = lists[release]
        assert entry["num_classes"] == len(own) and None not in entry["to_kinetics710"]
        assert len(set(entry["to_kinetics710"])) == len(own)  # no two classes of a release merge
        for i, name in enumerate(own):  # forward: the release's name, renamed, is the K710 name
            assert class_key(K710[entry["to_kinetics710"][i]]) == class_key(kinetics710_name(name))
        for old, new in entry["renamed"].items():  # every rename is of a name the release uses
            assert old in own and new in K710 and old not in K710
        reached |= set(entry["to_kinetics710"])
    assert reached == set(range(710))  # backward: every K710 class is some release's class
    assert K710[:400] == [kinetics710_name(n) for n in lists["kinetics400"]]  # UniFormerV2's order
    assert sum(map(len, KINETICS_RENAMES.values())) == 16


# ----------------------------------------------------------------------------- models

def tiny_model(tiny_clip, names, *, head="linear", seed=0, temporal_dim=16):
    from dist_video import DiSTConfig, DiSTVideoModel

    torch.manual_seed(seed)
    model = DiSTVideoModel(tiny_clip(width=64, layers=2), DiSTConfig(num_frames=4, alpha=2, temporal_dim=temporal_dim,
                                                                     integration_dim=64), clip_dtype="fp32")
    with torch.no_grad():
        for p in model.branch.parameters():
            p.normal_(std=0.05)
    if head == "linear":
        model.set_linear_head(len(names), names)
        with torch.no_grad():
            model.head.weight.normal_()
            model.head.bias.normal_()
    else:
        model.set_class_embeddings(torch.randn(len(names), model.clip.embed_dim), names)
    return model.eval()


K710_SOME = [K710[i] for i in (0, 3, 12, 100, 357, 400, 500, 709)]  # 12: inflating balloons, 100: sipping cup
K400_SOME = ["drinking", "abseiling", "balloon blowing", "throwing ball", "applauding"]


@pytest.mark.parametrize("head", ["linear", "text"])
def test_restricted_logits_are_the_columns_of_those_classes(tiny_clip, head):
    model = tiny_model(tiny_clip, K710_SOME, head=head)
    assert knows_classes(model, K400_SOME) and not knows_classes(model, K400_SOME + ["yoga"])
    video = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        full = model(video)
        restricted = restrict_classes(model, K400_SOME)(video)
    columns = class_index_map(K710_SOME, K400_SOME)
    assert columns == [3, 0, 2, 4, 1]
    torch.testing.assert_close(restricted, full[:, columns], rtol=0, atol=1e-6)
    assert model.class_names == K400_SOME and model.num_classes == 5
    with pytest.raises(ValueError, match="'yoga'"):
        restrict_classes(model, ["yoga"])


def test_init_from_carries_weights_and_head_rows_by_name(tiny_clip, tmp_path):
    source = tiny_model(tiny_clip, K710_SOME, seed=1)
    source.save_pretrained(tmp_path / "k710")
    target = tiny_model(tiny_clip, K400_SOME + ["yoga"], seed=2)
    fresh_yoga = target.head.weight[-1].clone()
    init_from(target, tmp_path / "k710")
    for k, v in source.branch.state_dict().items():
        torch.testing.assert_close(target.branch.state_dict()[k], v, rtol=0, atol=0)
    for t, s in enumerate([3, 0, 2, 4, 1]):
        torch.testing.assert_close(target.head.weight[t], source.head.weight[s], rtol=0, atol=0)
        torch.testing.assert_close(target.head.bias[t], source.head.bias[s], rtol=0, atol=0)
    torch.testing.assert_close(target.head.weight[-1], fresh_yoga)  # not in the source: as initialised


def test_init_from_text_head_keeps_the_new_names_embeddings(tiny_clip, tmp_path):
    tiny_model(tiny_clip, K710_SOME, head="text", seed=1).save_pretrained(tmp_path / "k710")
    target = tiny_model(tiny_clip, K400_SOME, head="text", seed=2)
    own = target.class_embeddings.clone()
    init_from(target, tmp_path / "k710")
    torch.testing.assert_close(target.class_embeddings, own, rtol=0, atol=0)


def test_init_from_an_authors_checkpoint_takes_its_branch_and_a_fresh_head():
    """``model.init_from`` also takes the authors' ``.pyth`` (e.g. their Kinetics-710 model): the
    branch's weights come from it; it has no class names or head, so a linear head starts fresh."""
    from dist_video import DiSTVideoModel, load_official_checkpoint

    pyth = Path(__file__).parent / "assets" / "official-tiny" / "official_checkpoint.pyth"
    source = load_official_checkpoint(pyth, clip_dtype=torch.float32)
    torch.manual_seed(3)
    target = DiSTVideoModel(source.clip, source.config, clip_dtype=torch.float32)
    target.set_linear_head(len(K400_SOME), K400_SOME)
    fresh_head = target.head.weight.clone()
    before = target.branch.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in source.branch.state_dict().items())  # a fresh branch
    init_from(target, pyth)
    for k, v in source.branch.state_dict().items():
        torch.testing.assert_close(target.branch.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(target.head.weight, fresh_head, rtol=0, atol=0)


def test_init_from_a_model_of_another_size_names_the_weight(tiny_clip, tmp_path):
    tiny_model(tiny_clip, K710_SOME, temporal_dim=32).save_pretrained(tmp_path / "k710")
    with pytest.raises(ValueError, match=r"model.init_from's branch\.\S+ is \(.*the model's"):
        init_from(tiny_model(tiny_clip, K400_SOME), tmp_path / "k710")


def test_init_and_init_from_exclude_each_other():
    from dist_video.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="not both"):
        load_config(overrides=["model.init=a", "model.init_from=b"])
    assert load_config("k400-vit-l14-32+64f-from-k710").model.init_from == "runs/k710-vit-l14-32+64f/model"


# ----------------------------------------------------------------------------- end to end

def relabel(data: Path, out: Path, names: dict[str, str]) -> None:
    """A copy of the synthetic CSV dataset's annotations with classes renamed (and dropped
    where ``names`` has none), pointing at the same videos."""
    out.mkdir(parents=True, exist_ok=True)
    classes = [c for c in (data / "classes.txt").read_text().splitlines() if c in names]
    (out / "classes.txt").write_text("".join(f"{names[c]}\n" for c in classes))
    for split in ("train", "val"):
        rows = [ln.rsplit(",", 1) for ln in (data / f"{split}.csv").read_text().splitlines() if ln.strip()]
        text = "".join(f"{data / p},{names[label]}\n" for p, label in rows if label in names)
        (out / f"{split}.csv").write_text(text)


@pytest.mark.slow
def test_k710_pretrain_then_k400_run_from_it(tmp_path):
    from safetensors.torch import load_file

    from dist_video.classifier import VideoClassifier
    from dist_video.config import load_config
    from dist_video.data.synthetic import make_synthetic
    from dist_video.engine.train import train

    from data_helpers import tiny_run_args

    data = tmp_path / "synthetic"
    make_synthetic(data, num_train=24, num_val=12, seed=0, size=32, num_frames=8, workers=1)
    synthetic = (data / "classes.txt").read_text().splitlines()
    k710 = dict(zip(synthetic, [K710[i] for i in (12, 0, 100, 3, 357, 5, 6, 7, 8, 9, 10, 11)]))
    k400 = dict(zip(synthetic, ["balloon blowing", "abseiling", "drinking", "applauding", "throwing ball"]))
    relabel(data, tmp_path / "k710-data", k710)
    relabel(data, tmp_path / "k400-data", k400)

    def run(folder: Path, out: Path, *extra: str):
        args = tiny_run_args(folder, out, f"data.classes={folder / 'classes.txt'}",
                             f"data.train={folder / 'train.csv'}", f"data.val={folder / 'val.csv'}",
                             "optim.epochs=1", *extra)
        sets = [args[i + 1] for i in range(len(args)) if args[i] == "--set"]
        return train(load_config(overrides=[*sets, f"output_dir={out}"]), resume=False, progress=False)

    run(tmp_path / "k710-data", tmp_path / "k710-run")
    run(tmp_path / "k400-data", tmp_path / "k400-run", f"model.init_from={tmp_path / 'k710-run' / 'model'}",
        "optim.lr=0", "optim.warmup_start_lr=0", "optim.min_lr=0", "optim.weight_decay=0")
    pre, fine = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("k710-run", "k400-run"))
    k710_names = (tmp_path / "k710-data" / "classes.txt").read_text().splitlines()
    k400_names = (tmp_path / "k400-data" / "classes.txt").read_text().splitlines()
    rows = class_index_map(k710_names, k400_names)
    assert None not in rows and rows == [k710_names.index(kinetics710_name(n)) for n in k400_names]
    torch.testing.assert_close(fine["head.weight"], pre["head.weight"][rows], rtol=0, atol=0)
    torch.testing.assert_close(fine["head.bias"], pre["head.bias"][rows], rtol=0, atol=0)
    assert all(torch.equal(fine[k], v) for k, v in pre.items() if not k.startswith("head."))

    model = VideoClassifier.from_pretrained(tmp_path / "k710-run" / "model", clip_dtype="fp32").eval()
    video = torch.randn(2, 3, model.config.num_frames, 32, 32)
    with torch.no_grad():
        full = model(video)
        restricted = restrict_classes(model, k400_names)(video)
    torch.testing.assert_close(restricted, full[:, rows], rtol=0, atol=1e-6)


def test_kinetics710_command_builds_the_union_and_prints_the_report(releases, tmp_path, capsys):
    from dist_video import cli

    out = tmp_path / "k710-cli"
    argv = ["kinetics710", *[a for r in ("k400", "k600", "k700") for a in (f"--{r}", str(releases[r]))],
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == format_report(build(releases, tmp_path / "k710-api")).splitlines()
    assert (out / "train.csv").read_bytes() == (tmp_path / "k710-api" / "train.csv").read_bytes()
    assert len(list((out / "videos").iterdir())) == 11
    assert cli.main([*argv[:-1], str(tmp_path / "by-segment"), "--match-by", "segment", "--no-links"]) == 0
    assert "matched by segment" in capsys.readouterr().out and not (tmp_path / "by-segment" / "videos").exists()
    assert cli.main([*argv[:-1], str(tmp_path / "no-videos"), "--no-videos"]) == 0
    assert json.loads((tmp_path / "no-videos" / "report.json").read_text())["videos_found_in"] is None
    capsys.readouterr()
    # a release folder that does not exist: one line, exit 2; a missing option: usage, exit 2
    assert cli.main([*argv[:2], str(tmp_path / "nowhere"), *argv[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"dist-video kinetics710: error: {tmp_path / 'nowhere'}: the kinetics400 " \
                                       "folder does not exist"
    with pytest.raises(SystemExit) as usage:
        cli.main(["kinetics710", "--k400", "a", "--out", "o"])
    assert usage.value.code == 2
