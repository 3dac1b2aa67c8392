"""The summary of ``scripts/gpu_check.sh``: ``summary.json`` and ``summary.md`` in ``OUT`` from
its ``steps.jsonl``, ``environment.json``/``preflight.json``, the tests' JUnit XML and the
benchmarks' JSON. Standard library only (it runs whatever the interpreter lacks).

Environment: ``OUT`` (the check's folder), ``DEVICE``, ``SECONDS_SO_FAR``."""

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])
bench = out / "benchmarks"


#: Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by name fragment.
NOMINAL_BF16_TFLOPS = (("GH200", 989.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                       ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                       ("L4", 121.0))


def nominal_bf16_tflops(gpu_name: str):
    """The datasheet's dense bf16 peak of the GPU called ``gpu_name``, or None when not listed."""
    return next((tflops for fragment, tflops in NOMINAL_BF16_TFLOPS if fragment in gpu_name), None)


def load(name):
    path = bench / name if not (out / name).is_file() else out / name
    return json.loads(path.read_text()) if path.is_file() else None


steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
env = load("environment.json") or {}
summary = {"device": os.environ["DEVICE"], "environment": env, "preflight": load("preflight.json") or {},
           "steps": steps, "seconds": int(os.environ["SECONDS_SO_FAR"])}
stopped = (out / "stopped.txt").read_text().strip() if (out / "stopped.txt").is_file() else None
if stopped:
    summary["stopped"] = stopped
tests = {}
for xml in ("tests.xml",):
    if (out / xml).is_file():
        try:
            root = ET.parse(out / xml).getroot()
        except ET.ParseError:
            continue
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            tests[key] = tests.get(key, 0) + int(suite.get(key, 0))
summary["tests"] = tests

inference = load("inference.json")
if inference:
    summary["inference_clips_per_second"] = [
        {"batch": t["batch"], "dist": t["dist_clips_per_second"], "clip_alone": t["clip_clips_per_second"],
         "dist_over_clip_time": t["ratio_dist_to_clip"],
         **({"dist_compiled": t["dist_compiled_clips_per_second"],
             "clip_alone_compiled": t["clip_compiled_clips_per_second"],
             "dist_compile_seconds": t["dist_compile_seconds"], "clip_alone_compile_seconds": t["clip_compile_seconds"]}
            if "dist_compiled_clips_per_second" in t else {}),
         **({"compile_error": t["compile_error"]} if "compile_error" in t else {})} for t in inference["throughput"]]
suffix = "" if summary["device"] == "cpu" else "_cuda"
cost = load(f"train_cost{suffix}.json")
if cost:
    biggest = max(r["batch"] for r in cost["runs"])
    summary["training"] = {
        "resolution": cost["resolution"], "batch": biggest,
        "clips_per_second": {r["method"]: r["batch"] / r["step_seconds"] for r in cost["runs"]
                             if r["batch"] == biggest},
        "memory_per_clip_mib": {m: v / 2**20 for m, v in cost.get("memory_per_clip_bytes", {}).items()},
        "peak_memory_mib": {r["method"]: r["peak_memory_bytes"] / 2**20 for r in cost["runs"]
                            if r["batch"] == biggest},
        "step_ms": {r["method"]: 1000 * r["step_seconds"] for r in cost["runs"] if r["batch"] == biggest}}
    bound = cost.get("dist_flop_bound")
    dist_rate = summary["training"]["clips_per_second"].get("dist")
    if bound and dist_rate:
        achieved = bound["step_gflops_per_clip"] * dist_rate / 1000
        summary["training"]["dist_tflops"] = {
            "achieved": achieved, "step_gflops_per_clip": bound["step_gflops_per_clip"],
            "bf16_matmul_measured": bound["bf16_matmul_tflops"],
            "bf16_dense_nominal": nominal_bf16_tflops((env.get("gpus") or [{}])[0].get("name", ""))}
loader = load("loader.json")
if loader:
    sets = loader["sets"]
    first = next(iter(sets))
    per_core = sets[first]["clips_per_second"].get("pyav/loader")
    summary["loader"] = {"set": first, "clips_per_second_per_core": per_core,
                         "dataloader_clips_per_second": {w: v["clips_per_second"]
                                                         for w, v in loader.get("dataloader", {}).items()}}
    dist_rate = summary.get("training", {}).get("clips_per_second", {}).get("dist")
    if per_core and dist_rate:
        summary["loader"]["training_clips_per_second_dist"] = dist_rate
        summary["loader"]["loader_cores_per_device"] = math.ceil(dist_rate / per_core)
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

failed = [s for s in steps if s["status"] == "failed"]
gpus = ", ".join(f"{g['name']} (compute {g['capability']}, {g['memory_gib']} GiB)" for g in env.get("gpus", []))
lines = ["# dist-video GPU check", "",
         f"Device: **{summary['device']}**; GPUs: {gpus or 'none'}; {env.get('cores', '?')} CPU cores.  ",
         f"PyTorch {env.get('torch', '?')} (CUDA {env.get('cuda') or 'none'}, cuDNN {env.get('cudnn', 'none')}), "
         f"dist-video {env.get('dist_video', '?')}, PyAV {env.get('av') or 'missing'}, Python {env.get('python', '?')}"
         + (f", driver {env['driver']}" if env.get("driver") else "") + ".  "]
if env.get("precision_auto"):
    p = env["precision_auto"]
    lines.append(f"Precision `auto` here: branch autocast {p['branch_autocast']}"
                 f"{' with a GradScaler' if p['grad_scaler'] else ''}, frozen CLIP {p['frozen_clip']}.")
skipped = [s["step"] for s in steps if s["status"] == "skipped"]
result = ("FAILED: " + ", ".join(s["step"] for s in failed) if failed
          else "no step failed" + (f" ({len(skipped)} skipped: see why below)" if skipped else ""))
if stopped:
    result = f"STOPPED: {stopped}"
lines += ["", f"Result: **{result}** "
          f"({summary['seconds']} s in all).", "", "| step | status | seconds |", "| --- | --- | --- |"]
for s in steps:
    lines.append(f"| {s['step']} | {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} | "
                 f"{s.get('seconds', '')} |")
missing = summary["preflight"].get("missing", {})
if missing:
    lines += ["", "Missing packages at the start: " + "; ".join(f"{g}: {', '.join(m)}" for g, m in missing.items())
              + "."]
if tests:
    lines += ["", f"Tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped."]
if inference:
    lines += ["", "## Inference (fused form, ViT-B/16, 16 frames, 224 x 224)", "",
              "| batch | DiST clips/s | CLIP alone clips/s | DiST time / CLIP time |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['batch']} | {t['dist']:.1f} | {t['clip_alone']:.1f} | {t['dist_over_clip_time']:.2f} |"
              for t in summary["inference_clips_per_second"]]
    compiled = [t for t in summary["inference_clips_per_second"] if "dist_compiled" in t]
    if compiled:
        lines += ["", "With `torch.compile` (compile: the first call's seconds less an eager call's):", "",
                  "| batch | DiST clips/s | CLIP alone clips/s | DiST compile (s) | CLIP alone compile (s) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {t['batch']} | {t['dist_compiled']:.1f} | {t['clip_alone_compiled']:.1f} | "
                  f"{t['dist_compile_seconds']:.0f} | {t['clip_alone_compile_seconds']:.0f} |" for t in compiled]
    lines += [f"\n`torch.compile` failed at batch {t['batch']}: {t['compile_error']}"
              for t in summary["inference_clips_per_second"] if "compile_error" in t]
if cost:
    t = summary["training"]
    lines += ["", f"## Training (ViT-B/16 at {t['resolution']} x {t['resolution']}, batch {t['batch']})", "",
              "| method | step (ms) | clips/s | peak memory (MiB) | peak memory per clip (MiB) "
              "| memory per extra clip (MiB) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m, rate in t["clips_per_second"].items():
        per_clip = t["memory_per_clip_mib"].get(m)
        peak = t["peak_memory_mib"][m]
        lines.append(f"| {m} | {t['step_ms'][m]:.0f} | {rate:.2f} | {peak:.0f} | {peak / t['batch']:.0f} | "
                     f"{'' if per_clip is None else f'{per_clip:.0f}'} |")
    if "dist_tflops" in t:
        f = t["dist_tflops"]
        nominal = f["bf16_dense_nominal"]
        lines.append(f"\nDiST's training step does {f['step_gflops_per_clip']:.0f} GFLOP per clip (CLIP forward + "
                     f"3 x the branch's forward): **{f['achieved']:.1f} TFLOP/s** achieved, against "
                     f"{f['bf16_matmul_measured']:.1f} TFLOP/s measured for a bf16 matmul here"
                     + (f" and the datasheet's dense bf16 peak of {nominal:.0f} ({100 * f['achieved'] / nominal:.0f}%)."
                        if nominal else " (no datasheet peak listed for this device)."))
    rates = t["clips_per_second"]
    if "dist" in rates and "full-finetune" in rates:
        ratio = rates["dist"] / rates["full-finetune"]
        lines.append(f"\nDiST trains {ratio:.2f}x as many clips/s as full fine-tuning. "
                     + ("Peak memory: GPU `max_memory_allocated`." if summary["device"] == "cuda"
                        else "Peak memory: the process's peak RSS (on a GPU: `max_memory_allocated`)."))
if loader:
    lo = summary["loader"]
    lines += ["", "## Loader", "", f"Decode + sample + augment (224) on one core: "
              f"{lo['clips_per_second_per_core']:.1f} clips/s ({lo['set']}, 340 x 256 videos)."]
    if "loader_cores_per_device" in lo:
        lines.append(f"DiST trains {lo['training_clips_per_second_dist']:.1f} clips/s on this device, so it needs "
                     f"about {lo['loader_cores_per_device']} loader worker(s) (one core each) per device "
                     "to keep up.")
lines += ["", "Logs: `logs/`; the benchmarks' own JSON and markdown: `benchmarks/`."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
