"""Live and sliding windows: CLIP work shared between overlapping windows, and ``watch``.

1. Windows per second of ``video_timeline`` (``predict --window 4 --stride S``) with CLIP shared
   between windows against each window run on its own (the same grid frames), for strides of
   1 s (W/4) and 2 s (W/2), and the largest difference between their probabilities.
2. ``watch`` on a file played at its real speed (25 fps): windows, skipped, median and p95
   latency, and the process's resident memory after the first third of the run and at its end.

The model is DiST K400 ViT-B/16 8+16f (random weights, 224 x 224, in its inference form: bf16
where supported), the video synthetic 320 x 240 at 25 fps (H.264). ::

    python benchmarks/live.py                      # a few minutes on 2 idle CPU cores
    python benchmarks/live.py --seconds 12 --watch-seconds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_method, machine  # noqa: E402
from long_video import write_video  # noqa: E402

from dist_video.engine.predict import DEFAULT_PREPROCESS  # noqa: E402
from dist_video.engine.timeline import video_timeline  # noqa: E402
from dist_video.live import watch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREPROCESS = {**DEFAULT_PREPROCESS, "num_frames": 16}


def rss_mib() -> float:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def timeline_speed(model, video: Path, window: float, stride: float, repeats: int) -> dict:
    """Windows/s shared and alone (repetitions interleaved, best of each) and their difference."""
    times: dict[bool, list[float]] = {True: [], False: []}
    out: dict[bool, torch.Tensor] = {}
    for _ in range(repeats):
        for share in (True, False):
            start = time.perf_counter()
            timeline = video_timeline(model, video, PREPROCESS, window=window, stride=stride, share=share)
            times[share].append(time.perf_counter() - start)
            out[share] = timeline.probabilities
    windows = out[True].shape[0]
    shared, alone = windows / min(times[True]), windows / min(times[False])
    return {"window": window, "stride": stride, "windows": windows, "shared_windows_per_s": round(shared, 3),
            "alone_windows_per_s": round(alone, 3), "speedup": round(shared / alone, 2),
            "max_probability_difference": float((out[True] - out[False]).abs().max()),
            "same_top_class": bool((out[True].argmax(1) == out[False].argmax(1)).all())}


def watch_run(model, video: Path, window: float, stride: float) -> dict:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append(rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    *_, summary = list(watch(model, str(video), window=window, stride=stride, preprocess=PREPROCESS,
                             realtime=True))
    done.set()
    sampler.join()
    third = samples[len(samples) // 3] if samples else None
    return {"window": window, "stride": stride, **{k: summary[k] for k in
            ("windows", "skipped", "latency_median", "latency_p95")},
            "rss_mib_after_a_third": round(third, 1) if third else None,
            "rss_mib_at_end": round(samples[-1], 1) if samples else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=12, help="length of the timeline video")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--watch-seconds", type=float, default=60, help="length of the watched file (0: skip)")
    p.add_argument("--workdir", default="/tmp/dist-video-bench-live")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_method("dist", "ViT-B/16", 16, 2, torch.device("cpu"), dist_preset="k400-vit-b16-8+16f").fuse()
    video = write_video(work / f"video-{args.seconds:g}s.mp4", args.seconds / 60, fps=25)
    result = {"machine": machine(), "model": "DiST K400 ViT-B/16 8+16f (random weights)",
              "dtype": str(model.dtype), "timeline": []}
    with torch.no_grad():
        for stride in (1.0, 2.0):
            result["timeline"].append(timeline_speed(model, video, 4.0, stride, args.repeats))
            print(json.dumps(result["timeline"][-1]), flush=True)
        if args.watch_seconds > 0:
            stream = write_video(work / f"stream-{args.watch_seconds:g}s.mp4", args.watch_seconds / 60, fps=25)
            result["watch"] = watch_run(model, stream, 4.0, 1.0)
            print(json.dumps(result["watch"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "live.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
