"""What each method learns about motion: top-1 on the synthetic moving-digit videos.

Every method starts from the bundled image-only encoder (``builtin:digits``) and trains with
the demo's recipe and the same budget (epochs, batch, schedule, data, linear head); only
``model.method`` changes. The held-out videos use digit images no model saw. The classes pair
each motion with its time-reverse (left/right, approach/recede), so a model blind to frame
order is capped at its *appearance ceiling* (computed from the held-out labels: 50% when
balanced).

    python benchmarks/temporal.py                   # the demo's budget (30 epochs) for every method:
                                                    # about 10 minutes on 2 CPU cores
    python benchmarks/temporal.py --epochs 60       # twice the budget for every method
    python benchmarks/temporal.py --methods dist frozen-mean --epochs 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from dist_video.demo import DEFAULTS, VIDEO_FRAMES, appearance_ceiling, demo_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dist", "frozen-mean", "adapter", "full-finetune")


def main() -> None:
    from dist_video.data.synthetic import make_synthetic
    from dist_video.engine.train import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--train-videos", type=int, default=DEFAULTS["train_videos"])
    ap.add_argument("--val-videos", type=int, default=DEFAULTS["val_videos"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/dist-video-temporal-benchmark", help="videos and runs go here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    work = Path(args.work)
    data = work / "data"
    if not (data / "meta.json").is_file():
        make_synthetic(data, num_train=args.train_videos, num_val=args.val_videos, seed=args.seed,
                       num_frames=VIDEO_FRAMES)
    ceiling = appearance_ceiling(data)
    rows = []
    for method in args.methods:
        cfg = demo_config(data, work / "runs" / method, method, args.epochs, args.seed, args.device)
        t = time.perf_counter()
        result = train(cfg, resume=False, progress=False)
        rows.append({"method": method, "top1": result.metrics["top1"], "top5": result.metrics["top5"],
                     "mean_class_accuracy": result.metrics["mean_class_accuracy"],
                     "trainable_params": result.trainable_params, "train_seconds": result.train_seconds,
                     "wall_seconds": time.perf_counter() - t})
        print(f"{method}: top-1 {100 * rows[-1]['top1']:.1f}% ({result.trainable_params:,} trainable, "
              f"{result.train_seconds:.0f} s)", flush=True)
    result = {"machine": machine(), "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
              if args.device == "auto" else args.device,
              "epochs": args.epochs, "train_videos": args.train_videos, "val_videos": args.val_videos,
              "appearance_ceiling": ceiling, "results": rows,
              "config": "dist_video.demo.demo_config (only model.method differs)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"temporal-{args.epochs}ep"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# Temporal benchmark: synthetic moving digits", "",
             f"`python benchmarks/temporal.py` on {m['date']}: {m['cpu']} ({m['cores']} cores, {result['device']}), "
             f"torch {m['torch']}. {args.train_videos} training / {args.val_videos} held-out videos, "
             f"{args.epochs} epochs each, the demo's recipe. Appearance-only ceiling: {100 * ceiling:.0f}%.", "",
             "| method | top-1 | top-5 | trainable parameters | train time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['top1']:.1f}% | {100 * r['top5']:.1f}% | "
                     f"{r['trainable_params']:,} | {r['train_seconds']:.0f} s |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
