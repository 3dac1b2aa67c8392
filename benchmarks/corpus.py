"""Corpus jobs on Ray against the single-process ``embed``: videos/s on the same files.

    python benchmarks/corpus.py [--videos 48] [--width 256] [--layers 6] [--image 112] [--out DIR]

Measures, on Kinetics-like videos (10 s, 340x256, 30 fps, H.264; cached like ``loader.py``'s)
and a DiST model with a random small CLIP saved as a model folder:

- ``single``: ``dist_video.load_model(...).embed`` (``embed_files``) in this process, one torch thread
  (model load included);
- ``ray-1-batch-1``, ``ray-1`` / ``ray-2``: :func:`dist_video.corpus.run_corpus` with 1 and 2
  CPU actors (one torch thread each; 1 video per model call, as the single process, or 4) on a
  local Ray started once beforehand with ``actors + 1`` logical CPUs (the extra one runs the
  decode tasks); actor start and model load included, ``ray.init`` not;

each at two job sizes (a quarter of ``--videos``, and all of them) after an uncounted warm-up job:
the marginal time per video (the difference over the difference in videos) leaves the fixed
costs out (actors start and load the model in every job);
- the decode rate (uint8 test clips per video, one core) and the model rate (videos/s of the
  model alone on decoded clips, one thread): the two halves of the pipeline, for sizing.

Writes ``corpus.json`` (``corpus-one-core.json`` with ``--one-core``) and prints a Markdown table.
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
from dist_video import load_model  # noqa: E402
from dist_video.engine.predict import DEFAULT_PREPROCESS  # noqa: E402


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


def single_process(model: Path, files: list[str]) -> float:
    """Seconds of ``embed_files`` on ``files`` in this process, model load included."""
    t0 = time.perf_counter()
    result = load_model(str(model), device="cpu", clip_dtype="fp32").embed(files)
    assert result.embeddings.shape[0] == len(files) and not result.errors
    return time.perf_counter() - t0


def halves(model: Path, files: list[str]) -> dict:
    """Seconds per video of the decode (uint8 clips) and of the model on them, one thread each."""
    loaded = load_model(str(model), device="cpu", clip_dtype="fp32")
    fused, preprocess = loaded.inference(), loaded.preprocess
    t0 = time.perf_counter()
    clips = [corpus_uint8_clips(f, preprocess, num_frames=fused.config.num_frames) for f in files]
    decode = (time.perf_counter() - t0) / len(files)
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in clips:
            fused.encode_video(normalize_clips(c, preprocess["mean"], preprocess["std"]))
    return {"decode_s_per_video": decode, "model_s_per_video": (time.perf_counter() - t0) / len(files),
            "clips_per_video": int(clips[0].shape[0])}


def on_ray(model: Path, files: list[str], actors: int, out: Path, batch_size: int) -> float:
    """Seconds of a corpus job on ``files`` (Ray already started), actor start and model load included."""
    t0 = time.perf_counter()
    summary = run_corpus(str(model), files, out, actors=actors, batch_size=batch_size, shard_rows=64,
                         progress=False)
    assert summary.videos == len(files) and summary.errors == 0, summary.line()
    return time.perf_counter() - t0


#: The Ray runs: (name, actors, videos per model call). Batch 1 calls the model per video, as
#: the single-process embed does: Ray's own cost; batch 4 batches across videos.
RAY_RUNS = (("ray-1-batch-1", 1, 1), ("ray-1", 1, 4), ("ray-2", 2, 4))


def measure(model: Path, files: list[str], sizes: tuple[int, int], work: Path) -> dict:
    """Seconds of each run at both job sizes: {run: [seconds at sizes[0], seconds at sizes[1]]}."""
    import ray

    single_process(model, files[:2])  # warm-up: imports, first decoder and kernel calls
    runs = {"single": [single_process(model, files[:n]) for n in sizes]}
    for name, actors, batch in RAY_RUNS:
        ray.init(num_cpus=actors + 1, _node_ip_address="127.0.0.1", include_dashboard=False,
                 logging_level="WARNING")
        try:
            # warm-up: Ray's worker processes start and import once, then serve both measured jobs
            on_ray(model, files[:actors + 2], actors, work / f"warm-{name}", batch)
            runs[name] = [on_ray(model, files[:n], actors, work / f"out-{name}-{n}", batch) for n in sizes]
        finally:
            ray.shutdown()
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--image", type=int, default=112)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "dist-video-bench-videos"))
    p.add_argument("--one-core", action="store_true", help="pin this process and everything it starts (Ray "
                   "included) to one core: Ray's cost against the single process on equal hardware")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["OMP_NUM_THREADS"] = "1"  # Ray's workers inherit it: one torch thread per actor
    torch.set_num_threads(1)
    sizes = (args.videos // 4, args.videos)
    files = [str(f) for f in kinetics_like_videos(Path(args.cache), args.videos, None)]
    work = Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    try:
        model = make_model(work / "model", args.width, args.layers, args.image, args.frames)
        runs = measure(model, files, sizes, work)
        parts = halves(model, files[:8])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The marginal time per video: the fixed costs (Ray's workers and actors starting, the model
    # loading) cancel between the two job sizes.
    marginal = {k: (t[1] - t[0]) / (sizes[1] - sizes[0]) for k, t in runs.items()}
    rates = {k: args.videos / t[1] for k, t in runs.items()}
    result = {"sizes": sizes, "model": vars(args), "seconds": runs, "videos_per_s": rates,
              "marginal_videos_per_s": {k: 1 / v for k, v in marginal.items()}, **parts,
              "ray_1_batch_1_marginal_overhead": marginal["ray-1-batch-1"] / marginal["single"] - 1,
              "ray_1_marginal_overhead": marginal["ray-1"] / marginal["single"] - 1,
              "scaling_1_to_2_marginal": marginal["ray-1"] / marginal["ray-2"],
              "affinity": sorted(os.sched_getaffinity(0)), "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "corpus-one-core.json" if args.one_core else "corpus.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| run | seconds at {sizes[0]} / {sizes[1]} videos | videos/s end to end at {sizes[1]} "
          "| marginal videos/s |\n|---|---|---|---|")
    for k, t in runs.items():
        print(f"| {k} | {t[0]:.1f} / {t[1]:.1f} | {rates[k]:.2f} | {1 / marginal[k]:.2f} |")
    print(f"Ray at 1 actor vs single, marginal time per video: batch 1 "
          f"{100 * result['ray_1_batch_1_marginal_overhead']:+.1f}%, "
          f"batch 4 {100 * result['ray_1_marginal_overhead']:+.1f}%; "
          f"1 -> 2 actors: {result['scaling_1_to_2_marginal']:.2f}x; "
          f"decode {parts['decode_s_per_video']:.3f} s/video, model "
          f"{parts['model_s_per_video']:.3f} s/video ({parts['clips_per_video']} clips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
