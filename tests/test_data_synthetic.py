"""The synthetic moving-digit dataset: determinism, splits, and time-reversed motion pairs."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

from dist_video.data import parse_csv, probe, read_frames
from dist_video.data.synthetic import (add_make_synthetic_arguments, digit_image_split, make_synthetic,
                                       render_video, run_make_synthetic, synthetic_class_names)
from sklearn.datasets import load_digits


def decoded(root, split):
    rows = list(csv.reader(open(root / f"{split}.csv")))[1:]
    return rows, [read_frames(root / path, list(range(probe(root / path).num_frames))).numpy() for path, _ in rows]


def test_same_seed_same_frames_other_seed_other_frames(tmp_path):
    kwargs = dict(num_train=6, num_val=3, num_frames=8, size=32, workers=1)
    make_synthetic(tmp_path / "a", seed=5, **kwargs)
    make_synthetic(tmp_path / "b", seed=5, **kwargs)
    make_synthetic(tmp_path / "c", seed=6, **kwargs)
    rows_a, frames_a = decoded(tmp_path / "a", "train")
    rows_b, frames_b = decoded(tmp_path / "b", "train")
    rows_c, frames_c = decoded(tmp_path / "c", "train")
    assert rows_a == rows_b
    assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))
    assert not all(np.array_equal(x, y) for x, y in zip(frames_a, frames_c))
    assert frames_a[0].shape == (8, 32, 32, 3)


def test_layout_classes_and_parsing(tmp_path):
    summary = make_synthetic(tmp_path, num_train=24, num_val=12, seed=0, num_frames=6, size=32, workers=2)
    names = (tmp_path / "classes.txt").read_text().splitlines()
    assert names == synthetic_class_names() and len(names) == 12
    assert names[:4] == ["digit 0 moving left", "digit 0 moving right", "digit 0 approaching", "digit 0 receding"]
    records, parsed = parse_csv(tmp_path / "train.csv", classes=tmp_path / "classes.txt")
    assert parsed == names and len(records) == 24
    assert sorted(r.label for r in records) == sorted(list(range(12)) * 2)  # balanced
    assert summary["num_classes"] == 12
    info = probe(records[0].path)
    assert (info.num_frames, info.width, info.height, info.codec) == (6, 32, 32, "h264")
    assert abs(info.fps - 8) < 1e-6


def test_digit_split_is_disjoint_stratified_and_stable():
    train, held = digit_image_split()
    targets = load_digits().target
    assert len(set(train.tolist()) & set(held.tolist())) == 0
    assert len(train) + len(held) == len(targets)
    for d in range(10):
        frac = (targets[held] == d).sum() / (targets == d).sum()
        assert 0.25 < frac < 0.35
    again_train, again_held = digit_image_split()
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert not np.array_equal(digit_image_split(seed=1)[1], held)


def test_val_videos_use_only_heldout_digit_images(tmp_path, monkeypatch):
    from dist_video.data import synthetic
    used = []
    original = synthetic._plan

    def spy(split, count, seed, digits, motions, pool):
        plan = original(split, count, seed, digits, motions, pool)
        used.append((split, {img for _, img, _, _, _ in plan}))
        return plan

    monkeypatch.setattr(synthetic, "_plan", spy)
    make_synthetic(tmp_path, num_train=24, num_val=24, seed=0, num_frames=4, size=16, workers=1)
    train_pool, held_pool = digit_image_split()
    assert used[0][0] == "train" and used[0][1] <= set(train_pool.tolist())
    assert used[1][0] == "val" and used[1][1] <= set(held_pool.tolist())


@pytest.mark.parametrize("forward, backward", [("right", "left"), ("down", "up"), ("approach", "recede")])
def test_motion_pairs_are_time_reverses(forward, backward):
    image = load_digits().images[0] / 16.0
    for seed in range(3):
        fwd = render_video(image.astype(np.float32), forward, np.random.default_rng(seed), num_frames=10, size=48)
        bwd = render_video(image.astype(np.float32), backward, np.random.default_rng(seed), num_frames=10, size=48)
        # the same random draws give exactly the reversed video: the two motions have the
        # same distribution of frame sets, only the order tells them apart
        assert np.array_equal(bwd, fwd[::-1])
        assert sorted(map(bytes, fwd)) == sorted(map(bytes, bwd))


def _digit_mask(video: np.ndarray) -> np.ndarray:
    # the digit is the only bright, near-white-ish thing: brightest pixels of each frame
    grey = video.astype(np.float32).mean(-1)
    return grey > np.percentile(grey, 97, axis=(1, 2), keepdims=True)


def test_motions_move_the_digit_the_right_way():
    image = (load_digits().images[0] / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        right = _digit_mask(render_video(image, "right", rng, num_frames=12, size=64))
        xs = [np.nonzero(m)[1].mean() for m in right]
        assert xs[-1] - xs[0] > 5
        down = _digit_mask(render_video(image, "down", rng, num_frames=12, size=64))
        ys = [np.nonzero(m)[0].mean() for m in down]
        assert ys[-1] - ys[0] > 5
        grey = render_video(image, "approach", rng, num_frames=12, size=64).astype(np.float32).mean(-1)
        bright = (grey > 0.85 * grey.max()).sum(axis=(1, 2))  # the digit's strokes
        assert bright[-1] > 1.5 * bright[0]


def test_cli_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_make_synthetic_arguments(parser)
    args = parser.parse_args([str(tmp_path / "out"), "--num-train", "4", "--num-val", "2", "--digits", "3,4",
                              "--motions", "up,down", "--num-frames", "5", "--size", "24", "--workers", "1"])
    summary = run_make_synthetic(**vars(args))
    assert summary["num_classes"] == 4
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines() == [
        "digit 3 moving up", "digit 3 moving down", "digit 4 moving up", "digit 4 moving down"]
    assert "wrote 4 training and 2 held-out videos" in capsys.readouterr().out
