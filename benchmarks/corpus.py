"""Corpus jobs on Ray against the single-process ``embed``: videos/s on the same files.

    python benchmarks/corpus.py [--videos 24] [--width 256] [--layers 6] [--image 112] [--out DIR]

Measures, on Kinetics-like videos (10 s, 340x256, 30 fps, H.264; cached like ``loader.py``'s)
and a DiST model with a random small CLIP saved as a model folder:

- ``single``: :func:`dist_video.engine.embed.embed_files` in this process, one torch thread
  (model load included);
- ``ray-1`` / ``ray-2``: :func:`dist_video.corpus.run_corpus` with 1 and 2 CPU actors (one
  torch thread each) on a local Ray started once beforehand with ``actors + 1`` logical CPUs (the
  extra one runs the decode tasks); actor start and model load included, ``ray.init`` not;
- the decode rate (uint8 test clips per video, one core) and the model rate (videos/s of the
  model alone on decoded clips, one thread): the two halves of the pipeline, for sizing.

Writes ``corpus.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import videos as kinetics_like_videos  # noqa: E402

from dist_video import DiSTConfig, DiSTVideoModel  # noqa: E402
from dist_video.clip import CLIP, CLIPConfig  # noqa: E402
from dist_video.corpus import corpus_uint8_clips, run_corpus  # noqa: E402
from dist_video.data.transforms import normalize_clips  # noqa: E402
from dist_video.engine.embed import embed_files  # noqa: E402
from dist_video.engine.predict import DEFAULT_PREPROCESS, load_for_inference  # noqa: E402


def make_model(folder: Path, width: int, layers: int, image: int, frames: int) -> Path:
    """A DiST model folder with a seeded random CLIP (``width``, ``layers``, ``image`` px)."""
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(embed_dim=width // 2, image_size=image, patch_size=16, vision_width=width,
                           vision_layers=layers, vision_heads=max(1, width // 64), text_layers=0)).eval()
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=frames, alpha=2, temporal_dim=32, integration_dim=width // 2,
                                            pooling_layers=2), clip_dtype=torch.float32)
    preprocess = {**DEFAULT_PREPROCESS, "crop_size": image, "test_scale": image, "num_frames": frames}
    model.save_pretrained(folder, metadata={"preprocess": preprocess})
    return folder


def single_process(model: Path, files: list[str], first: int) -> tuple[float, float]:
    """(seconds, model load included; videos/s after the first ``first`` files)."""
    t0 = time.perf_counter()
    net, preprocess = load_for_inference(str(model), device="cpu", clip_dtype="fp32", require_head=False)
    done: list[float] = []
    result = embed_files(net, files, preprocess, progress=lambda path: done.append(time.perf_counter()))
    assert result.embeddings.shape[0] == len(files) and not result.errors
    return time.perf_counter() - t0, (len(files) - first) / (done[-1] - done[first - 1])


def halves(model: Path, files: list[str]) -> dict:
    """Seconds per video of the decode (uint8 clips) and of the model on them, one thread each."""
    net, preprocess = load_for_inference(str(model), device="cpu", clip_dtype="fp32", require_head=False)
    fused = net.fuse()
    t0 = time.perf_counter()
    clips = [corpus_uint8_clips(f, preprocess, num_frames=fused.config.num_frames) for f in files]
    decode = (time.perf_counter() - t0) / len(files)
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in clips:
            fused.encode_video(normalize_clips(c, preprocess["mean"], preprocess["std"]))
    return {"decode_s_per_video": decode, "model_s_per_video": (time.perf_counter() - t0) / len(files),
            "clips_per_video": int(clips[0].shape[0])}


def on_ray(model: Path, files: list[str], actors: int, out: Path, first: int) -> tuple[float, float]:
    """(seconds of the job, videos/s after its first shard of ``first`` rows)."""
    import ray

    ray.init(num_cpus=actors + 1, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        summary = run_corpus(str(model), files, out, actors=actors, batch_size=first, shard_rows=first,
                             progress=False)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert summary.videos == len(files) and summary.errors == 0, summary.line()
    return seconds, summary.steady_videos_per_second


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--first", type=int, default=4, help="rows of the first shard (and the model batch), "
                   "left out of the steady rate")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--image", type=int, default=112)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "dist-video-bench-videos"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # Ray's workers inherit it: one torch thread per actor
    torch.set_num_threads(1)
    files = [str(f) for f in kinetics_like_videos(Path(args.cache), args.videos, None)]
    work = Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    try:
        model = make_model(work / "model", args.width, args.layers, args.image, args.frames)
        runs = {"single": single_process(model, files, args.first)}
        for actors in (1, 2):
            runs[f"ray-{actors}"] = on_ray(model, files, actors, work / f"out-{actors}", args.first)
        parts = halves(model, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {k: v[0] for k, v in runs.items()}
    rates = {k: len(files) / v for k, v in seconds.items()}
    steady = {k: v[1] for k, v in runs.items()}
    result = {"videos": len(files), "model": vars(args), "seconds": seconds, "videos_per_s": rates,
              "steady_videos_per_s": steady, **parts,
              "ray_1_overhead_end_to_end": rates["single"] / rates["ray-1"] - 1,
              "ray_1_overhead_steady": steady["single"] / steady["ray-1"] - 1,
              "scaling_1_to_2_end_to_end": rates["ray-2"] / rates["ray-1"],
              "scaling_1_to_2_steady": steady["ray-2"] / steady["ray-1"],
              "cpus": os.cpu_count(), "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "corpus.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| run | seconds | videos/s end to end | videos/s after the first shard |\n|---|---|---|---|")
    for k in seconds:
        print(f"| {k} | {seconds[k]:.1f} | {rates[k]:.2f} | {steady[k]:.2f} |")
    print(f"Ray at 1 actor vs single, time per video: {100 * result['ray_1_overhead_end_to_end']:+.1f}% end to "
          f"end, {100 * result['ray_1_overhead_steady']:+.1f}% steady; 1 -> 2 actors: "
          f"{result['scaling_1_to_2_end_to_end']:.2f}x / {result['scaling_1_to_2_steady']:.2f}x; "
          f"decode {parts['decode_s_per_video']:.3f} s/video, model "
          f"{parts['model_s_per_video']:.3f} s/video ({parts['clips_per_video']} clips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
