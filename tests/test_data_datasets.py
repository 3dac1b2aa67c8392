"""Annotation parsers (official formats written here in miniature) and the clip dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dist_video.data import (AnnotationError, MissingVideosError, SegmentSampler, TestTransform, TrainTransform,
                             VideoClipDataset, VideoDecodeError, average_views, load_annotations, load_test_clips,
                             parse_csv, parse_folder, parse_hmdb51, parse_kinetics, parse_ssv2, parse_ucf101,
                             read_class_list, write_bad_videos)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")
    return path


# ----------------------------------------------------------------------------- Kinetics

KINETICS_CSV = """label,youtube_id,time_start,time_end,split,is_cc
abseiling,--07WQ2iBlw,1,11,train,0
air drumming,-0B1UOWJl1Y,14,24,train,0
"passing American football (in game)",-0X3Tz5jwNg,0,10,train,0
abseiling,-3B32lodo2M,59,69,train,0
air drumming,zz1ozZqzHkA,30,40,val,0
"""


def kinetics_tree(tmp_path: Path) -> Path:
    root = tmp_path / "kinetics"
    touch(root / "train" / "abseiling" / "--07WQ2iBlw_000001_000011.mp4")
    touch(root / "train" / "air_drumming" / "-0B1UOWJl1Y_000014_000024.mp4")   # underscores in folder
    touch(root / "-0X3Tz5jwNg_000000_000010.mp4")                              # flat layout
    touch(root / "train" / "abseiling" / "-3B32lodo2M.mkv")                     # id only, other container
    touch(root / "val" / "zz1ozZqzHkA_000030_000040.mp4")
    (tmp_path / "train.csv").write_text(KINETICS_CSV)
    return root


def test_kinetics_layouts_split_and_class_names(tmp_path):
    root = kinetics_tree(tmp_path)
    records, names = parse_kinetics(tmp_path / "train.csv", root, split="train")
    assert names == ["abseiling", "air drumming", "passing American football (in game)"]
    assert [(Path(r.path).name, r.label) for r in records] == [
        ("--07WQ2iBlw_000001_000011.mp4", 0), ("-0B1UOWJl1Y_000014_000024.mp4", 1),
        ("-0X3Tz5jwNg_000000_000010.mp4", 2), ("-3B32lodo2M.mkv", 0)]
    val, _ = parse_kinetics(tmp_path / "train.csv", root, split="validate", class_names=names)
    assert [(Path(r.path).name, r.label) for r in val] == [("zz1ozZqzHkA_000030_000040.mp4", 1)]


def test_kinetics_unknown_label_names_file_line_and_closest(tmp_path):
    root = kinetics_tree(tmp_path)
    with pytest.raises(AnnotationError) as err:
        parse_kinetics(tmp_path / "train.csv", root, class_names=["abseiling", "air drumming", "archery"])
    message = str(err.value)
    assert "train.csv" in message and "line 4" in message
    assert "'passing American football (in game)'" in message and "closest known label" in message


def test_kinetics_missing_videos_reported_all_at_once(tmp_path):
    root = kinetics_tree(tmp_path)
    os.remove(root / "train" / "abseiling" / "--07WQ2iBlw_000001_000011.mp4")
    os.remove(root / "-0X3Tz5jwNg_000000_000010.mp4")
    with pytest.raises(MissingVideosError) as err:
        parse_kinetics(tmp_path / "train.csv", root, split="train")
    assert "2 of 4" in str(err.value)
    assert "--07WQ2iBlw_000001_000011" in str(err.value) and "-0X3Tz5jwNg_000000_000010" in str(err.value)
    assert len(err.value.missing) == 2
    with pytest.warns(RuntimeWarning, match="2 of 4"):
        records, _ = parse_kinetics(tmp_path / "train.csv", root, split="train", on_missing="skip")
    assert len(records) == 2


def test_empty_split_is_an_error(tmp_path):
    root = kinetics_tree(tmp_path)
    with pytest.raises(AnnotationError, match="no videos in split 'test'"):
        parse_kinetics(tmp_path / "train.csv", root, split="test")


# ----------------------------------------------------------------------------- SSv2

def ssv2_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    labels = {"Approaching something with your camera": "0", "Pushing something from left to right": "1",
              "Pushing something from right to left": "2", "Putting something into something": "3"}
    train = [{"id": "78687", "label": "pushing a cup from left to right",
              "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
             {"id": "42326", "label": "putting a pen into a box", "template": "Putting [something] into [something]",
              "placeholders": ["a pen", "a box"]},
             {"id": "100", "label": "approaching a chair with your camera",
              "template": "Approaching [something] with your camera", "placeholders": ["a chair"]}]
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps(labels))
    (tmp_path / "something-something-v2-train.json").write_text(json.dumps(train))
    root = tmp_path / "20bn-something-something-v2"
    for entry in train:
        touch(root / f"{entry['id']}.webm")
    return tmp_path / "something-something-v2-labels.json", tmp_path / "something-something-v2-train.json", root


def test_ssv2_templates_and_paths(tmp_path):
    labels, train, root = ssv2_files(tmp_path)
    records, names = parse_ssv2(labels, train, root)
    assert names[1] == "Pushing something from left to right" and len(names) == 4
    assert [(Path(r.path).name, r.label) for r in records] == [("78687.webm", 1), ("42326.webm", 3), ("100.webm", 0)]
    via = load_annotations("ssv2", train, root=root, classes=labels)
    assert via.records == records


def test_ssv2_unknown_template(tmp_path):
    labels, train, root = ssv2_files(tmp_path)
    entries = json.loads(train.read_text())
    entries[1]["template"] = "Putting [something] in to [something]"
    train.write_text(json.dumps(entries))
    with pytest.raises(AnnotationError) as err:
        parse_ssv2(labels, train, root)
    assert "entry 1 (id 42326)" in str(err.value) and "'Putting something into something'" in str(err.value)


# ----------------------------------------------------------------------------- UCF101 / HMDB51

def ucf_files(tmp_path: Path) -> tuple[Path, Path]:
    splits = tmp_path / "ucfTrainTestlist"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    (splits / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
        "YoYo/v_YoYo_g08_c02.avi 3\n")
    (splits / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nYoYo/v_YoYo_g01_c01.avi\n")
    root = tmp_path / "UCF-101"
    for line in ((splits / "trainlist01.txt").read_text() + (splits / "testlist01.txt").read_text()).splitlines():
        touch(root / line.split()[0])
    return splits, root


def test_ucf101_splits(tmp_path):
    splits, root = ucf_files(tmp_path)
    train, names = parse_ucf101(splits, root, split="train", fold=1)
    assert names == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
    assert [r.label for r in train] == [0, 1, 2]
    test, _ = parse_ucf101(splits, root, split="test", fold=1)
    assert [(Path(r.path).name, r.label) for r in test] == [("v_ApplyEyeMakeup_g01_c01.avi", 0),
                                                           ("v_YoYo_g01_c01.avi", 2)]


def test_ucf101_label_disagreeing_with_folder(tmp_path):
    splits, root = ucf_files(tmp_path)
    (splits / "trainlist01.txt").write_text("YoYo/v_YoYo_g08_c02.avi 1\n")
    with pytest.raises(AnnotationError, match="line 1: folder 'YoYo' is class 3"):
        parse_ucf101(splits, root, split="train")
    (splits / "testlist01.txt").write_text("YoYoo/v_YoYo_g01_c01.avi\n")
    with pytest.raises(AnnotationError, match="unknown label 'YoYoo'; closest known label: 'YoYo'"):
        parse_ucf101(splits, root, split="test")


def test_hmdb51_splits(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (splits / "ride_bike_test_split1.txt").write_text("d.avi 2 \ne.avi 1 \n")
    (splits / "ride_bike_test_split2.txt").write_text("d.avi 1 \ne.avi 2 \n")
    root = tmp_path / "hmdb51"
    for cls, name in [("brush_hair", "a.avi"), ("brush_hair", "b.avi"), ("brush_hair", "c.avi"),
                      ("ride_bike", "d.avi"), ("ride_bike", "e.avi")]:
        touch(root / cls / name)
    train, names = parse_hmdb51(splits, root, split="train", fold=1)
    assert names == ["brush hair", "ride bike"]
    assert [(Path(r.path).name, r.label) for r in train] == [("a.avi", 0), ("e.avi", 1)]
    test, _ = parse_hmdb51(splits, root, split="test", fold=1)
    assert [(Path(r.path).name, r.label) for r in test] == [("b.avi", 0), ("d.avi", 1)]


# ----------------------------------------------------------------------------- generic

def test_csv_names_indices_header_and_tsv(tmp_path):
    for name in ["a.mp4", "b.mp4", "sub/c.mp4"]:
        touch(tmp_path / name)
    (tmp_path / "named.csv").write_text("path,label\na.mp4,jumping_jacks\nb.mp4,push up\n"
                                        "# comment\nsub/c.mp4,Push up\n")
    records, names = parse_csv(tmp_path / "named.csv")
    assert names == ["jumping jacks", "push up"]
    assert [r.label for r in records] == [0, 1, 1]
    assert records[2].path == str(tmp_path / "sub/c.mp4")
    (tmp_path / "classes.txt").write_text("push up\njumping jacks\n")
    (tmp_path / "indexed.tsv").write_text("a.mp4\t1\nb.mp4\t0\n")
    records, names = parse_csv(tmp_path / "indexed.tsv", classes=tmp_path / "classes.txt")
    assert names == ["push up", "jumping jacks"] and [r.label for r in records] == [1, 0]
    (tmp_path / "spaces.txt").write_text("a.mp4 1\nb.mp4 0\n")
    assert [r.label for r in parse_csv(tmp_path / "spaces.txt").records] == [1, 0]


def test_csv_errors(tmp_path):
    touch(tmp_path / "a.mp4")
    (tmp_path / "classes.txt").write_text("push up\njumping jacks\n")
    (tmp_path / "bad.csv").write_text("a.mp4,push up\na.mp4,jumping jack\n")
    with pytest.raises(AnnotationError) as err:
        parse_csv(tmp_path / "bad.csv", classes=tmp_path / "classes.txt")
    assert "bad.csv, line 2: unknown label 'jumping jack'; closest known label: 'jumping jacks'" in str(err.value)
    (tmp_path / "range.csv").write_text("a.mp4,7\n")
    with pytest.raises(AnnotationError, match="class index 7 is out of range for 2 classes"):
        parse_csv(tmp_path / "range.csv", classes=tmp_path / "classes.txt")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(AnnotationError, match="no videos"):
        parse_csv(tmp_path / "empty.csv")
    (tmp_path / "missing.csv").write_text("x.mp4,push up\ny.mp4,push up\na.mp4,push up\nz.mp4,push up\n")
    with pytest.raises(MissingVideosError) as err:
        parse_csv(tmp_path / "missing.csv")
    assert "3 of 4" in str(err.value) and all(n in str(err.value) for n in ("x.mp4", "y.mp4", "z.mp4"))


def test_folder_per_class_and_class_lists(tmp_path):
    touch(tmp_path / "videos" / "jumping_jacks" / "1.mp4")
    touch(tmp_path / "videos" / "jumping_jacks" / "notes.txt")
    touch(tmp_path / "videos" / "push_up" / "deeper" / "2.webm")
    records, names = parse_folder(tmp_path / "videos")
    assert names == ["jumping jacks", "push up"]
    assert [(Path(r.path).name, r.label) for r in records] == [("1.mp4", 0), ("2.webm", 1)]
    (tmp_path / "classInd.txt").write_text("1 Jump\n2 Push\n")
    (tmp_path / "labels.json").write_text(json.dumps({"b": "1", "a": "0"}))
    assert read_class_list(tmp_path / "classInd.txt") == ["Jump", "Push"]
    assert read_class_list(tmp_path / "labels.json") == ["a", "b"]


# ----------------------------------------------------------------------------- the dataset

@pytest.fixture(scope="module")
def synthetic(synthetic_videos):
    return synthetic_videos(12, 4, seed=3, num_frames=12)


def test_training_items_are_reproducible_per_epoch(synthetic):
    records, names = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")
    ds = VideoClipDataset(records, sampler=SegmentSampler(8), transform=TrainTransform(crop_size=24),
                          training=True, class_names=names, seed=1)
    item = ds[5]
    assert tuple(item["video"].shape) == (3, 8, 24, 24) and item["video"].dtype == torch.uint8
    assert tuple(item["colour"].shape) == (3, 4) and item["colour"].dtype == torch.float32
    assert item["label"] == records[5].label and item["index"] == 5
    assert torch.equal(ds[5]["video"], item["video"]) and torch.equal(ds[5]["colour"], item["colour"])
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["video"], item["video"])


def test_test_items_enumerate_views_and_crops(synthetic):
    records, _ = parse_csv(synthetic / "val.csv", classes=synthetic / "classes.txt")
    ds = VideoClipDataset(records, sampler=SegmentSampler(4), training=False, num_views=3, num_crops=3,
                          transform=TestTransform(crop_size=16, short_side=16, num_crops=3))
    assert len(ds) == len(records) * 9
    assert ds.locate(13) == (1, 1, 1)
    items = [ds[i] for i in range(9)]
    assert [(it["index"], it["view"], it["crop"]) for it in items] == [(0, v, c) for v in range(3) for c in range(3)]
    assert not torch.equal(items[0]["video"], items[3]["video"])  # another temporal view
    clips = load_test_clips(records[0].path, sampler=SegmentSampler(4), num_views=3, num_crops=3,
                            transform=TestTransform(crop_size=16, short_side=16, num_crops=3))
    assert tuple(clips.shape) == (9, 3, 4, 16, 16)
    assert items[4]["video"].dtype == torch.uint8 and "colour" not in items[4]
    assert torch.equal(clips[4], ds.transform.normalize(items[4]["video"][None])[0])


def test_average_views():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 1.0]])
    videos, mean = average_views(scores, [7, 2, 7, 2])
    assert videos.tolist() == [2, 7]
    assert torch.allclose(mean, torch.tensor([[0.5, 1.0], [0.75, 0.25]]))


def _with_bad_files(synthetic: Path, tmp_path: Path):
    records, names = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")
    bad = [tmp_path / "empty.mp4", tmp_path / "text.mp4", tmp_path / "cut.mp4"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not a video")
    bad[2].write_bytes(Path(records[0].path).read_bytes()[:300])
    from dist_video.data import VideoRecord
    return records + [VideoRecord(str(p), 0) for p in bad], names, [str(p) for p in bad]


def test_skip_policy_over_an_epoch_with_two_workers(synthetic, tmp_path):
    records, names, bad = _with_bad_files(synthetic, tmp_path)
    ds = VideoClipDataset(records, sampler=SegmentSampler(4), transform=TrainTransform(crop_size=16),
                          training=True, on_error="skip", bad_files_dir=tmp_path / "bad", seed=0)
    loader = DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    seen = []
    for batch in loader:
        assert batch["video"].shape[1:] == (3, 4, 16, 16) and batch["video"].dtype == torch.uint8
        assert torch.isfinite(ds.transform.normalize(batch["video"], batch["colour"])).all()
        seen += batch["index"].tolist()
    assert len(seen) == len(records)
    assert not set(seen) & {len(records) - 3, len(records) - 2, len(records) - 1}  # bad ones replaced
    assert set(ds.bad_videos()) == set(bad)
    assert ds.num_skipped >= 3
    report = write_bad_videos(ds, tmp_path / "run", epoch=0)
    lines = report.read_text().splitlines()
    assert lines[0].startswith("# 3 unreadable videos were skipped up to the end of epoch 0")
    assert sorted(line.split("\t")[0] for line in lines[1:]) == sorted(bad)
    assert any("empty file" in line for line in lines[1:])
    # the replacements are deterministic
    again = VideoClipDataset(records, sampler=SegmentSampler(4), transform=TrainTransform(crop_size=16),
                             training=True, on_error="skip", bad_files_dir=tmp_path / "bad2", seed=0)
    assert [again[i]["index"] for i in range(len(records))] == seen


def test_error_policy_raises_with_the_path(synthetic, tmp_path):
    records, names, bad = _with_bad_files(synthetic, tmp_path)
    ds = VideoClipDataset(records, sampler=SegmentSampler(4), transform=TrainTransform(crop_size=16),
                          training=True, on_error="error")
    with pytest.raises(VideoDecodeError, match="empty file"):
        ds[len(records) - 3]
    assert write_bad_videos(ds, tmp_path / "run") is None


def test_preloaded_clips_equal_clips_read_from_the_files(synthetic):
    records, names = parse_csv(synthetic / "train.csv", classes=synthetic / "classes.txt")

    def train_set():
        return VideoClipDataset(records, sampler=SegmentSampler(8), transform=TrainTransform(crop_size=24),
                                training=True, class_names=names, seed=4)

    from_files, preloaded = train_set(), train_set()
    kept = preloaded.preload()
    assert kept == sum(12 * 32 * 32 * 3 for _ in records)  # every frame of every video, uint8
    for epoch in (0, 1):
        from_files.set_epoch(epoch)
        preloaded.set_epoch(epoch)
        for i in range(len(records)):
            assert torch.equal(from_files[i]["video"], preloaded[i]["video"])
            assert torch.equal(from_files[i]["colour"], preloaded[i]["colour"])
    val, _ = parse_csv(synthetic / "val.csv", classes=synthetic / "classes.txt")
    test_sets = [VideoClipDataset(val, sampler=SegmentSampler(8), training=False, num_views=2, num_crops=3,
                                  transform=TestTransform(crop_size=16, short_side=16, num_crops=3))
                 for _ in range(2)]
    test_sets[1].preload()
    for i in range(len(test_sets[0])):
        assert torch.equal(test_sets[0][i]["video"], test_sets[1][i]["video"])


def test_preload_reports_bad_files_and_refuses_to_overfill_memory(synthetic, tmp_path):
    records, names, bad = _with_bad_files(synthetic, tmp_path)
    strict = VideoClipDataset(records, sampler=SegmentSampler(4), transform=TrainTransform(crop_size=16),
                              training=True, on_error="error")
    with pytest.raises(VideoDecodeError, match="empty file"):
        strict.preload()
    lenient = VideoClipDataset(records, sampler=SegmentSampler(4), transform=TrainTransform(crop_size=16),
                               training=True, on_error="skip", bad_files_dir=tmp_path / "bad", seed=0)
    lenient.preload()
    drawn = [lenient[i]["index"] for i in range(len(records))]
    assert set(drawn).isdisjoint(range(len(records) - 3, len(records)))  # never drawn, not even as replacements
    assert set(lenient.bad_videos()) == set(bad)
    assert lenient.num_skipped == 3  # each bad video counted once: its own item was replaced
    good = VideoClipDataset(records[:-3], sampler=SegmentSampler(4), transform=TrainTransform(crop_size=16),
                            training=True)
    with pytest.raises(MemoryError, match=r"data\.preload.*set data\.preload=false"):
        good.preload(max_fraction=1e-12)
