"""``dist-video demo``: DiST learns motion on top of a frozen image-only encoder, in a few minutes.

1. Writes synthetic videos of handwritten digits moving on textured backgrounds (real mp4
   files; classes = digit x motion, where the motions come in time-reversed pairs).
2. Freezes the bundled digits encoder (pre-trained on still images only) and trains DiST on it.
3. Trains the frozen-encoder mean-pooling baseline with the same data, head and budget. It
   cannot tell a clip from its time-reverse, so its ceiling is (digit accuracy) x 50%.
4. Evaluates both on held-out videos (digit images never seen in training), predicts one
   held-out video, and writes a report folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

__all__ = ["add_demo_arguments", "run_demo", "demo_config", "appearance_ceiling", "DEFAULTS"]

logger = logging.getLogger(__name__)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-report", help="report folder (default: demo-report)")
    p.add_argument("--train-videos", type=int, default=None, help="training videos (default: the demo's budget)")
    p.add_argument("--val-videos", type=int, default=None, help="held-out videos")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs of DiST (default {DEFAULTS['epochs']})")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help=f"training epochs of the frozen-mean baseline (default {DEFAULTS['baseline_epochs']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--keep-data", action="store_true", help="reuse videos already in OUT/data")


#: The demo's budget (its runs, times and accuracies: benchmarks/README.md, "The demo").
#: The frozen-mean baseline (a linear head on frozen features) gets fewer epochs so that DiST gets
#: the time; its ceiling is 50% whatever the budget (benchmarks/temporal.py trains it as long as
#: DiST).
DEFAULTS = {"train_videos": 480, "val_videos": 120, "epochs": 30, "baseline_epochs": 4}

#: Frames per synthetic video: DiST's dense frames, every one of them (the encoder sees every 2nd).
VIDEO_FRAMES = 8


def demo_config(data_dir: Path, out_dir: Path, method: str, epochs: int, seed: int, device: str,
                extra: list[str] | tuple[str, ...] = ()):
    """The demo's training configuration for ``method`` (``dist`` or ``frozen-mean``)."""
    from .config import load_config

    overrides = [
        f"model.method={method}", "model.clip=builtin:digits", "model.head=linear", "model.clip_dtype=auto",
        "model.dist.num_frames=8", "model.dist.alpha=2", "model.dist.temporal_dim=64",
        "model.dist.integration_dim=128", "model.dist.pooling_layers=1",
        # The branch reads the encoder's first two blocks (of four): on this task DiST then
        # learns the motions in fewer and cheaper steps than reading all four (the last blocks
        # of this small encoder are specialised to digit identity). The encoder sees every 2nd
        # of the 8 dense frames: as sample-efficient here as every 4th of 16, at a cheaper step.
        "model.dist.selected_layers=[0, 1]",
        "data.format=csv", f"data.root={data_dir}", f"data.train={data_dir / 'train.csv'}",
        f"data.val={data_dir / 'val.csv'}", f"data.classes={data_dir / 'classes.txt'}",
        "data.crop_size=48", "data.test_scale=48", "data.num_views=1", "data.num_crops=1",
        # Decoding a clip costs more CPU than DiST's step on it here: decode every video once.
        "data.preload=true", "data.workers=0",
        # Digits are not mirror-symmetric and the encoder never saw flipped ones; mixing two
        # clips would blend two motions. Keep augmentation to crops and colour.
        "augment.flip=false", "augment.scale=[0.7, 1.0]", "augment.mixup_alpha=0.0", "augment.cutmix_alpha=0.0",
        "augment.mix_prob=0.0", "augment.hue=0.0", "augment.saturation=0.0", "augment.grayscale_p=0.0",
        "augment.label_smoothing=0.1",
        "optim.lr=1e-4", "optim.branch_lr_mult=10", f"optim.epochs={epochs}", "optim.warmup_epochs=0.5",
        "optim.weight_decay=0.05", "optim.warmup_start_lr=1e-6", "optim.min_lr=1e-6",
        "train.batch_size=32", "train.accumulation=1", f"train.seed={seed}", f"train.device={device}",
        "train.eval_every=0", "train.log_every=5", "eval.batch_size=32",
        f"output_dir={out_dir}",
    ]
    if method == "frozen-mean":
        # The same 4 frames per clip that DiST's encoder sees (one per quarter of the clip),
        # without augmenting the 4 dense frames it would ignore.
        overrides += ["model.dist.num_frames=4", "model.dist.alpha=1"]
    return load_config(overrides=overrides + list(extra))


def run_demo(*, out: str | os.PathLike = "demo-report", train_videos: int | None = None,
             val_videos: int | None = None, epochs: int | None = None, baseline_epochs: int | None = None,
             seed: int = 0, device: str = "auto", keep_data: bool = False, progress: bool = True) -> dict:
    """The demo (the options of :func:`add_demo_arguments`, as keywords; ``progress``: progress
    bars); prints the results table on standard output and returns the report's metrics."""
    from .data.synthetic import make_synthetic
    from .engine.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_train = train_videos or DEFAULTS["train_videos"]
    n_val = val_videos or DEFAULTS["val_videos"]
    epochs = {"dist": epochs or DEFAULTS["epochs"],
              "frozen-mean": baseline_epochs or epochs or DEFAULTS["baseline_epochs"]}
    data_dir = out / "data"
    t_start = time.perf_counter()

    if not (keep_data and (data_dir / "train.csv").is_file()):
        if data_dir.exists():
            shutil.rmtree(data_dir)
        logger.info("[1/4] writing %d training and %d held-out synthetic videos to %s", n_train, n_val, data_dir)
        make_synthetic(data_dir, num_train=n_train, num_val=n_val, seed=seed, num_frames=VIDEO_FRAMES)

    results = {}
    for i, method in enumerate(("dist", "frozen-mean"), 2):
        logger.info("[%d/4] training %s on the frozen digits encoder", i, method)
        cfg = demo_config(data_dir, out / "runs" / method, method, epochs[method], seed, device)
        result = train(cfg, resume=False, progress=progress)
        results[method] = {"top1": result.metrics["top1"], "top5": result.metrics["top5"],
                           "mean_class_accuracy": result.metrics["mean_class_accuracy"],
                           "num_videos": result.metrics["num_videos"],
                           "trainable_params": result.trainable_params, "train_seconds": result.train_seconds,
                           "per_class_accuracy": result.metrics["per_class_accuracy"]}

    logger.info("[4/4] predicting a held-out video and writing the report")
    report = _write_report(out, data_dir, results, time.perf_counter() - t_start, device=device)
    _print_table(results, out)
    return report


