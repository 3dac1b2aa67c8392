"""Long videos: memory bounded by the window, and decoding hidden behind the model.

1. Peak memory (max RSS of a fresh process) of ``video_timeline`` over a 1-minute and a
   10-minute video, each in its own process, with the model-only peak of the same process
   (the fused model built and one batch run, before the video) recorded too.
2. Speed: windows per second of ``video_timeline`` (one streaming decode in a thread, windows
   batched through the fused model) against the fused model's own clip rate at the same batch
   on clips already in memory, measured side by side in one process, repetitions interleaved.

The model is DiST K400 ViT-B/16 8+16f (random weights, 224 x 224, in its inference form:
bf16 where supported), the video synthetic 320 x 240 at 30 fps (H.264), the timeline's windows
2 s long every 2 s. ::

    python benchmarks/long_video.py                       # about 8 minutes on 2 idle CPU cores
    python benchmarks/long_video.py --repeats 1 --minutes 1 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# As `predict --window` runs: malloc's defaults, not the kept freed memory of other CPU runs
# (see dist_video.cli._prepare_device); set DIST_VIDEO_KEEP_FREED_MEMORY=1 to measure the other way.
os.environ.setdefault("DIST_VIDEO_KEEP_FREED_MEMORY", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_method, machine  # noqa: E402

from dist_video.engine.predict import DEFAULT_PREPROCESS  # noqa: E402
from dist_video.engine.timeline import video_timeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREPROCESS = {**DEFAULT_PREPROCESS, "num_frames": 16}


def write_video(path: Path, minutes: float, width: int = 320, height: int = 240, fps: int = 30) -> Path:
    """A synthetic video: a moving texture whose colour changes every 20 s."""
    import av

    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.mp4")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23", "g": "60"}
        for t in range(int(minutes * 60 * fps)):
            colour = np.array([(t // (20 * fps) * 70) % 255, 120, 255 - (t // (20 * fps) * 50) % 255], np.float32)
            img = colour + 60 * np.sin((xx + 3 * t) / 9.0)[..., None] * np.cos((yy - t) / 11.0)[..., None]
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def build(device: torch.device):
    return build_method("dist", "ViT-B/16", 16, 2, device, dist_preset="k400-vit-b16-8+16f").fuse()


def child_memory(video: str, window: float, stride: float, batch: int) -> dict:
    """In a fresh process: the peak RSS with the model ready, then after the timeline."""
    device = torch.device("cpu")
    model = build(device)
    with torch.no_grad():
        model(torch.randn(batch, 3, 16, 224, 224))
    model_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    timeline = video_timeline(model, video, PREPROCESS, window=window, stride=stride, batch_size=batch)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model_peak_bytes": model_peak, "peak_bytes": peak, "windows": len(timeline.starts), "seconds": seconds}


def memory(videos: dict[float, Path], args) -> list[dict]:
    rows = []
    for minutes, path in videos.items():
        runs = []
        for _ in range(args.memory_repeats):
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--window", str(args.window),
                                   "--stride", str(args.stride), "--batch", str(args.batch)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows.append({"minutes": minutes, "windows": runs[0]["windows"],
                     "peak_mib": statistics.median(r["peak_bytes"] for r in runs) / 2**20,
                     "model_peak_mib": statistics.median(r["model_peak_bytes"] for r in runs) / 2**20,
                     "runs": runs})
        print(f"{minutes:g} min: peak {rows[-1]['peak_mib']:.0f} MiB (model alone {rows[-1]['model_peak_mib']:.0f})",
              file=sys.stderr)
    return rows


def speed(video: Path, args) -> dict:
    device = torch.device("cpu")
    model = build(device)
    clips = torch.randn(args.batch, 3, 16, 224, 224)
    with torch.no_grad():
        model(clips)  # warm-up
    batch_times, timeline_times, windows = [], [], 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.no_grad():
            model(clips)
        batch_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        timeline = video_timeline(model, video, PREPROCESS, window=args.window, stride=args.stride,
                                  batch_size=args.batch)
        timeline_times.append(time.perf_counter() - t)
        windows = len(timeline.starts)
    clip_rate = args.batch / statistics.median(batch_times)
    window_rate = windows / statistics.median(timeline_times)
    return {"batch": args.batch, "windows": windows, "clip_rate": clip_rate, "window_rate": window_rate,
            "ratio": window_rate / clip_rate, "batch_times": batch_times, "timeline_times": timeline_times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    p.add_argument("--window", type=float, default=2.0)
    p.add_argument("--stride", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of the speed comparison")
    p.add_argument("--memory-repeats", type=int, default=1, help="fresh processes per video length")
    p.add_argument("--cache", type=Path, default=Path("/tmp/dist-video-long-video"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_memory(args.child, args.window, args.stride, args.batch)))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    videos = {m: write_video(args.cache / f"synthetic-{m:g}min.mp4", m) for m in args.minutes}
    mem = memory(videos, args)
    fast = speed(videos[min(args.minutes)], args)
    print(f"windows/s {fast['window_rate']:.2f} vs clips/s {fast['clip_rate']:.2f}: {fast['ratio']:.2f}",
          file=sys.stderr)
    result = {"machine": machine("cpu"), "window": args.window, "stride": args.stride, "batch": args.batch,
              "repeats": args.repeats, "memory": mem, "speed": fast,
              "memory_ratio": mem[-1]["peak_mib"] / mem[0]["peak_mib"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_video.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Long videos: memory and speed of `predict --window`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), {m['date']}.",
        f"DiST K400 ViT-B/16 8+16f (random weights, fused), 224 x 224; synthetic 320 x 240 H.264 at 30 fps; "
        f"windows of {args.window:g} s every {args.stride:g} s; batches of {args.batch}; peak memory: "
        f"median of {args.memory_repeats} fresh process(es) per video; speed: medians of {args.repeats} "
        f"interleaved repetitions; malloc keeps freed memory: {m['malloc_keeps_freed_memory']}.", "",
        "| video | windows | peak RSS (MiB) | each process (MiB) | model alone (MiB) |", "|---|---|---|---|---|",
        *[f"| {r['minutes']:g} min | {r['windows']} | {r['peak_mib']:.0f} | "
          + ", ".join(f"{x['peak_bytes'] / 2**20:.0f}" for x in r["runs"]) + f" | {r['model_peak_mib']:.0f} |"
          for r in mem],
        "", f"Peak memory, {mem[-1]['minutes']:g} min / {mem[0]['minutes']:g} min: {result['memory_ratio']:.3f}.", "",
        f"Speed ({min(args.minutes):g}-minute video): {fast['window_rate']:.2f} windows/s against the fused model's "
        f"{fast['clip_rate']:.2f} clips/s on clips in memory at batch {args.batch}: ratio {fast['ratio']:.2f}.",
    ]
    (args.out / "long_video.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
