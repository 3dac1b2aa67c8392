"""Synthetic moving-digit videos: a small, real video dataset for tests, examples and the demo.

Each video shows one handwritten digit (scikit-learn's bundled 8x8 digits, upscaled) moving
on a smooth random-textured background, with mild noise, encoded as H.264 mp4 (yuv420p).
Classes are digit x motion, e.g. ``"digit 0 moving left"``.

Motions come in time-reversed pairs: ``left``/``right`` (horizontal), ``up``/``down`` and
``approach``/``recede`` (the digit grows / shrinks). A video of the second motion of a pair
is rendered as a video of the first one and then played backwards, so both motions have the
*same distribution of frame sets*: a model that ignores frame order cannot beat 50% on the
motion within a pair. Start position, travel, speed, size, colours and background are drawn
per video, so no single frame tells the motion.

Digit images for the ``train`` split come from a fixed subset of sklearn's digits and the
``val`` split from the disjoint rest (:func:`digit_image_split`, the single source of truth
for anyone pre-training an image encoder on the training digits).

Output of :func:`make_synthetic`: ``train/*.mp4``, ``val/*.mp4``, ``train.csv`` and
``val.csv`` (``path,label`` with paths relative to the folder and label names),
``classes.txt`` (one name per line) and ``meta.json`` (the parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_DIGITS", "DEFAULT_MOTIONS", "MOTION_PAIRS", "MOTION_PHRASES", "digit_image_split",
           "synthetic_class_names", "render_video", "make_synthetic", "add_make_synthetic_arguments",
           "run_make_synthetic"]

DEFAULT_DIGITS = (0, 1, 2)
DEFAULT_MOTIONS = ("left", "right", "approach", "recede")
#: motion -> (the forward motion it is rendered from, whether it is played backwards)
MOTION_PAIRS = {"right": ("right", False), "left": ("right", True),
                "down": ("down", False), "up": ("down", True),
                "approach": ("approach", False), "recede": ("approach", True)}
#: motion -> how class names say it ("digit 3 moving left")
MOTION_PHRASES = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                  "approach": "approaching", "recede": "receding"}
_SPLIT_CODES = {"train": 1, "val": 2}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digit_image_split(seed: int = 0, heldout_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` of the training digit images and of
    the disjoint held-out ones (``heldout_fraction`` of each digit class, chosen with
    ``seed``). Both sorted int64 arrays."""
    _, targets = _digits()
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for digit in range(10):
        idx = np.flatnonzero(targets == digit)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(len(idx) * heldout_fraction))
        heldout.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def synthetic_class_names(digits: Sequence[int] = DEFAULT_DIGITS,
                          motions: Sequence[str] = DEFAULT_MOTIONS) -> list[str]:
    """``"digit <d> <motion phrase>"`` for each digit, then each motion (label order)."""
    for m in motions:
        if m not in MOTION_PAIRS:
            raise ValueError(f"unknown motion {m!r}; choose from {', '.join(MOTION_PAIRS)}")
    return [f"digit {d} {MOTION_PHRASES[m]}" for d in digits for m in motions]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random texture: coarse colour noise upsampled, plus finer grey detail (H x W x 3, [0,1])."""
    coarse = torch.from_numpy(rng.uniform(0.05, 0.55, (1, 3, 4, 4)).astype(np.float32))
    fine = torch.from_numpy(rng.normal(0.0, 0.08, (1, 1, 12, 12)).astype(np.float32))
    bg = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    bg = bg + F.interpolate(fine, size=(size, size), mode="bilinear", align_corners=False)
    return bg[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _scaled_digit(image: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(image)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def render_video(digit_image: np.ndarray, motion: str, rng: np.random.Generator, *,
                 num_frames: int = 16, size: int = 64) -> np.ndarray:
    """One video of ``digit_image`` (8 x 8, values in [0, 1]) doing ``motion``:
    uint8 ``num_frames x size x size x 3``. Reversed motions are rendered forward and flipped
    in time."""
    forward, backwards = MOTION_PAIRS[motion]
    t = np.linspace(0.0, 1.0, num_frames)
    bg = _background(rng, size)
    colour = rng.uniform(0.75, 1.0, 3).astype(np.float32)
    base = size * rng.uniform(0.28, 0.36)  # digit side in pixels at scale 1
    if forward == "approach":
        s0 = rng.uniform(0.45, 0.65)
        s1 = s0 * rng.uniform(1.6, 2.0)
        sides = base * s0 * (s1 / s0) ** t
        cx = size / 2 + rng.uniform(-0.12, 0.12) * size + rng.uniform(-0.05, 0.05) * size * t
        cy = size / 2 + rng.uniform(-0.12, 0.12) * size + rng.uniform(-0.05, 0.05) * size * t
    else:
        side = base * rng.uniform(0.85, 1.15)
        sides = np.full(num_frames, side)
        half = side / 2
        travel = rng.uniform(0.3, 0.55) * (size - side)
        start = rng.uniform(half, size - half - travel)
        along = start + travel * t
        across = rng.uniform(half, size - half) + rng.uniform(-0.04, 0.04) * size * t
        across = np.clip(across, half, size - half)
        cx, cy = (along, across) if forward == "right" else (across, along)
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    for k in range(num_frames):
        side = max(3, int(round(sides[k])))
        alpha = _scaled_digit(digit_image, side)
        frame = bg.copy()
        top, left = int(round(cy[k] - side / 2)), int(round(cx[k] - side / 2))
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + side, size), min(left + side, size)
        if y1 > y0 and x1 > x0:
            a = alpha[y0 - top:y1 - top, x0 - left:x1 - left, None]
            frame[y0:y1, x0:x1] = frame[y0:y1, x0:x1] * (1 - a) + colour * a
        frames[k] = frame
    frames += rng.normal(0.0, 0.015, frames.shape).astype(np.float32)
    out = (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out[::-1].copy() if backwards else out


def _encode(path: str, frames: np.ndarray, fps: int) -> None:
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic, and workers run in parallel anyway
        stream.options = {"crf": "18", "preset": "veryfast", "g": str(max(1, len(frames)))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_one(job: tuple) -> None:
    path, digit_index, motion, seed_parts, num_frames, size, fps = job
    images, _ = _digits()
    rng = np.random.default_rng(list(seed_parts))
    frames = render_video(images[digit_index], motion, rng, num_frames=num_frames, size=size)
    _encode(path, frames, fps)


def _plan(split: str, count: int, seed: int, digits: Sequence[int], motions: Sequence[str],
          pool: np.ndarray) -> list[tuple[str, int, str, tuple[int, ...], int]]:
    """(relative path, digit image index, motion, per-video seed, label) for each video of a split:
    classes cycle so the split is balanced; digit images are drawn from ``pool``."""
    _, targets = _digits()
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0])
    by_digit = {d: pool[targets[pool] == d] for d in digits}
    for d, idx in by_digit.items():
        if len(idx) == 0:
            raise ValueError(f"no images of digit {d} in the {split} digit subset")
    n_classes = len(digits) * len(motions)
    order = rng.permutation(count)
    plan = []
    for i in range(count):
        label = int(order[i]) % n_classes
        digit, motion = digits[label // len(motions)], motions[label % len(motions)]
        image = int(rng.choice(by_digit[digit]))
        plan.append((f"{split}/{i:05d}.mp4", image, motion, (seed, _SPLIT_CODES[split], i + 1), label))
    return plan


def make_synthetic(out_dir: str | os.PathLike, *, num_train: int = 600, num_val: int = 120, seed: int = 0,
                   digits: Sequence[int] = DEFAULT_DIGITS, motions: Sequence[str] = DEFAULT_MOTIONS,
                   num_frames: int = 16, size: int = 64, fps: int = 8, workers: int | None = None,
                   digit_split_seed: int = 0) -> dict:
    """Write the synthetic dataset into ``out_dir`` (see the module docstring); returns a
    summary dict (paths of the CSVs and class list, counts, seconds taken).

    Deterministic given the arguments: the same seed gives the same frames. ``workers``
    processes encode in parallel (default: the available cores, at most 4)."""
    t0 = time.perf_counter()
    digits = [int(d) for d in digits]
    motions = list(motions)
    names = synthetic_class_names(digits, motions)
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    train_pool, heldout_pool = digit_image_split(digit_split_seed)
    plans = {"train": _plan("train", num_train, seed, digits, motions, train_pool),
             "val": _plan("val", num_val, seed, digits, motions, heldout_pool)}
    jobs = [(str(out / rel), image, motion, seeds, num_frames, size, fps)
            for plan in plans.values() for rel, image, motion, seeds, _ in plan]
    if workers is None:
        try:
            workers = min(4, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover
            workers = min(4, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            list(ex.map(_write_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        for job in jobs:
            _write_one(job)
    for split, plan in plans.items():
        lines = ["path,label"] + [f"{rel},{names[label]}" for rel, _, _, _, label in plan]
        (out / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    meta = {"seed": seed, "digits": digits, "motions": motions, "num_frames": num_frames, "size": size,
            "fps": fps, "num_train": num_train, "num_val": num_val, "digit_split_seed": digit_split_seed,
            "train_digit_images": int(len(train_pool)), "heldout_digit_images": int(len(heldout_pool)),
            "class_names": names}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"out_dir": str(out), "train": str(out / "train.csv"), "val": str(out / "val.csv"),
            "classes": str(out / "classes.txt"), "num_classes": len(names), "num_train": num_train,
            "num_val": num_val, "seconds": time.perf_counter() - t0}


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_make_synthetic_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dist-video make-synthetic OUT``."""
    parser.add_argument("out", metavar="OUT", help="folder to write the videos and CSVs into")
    parser.add_argument("--num-train", type=int, default=600, help="training videos (default 600)")
    parser.add_argument("--num-val", type=int, default=120, help="held-out videos (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--digits", type=_int_list, default=list(DEFAULT_DIGITS),
                        help="comma-separated digits (default 0,1,2)")
    parser.add_argument("--motions", type=_str_list, default=list(DEFAULT_MOTIONS),
                        help=f"comma-separated motions from {','.join(MOTION_PAIRS)} "
                             "(default left,right,approach,recede)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per video (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (default 64)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: cores, max 4)")


def run_make_synthetic(*, out: str | os.PathLike, num_train: int = 600, num_val: int = 120, seed: int = 0,
                       digits: Sequence[int] = DEFAULT_DIGITS, motions: Sequence[str] = DEFAULT_MOTIONS,
                       num_frames: int = 16, size: int = 64, fps: int = 8, workers: int | None = None) -> dict:
    """``make-synthetic`` with the options of :func:`add_make_synthetic_arguments` as keywords;
    prints a one-line summary."""
    summary = make_synthetic(out, num_train=num_train, num_val=num_val, seed=seed, digits=list(digits),
                             motions=list(motions), num_frames=num_frames, size=size, fps=fps, workers=workers)
    print(f"wrote {summary['num_train']} training and {summary['num_val']} held-out videos "
          f"({summary['num_classes']} classes) to {summary['out_dir']} in {summary['seconds']:.1f} s")
    return summary