def _held_out(data_dir: Path):
    """The held-out split's annotations, through the same parser training uses."""
    from .data.datasets import parse_csv

    return parse_csv(data_dir / "val.csv", classes=data_dir / "classes.txt")


def appearance_ceiling(data_dir: str | os.PathLike) -> float:
    """The best top-1 any frame-order-blind model can reach on the held-out videos.

    Each motion is rendered as its pair's forward motion played backwards, so the two classes
    of a (digit, motion pair) group have the same distribution of frame *sets*: such a model
    can at best answer the group's more frequent class. Ceiling = sum over groups of the larger
    class count / number of videos (0.5 for balanced classes)."""
    from collections import Counter

    from .data.synthetic import MOTION_PAIRS, MOTION_PHRASES

    phrase_to_motion = {v: k for k, v in MOTION_PHRASES.items()}
    records, class_names = _held_out(Path(data_dir))
    counts = Counter(class_names[r.label] for r in records)
    groups: dict[tuple[str, str], list[int]] = {}
    for name, n in counts.items():
        digit, _, phrase = name.partition(" ")[2].partition(" ")  # "digit 3 moving left"
        forward = MOTION_PAIRS[phrase_to_motion[phrase]][0]
        groups.setdefault((digit, forward), []).append(n)
    return sum(max(ns) for ns in groups.values()) / max(1, len(records))


def _write_report(out: Path, data_dir: Path, results: dict, seconds: float, device: str = "auto") -> dict:
    from .loading import load_model
    from .visualize import film_strip

    dist_run = out / "runs" / "dist"
    records, class_names = _held_out(data_dir)
    for src, dst in ((dist_run / "training_curves.png", "training_curves.png"),
                     (dist_run / "eval" / "confusion_matrix.png", "confusion_matrix.png")):
        if src.exists():
            shutil.copy(src, out / dst)

    # Predict one held-out video with the trained DiST model, as a user would.
    video_path = Path(records[0].path)
    video_rel = Path(os.path.relpath(video_path, data_dir)).as_posix()
    true_label = class_names[records[0].label]
    prediction = load_model(dist_run / "model", device=device).predict([video_path], topk=3)[0]
    film_strip(video_path, out / "film_strip.png", title=f"true: {true_label}   |   DiST: "
               f"{prediction['top'][0]['class']} ({100 * prediction['top'][0]['probability']:.0f}%)")

    ceiling = appearance_ceiling(data_dir)
    metrics = {m: {k: v for k, v in r.items() if k != "per_class_accuracy"} for m, r in results.items()}
    metrics["frozen-mean"]["appearance_ceiling"] = ceiling
    metrics["prediction"] = {"video": str(video_rel), "true": true_label, "top": prediction["top"]}
    metrics["total_seconds"] = seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    d, f = results["dist"], results["frozen-mean"]
    lines = [
        "# dist-video demo report", "",
        f"{len(class_names)} classes = digit x motion ({', '.join(class_names[:4])}, ...). "
        f"Held-out videos use digit images the encoder and DiST never saw.", "",
        "| method | top-1 | top-5 | trainable parameters | train time |", "|---|---|---|---|---|",
        f"| DiST (frozen encoder + DiST branch) | {100 * d['top1']:.1f}% | {100 * d['top5']:.1f}% | "
        f"{d['trainable_params']:,} | {d['train_seconds']:.0f} s |",
        f"| frozen encoder, mean over frames | {100 * f['top1']:.1f}% | {100 * f['top5']:.1f}% | "
        f"{f['trainable_params']:,} | {f['train_seconds']:.0f} s |", "",
        f"The mean-pooling baseline cannot tell a clip from its time-reverse (left/right, approach/recede), "
        f"so its ceiling is {100 * ceiling:.0f}% even with perfect digit recognition.", "",
        "![training curves](training_curves.png)", "",
        "![confusion matrix (DiST)](confusion_matrix.png)", "",
        f"Prediction for `{video_rel}` (true class: **{true_label}**):", "",
        *[f"{i}. {t['class']}: {100 * t['probability']:.1f}%" for i, t in enumerate(prediction["top"], 1)], "",
        "![film strip](film_strip.png)", "",
        f"Total demo time: {seconds:.0f} s. Runs (configs, checkpoints, metrics): `runs/`.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return metrics


def _print_table(results: dict, out: Path) -> None:
    print()
    print(f"{'method':<14s} {'top-1':>7s} {'trainable params':>17s} {'train time':>11s}")
    for m, r in results.items():
        print(f"{m:<14s} {100 * r['top1']:6.1f}% {r['trainable_params']:>17,d} {r['train_seconds']:>10.0f}s")
    print(f"\nreport: {out / 'report.md'}")
