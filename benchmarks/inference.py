"""Inference cost: DiST against CLIP alone on the same frames, and the cost of every preset.

1. Throughput: clips per second of DiST (K400 ViT-B/16 8+16f: 16 dense frames, 8 through CLIP)
   and of CLIP alone on the same 8 frames (the frozen-mean model: frame embeddings averaged),
   224 x 224, random weights, each in its inference form (``model.fuse()``: bf16 where
   supported), batches of 1, 4 and 16 clips, medians over repetitions, the two models
   interleaved repetition by repetition so machine noise hits both alike.
   With ``--compile``, the same two models wrapped in ``torch.compile`` run in the same loop; the
   first call per batch size (the compile) is timed apart and left out of the medians.
2. Counted cost of one view for every published preset: multiply-accumulates from PyTorch's
   FLOP counter (FLOPs / 2) for CLIP and for the DiST branch, CLIP's attention products listed
   apart (the authors' count leaves them out), and parameters.

    python benchmarks/inference.py              # about 6 minutes on 2 CPU cores
    python benchmarks/inference.py --repeats 3 --batches 1 --skip-large   # quicker
    python benchmarks/inference.py --compile --no-costs                   # eager against torch.compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_method, machine, sync  # noqa: E402

from dist_video.dist import PRESETS  # noqa: E402
from dist_video.engine.distributed import use_fast_gpu_kernels  # noqa: E402
from dist_video.profiling import attention_macs, cost_per_view, count_parameters, inference_cost_per_view  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: The authors' counts for K400 ViT-B/16 8+16f (GMACs per view; DiST-branch parameters).
AUTHORS = {"clip_gmacs": 135.7, "branch_gmacs": 22.4}


def arch_of(preset: str) -> str:
    return "ViT-L/14" if "vit-l14" in preset else "ViT-B/16"


def throughput(batches: list[int], repeats: int, device: torch.device, compile_: bool = False) -> Iterator[dict]:
    """Seconds per batch for DiST and CLIP alone, each in its inference form (``model.fuse()``,
    bf16 where supported), interleaved; with ``compile_`` also each wrapped in ``torch.compile``.
    One row per batch size, yielded as soon as it is measured. A compile that fails is recorded
    in the row (``compile_error``) and the eager measurements go on without the compiled models."""
    models = {"dist": build_method("dist", "ViT-B/16", 16, 2, device, dist_preset="k400-vit-b16-8+16f").fuse(),
              "clip": build_method("frozen-mean", "ViT-B/16", 16, 2, device).fuse()}
    if compile_:
        models |= {f"{name}_compiled": torch.compile(models[name]) for name in ("dist", "clip")}
    for b in batches:
        video = torch.randn(b, 3, 16, 224, 224, device=device)

        def run(name):
            models[name](video)
            sync(device)

        first_call, compile_error = {}, None
        for name in list(models):  # warm-up; for a compiled model, the compile for this batch size
            t = time.perf_counter()
            try:
                run(name)
            except Exception as e:  # noqa: BLE001 - a compiler failure is a result to record, not the end of the run
                if not name.endswith("_compiled"):
                    raise
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                compile_error = f"{name}: {type(e).__name__}: {first_line}"
                models = {k: v for k, v in models.items() if not k.endswith("_compiled")}
                break
            first_call[name] = time.perf_counter() - t
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name in models:
                t = time.perf_counter()
                run(name)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        row = {"batch": b, "dist_seconds": med["dist"], "clip_seconds": med["clip"],
               "dist_clips_per_second": b / med["dist"], "clip_clips_per_second": b / med["clip"],
               "ratio_dist_to_clip": med["dist"] / med["clip"],
               "ratio_dist_to_clip_of_fastest": best["dist"] / best["clip"], "times": times}
        line = (f"batch {b}: DiST {b / med['dist']:.2f} clips/s, CLIP alone {b / med['clip']:.2f} clips/s, "
                f"time ratio {med['dist'] / med['clip']:.3f} (of the fastest runs {best['dist'] / best['clip']:.3f})")
        if compile_error:
            row["compile_error"] = compile_error
            line += f"; torch.compile failed: {compile_error}"
        elif "dist_compiled" in models:
            for name in ("dist", "clip"):
                row[f"{name}_compiled_seconds"] = med[f"{name}_compiled"]
                row[f"{name}_compiled_clips_per_second"] = b / med[f"{name}_compiled"]
                row[f"{name}_compile_seconds"] = first_call[f"{name}_compiled"] - med[name]
                row[f"{name}_compiled_speedup"] = med[name] / med[f"{name}_compiled"]
            line += (f"; compiled: DiST {row['dist_compiled_clips_per_second']:.2f} clips/s "
                     f"({row['dist_compiled_speedup']:.3f}x eager, compile {row['dist_compile_seconds']:.0f} s), "
                     f"CLIP alone {row['clip_compiled_clips_per_second']:.2f} clips/s "
                     f"({row['clip_compiled_speedup']:.3f}x, compile {row['clip_compile_seconds']:.0f} s)")
        print(line, flush=True)
        yield row


def preset_costs(device: torch.device, skip_large: bool) -> list[dict]:
    rows = []
    for name in PRESETS:
        arch = arch_of(name)
        if skip_large and (arch == "ViT-L/14" or "32+64f" in name):
            continue
        model = build_method("dist", arch, 16, 2, device, dist_preset=name).eval()
        res = model.clip.visual.image_size
        cost = cost_per_view(model, res, res)
        executed = inference_cost_per_view(model, res, res)
        params = count_parameters(model)
        row = {"preset": name, "clip": arch, "dense_frames": model.config.num_frames,
               "clip_frames": model.config.sparse_frames, "resolution": res,
               "clip_gmacs": cost["clip"] / 1e9, "branch_gmacs": cost["branch"] / 1e9,
               "total_gmacs": cost["total"] / 1e9,
               "clip_gmacs_executed_fused": executed["clip"] / 1e9,
               "branch_gmacs_executed_fused": executed["branch"] / 1e9,
               "clip_attention_gmacs_not_counted": attention_macs(model, res, res) / 1e9,
               "branch_params": sum(p.numel() for p in model.branch.parameters()),
               "trainable_params": params["trainable"], "clip_visual_params": params["clip_visual"]}
        rows.append(row)
        print(f"{name}: CLIP {row['clip_gmacs']:.1f} + branch {row['branch_gmacs']:.1f} GMACs per view; "
              f"branch {row['branch_params']:,} parameters", flush=True)
        del model
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Inference cost", "",
             f"`python benchmarks/inference.py` on {m['date']}: {m['cpu']} ({m['cores']} cores, "
             f"{m['device']}), torch {m['torch']}. Medians of {result['repeats']} repetitions.", "",
             "## DiST vs CLIP alone on the same 8 frames (K400 ViT-B/16 8+16f, 224 px), fused inference form", "",
             "| batch | DiST clips/s | CLIP alone clips/s | DiST time / CLIP time (medians) | of the fastest runs |",
             "|---|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['batch']} | {r['dist_clips_per_second']:.2f} | {r['clip_clips_per_second']:.2f} | "
                     f"{r['ratio_dist_to_clip']:.3f} | {r['ratio_dist_to_clip_of_fastest']:.3f} |")
    compiled = [r for r in result["throughput"] if "dist_compiled_seconds" in r]
    if compiled:
        lines += ["", "## Wrapped in `torch.compile` (same loop)", "",
                  "| batch | DiST clips/s | x eager | compile (s) | CLIP alone clips/s | x eager | compile (s) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['dist_compiled_clips_per_second']:.2f} | {r['dist_compiled_speedup']:.3f} | "
                  f"{r['dist_compile_seconds']:.0f} | {r['clip_compiled_clips_per_second']:.2f} | "
                  f"{r['clip_compiled_speedup']:.3f} | {r['clip_compile_seconds']:.0f} |" for r in compiled]
        lines.append("\nThe compile of a batch size: its first call's time less an eager call's median.")
    lines += [f"\n`torch.compile` failed at batch {r['batch']}: {r['compile_error']}"
              for r in result["throughput"] if "compile_error" in r]
    if not result["presets"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Cost per view of every preset (counted)", "",
              "| preset | CLIP | frames (CLIP/dense) | CLIP GMACs | branch GMACs | total "
              "| CLIP attention (not counted) | branch GMACs executed at inference | branch params |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["presets"]:
        lines.append(f"| {r['preset']} | {r['clip']} | {r['clip_frames']}/{r['dense_frames']} | "
                     f"{r['clip_gmacs']:.1f} | {r['branch_gmacs']:.2f} | {r['total_gmacs']:.1f} | "
                     f"{r['clip_attention_gmacs_not_counted']:.1f} | {r['branch_gmacs_executed_fused']:.2f} | "
                     f"{r['branch_params']:,} |")
    k = next((r for r in result["presets"] if r["preset"] == "k400-vit-b16-8+16f"), None)
    if k:
        lines += ["", f"Authors' count for k400-vit-b16-8+16f: CLIP {AUTHORS['clip_gmacs']} G + branch "
                  f"{AUTHORS['branch_gmacs']} G; ours {k['clip_gmacs']:.2f} G "
                  f"({100 * (k['clip_gmacs'] / AUTHORS['clip_gmacs'] - 1):+.1f}%) + {k['branch_gmacs']:.2f} G "
                  f"({100 * (k['branch_gmacs'] / AUTHORS['branch_gmacs'] - 1):+.1f}%). The CLIP difference is "
                  "the authors' model running CLIP's patch embedding on all 16 dense frames before keeping 8.",
                  "", "The counts are of the architecture (the training form, keys and values formed in every "
                  "pooling layer, as in the authors' code). The fused inference form (`model.fuse()`) computes "
                  "the same values with fewer products (the pooling layers' keys and values are never formed): "
                  "the 'executed at inference' column; CLIP's count is the same both ways."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16],
                    help="clips per forward (16: the evaluation default, eval.batch_size)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-large", action="store_true", help="skip ViT-L/14 and 32+64f presets in the cost table")
    ap.add_argument("--no-costs", action="store_true", help="throughput only, no cost table (scripts/gpu_check.sh)")
    ap.add_argument("--compile", action="store_true",
                    help="also time both models wrapped in torch.compile, in the same loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    use_fast_gpu_kernels(device)  # cuDNN autotuner and TF32 on a GPU, as `dist-video` runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(device), "repeats": args.repeats, "throughput": [], "presets": []}
    for row in throughput(args.batches, args.repeats, device, args.compile):
        result["throughput"].append(row)
        save(result, out)  # each batch size as it is measured: a run stopped by a time limit keeps them
    if not args.no_costs:
        result["presets"] = preset_costs(device, args.skip_large)
        save(result, out)
    print(markdown(result))


def save(result: dict, out: Path) -> None:
    (out / "inference.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "inference.md").write_text(markdown(result))

if __name__ == "__main__":
    main()
