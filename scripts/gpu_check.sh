#!/usr/bin/env bash
# Check dist-video on this machine, from a fresh clone, in one command:
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--full-tests]
#
# 1. installs into .venv (scripts/install.sh: a CUDA build of PyTorch when an NVIDIA GPU is visible);
# 2. records the machine: GPUs, compute capability, versions, the precision "auto" picks there;
# 3. runs the test suite on the device (DIST_VIDEO_TEST_DEVICE; the tests not marked slow, plus
#    the GPU-readiness tests; --full-tests: all of them);
# 4. with 2+ GPUs: 2-process NCCL training + evaluation through torchrun;
# 5. the inference, training-cost and loader benchmarks with --device, at sizes that fit;
# 6. writes summary.json and summary.md under --out (default: gpu-check-<UTC time>), with every
#    step's log under logs/ and the benchmarks' own JSON and markdown under benchmarks/.
#
# --device defaults to cuda when nvidia-smi sees a GPU, else cpu. A step the machine cannot run
# (no GPU, one GPU) is reported as skipped with the reason; a failed step does not stop the
# others. Exit status: 0 when no step failed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

device=""
out=""
full_tests=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="${2:-}"; shift 2 ;;
        --device=*) device="${1#*=}"; shift ;;
        --out) out="${2:-}"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        --full-tests) full_tests=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
gpu_visible() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if [ -z "$device" ]; then
    if gpu_visible; then device=cuda; else device=cpu; fi
fi
case "$device" in
    cuda|cpu) ;;
    *) echo "gpu_check: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac
out="${out:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out/logs" "$out/benchmarks" || exit 2
out="$(cd "$out" && pwd)"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
STEPS="$out/steps.jsonl"
: > "$STEPS"
started=$(date +%s)
export PYTHONUNBUFFERED=1
echo "gpu_check: device $device, results in $out"

# step NAME COMMAND...: run it with its output in logs/NAME.log; record the status and seconds.
step() {
    local name="$1"; shift
    local t0 rc
    t0=$(date +%s)
    echo "== $name"
    "$@" > "$out/logs/$name.log" 2>&1
    rc=$?
    local status=passed
    [ "$rc" -ne 0 ] && status=failed
    printf '{"step": "%s", "status": "%s", "exit_code": %d, "seconds": %d}\n' \
        "$name" "$status" "$rc" $(( $(date +%s) - t0 )) >> "$STEPS"
    echo "   $status in $(( $(date +%s) - t0 )) s (log: logs/$name.log)"
    [ "$status" = failed ] && tail -n 5 "$out/logs/$name.log" | sed 's/^/   | /'
    return "$rc"
}

# skip NAME REASON
skip() {
    printf '{"step": "%s", "status": "skipped", "reason": "%s"}\n' "$1" "$2" >> "$STEPS"
    echo "== $1: skipped ($2)"
}

# ---------------------------------------------------------------------------- 1. install
install() {
    if [ -x "$PY" ] && "$PY" -c 'import dist_video, pytest, ruff, sklearn' 2>/dev/null \
        && { [ "$device" = cpu ] || "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; }; then
        echo "the environment in $VENV is installed already"
    else
        VENV="$VENV" scripts/install.sh test || return 1
    fi
    if [ "$device" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; then
        echo "the PyTorch in $VENV is a CPU-only build: remove $VENV and run again with the GPU visible"
        return 1
    fi
}
step install install || { echo "gpu_check: cannot continue without an installed environment" >&2; }

# ---------------------------------------------------------------------------- 2. the machine
environment() {
    DEVICE="$device" OUT="$out" "$PY" - <<'EOF'
import json, os, platform, subprocess

import av
import torch

import dist_video
from dist_video.classifier import resolve_clip_dtype
from dist_video.engine.train import resolve_precision

device = os.environ["DEVICE"]
info = {"device": device, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "dist_video": dist_video.__version__,
        "av": av.__version__, "cores": len(os.sched_getaffinity(0)), "gpus": []}
if torch.cuda.is_available():
    info["cudnn"] = torch.backends.cudnn.version()
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                             "memory_gib": round(p.total_memory / 2**30, 1)})
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
if device == "cuda" and not info["gpus"]:
    raise SystemExit("no GPU: --device cuda, but PyTorch sees no CUDA device")
dev = torch.device("cuda:0" if device == "cuda" else "cpu")
names = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
info["precision_auto"] = {"branch_autocast": names[resolve_precision("auto", dev)],
                          "grad_scaler": resolve_precision("auto", dev) == torch.float16,
                          "frozen_clip": names[resolve_clip_dtype("auto", dev)]}
with open(os.path.join(os.environ["OUT"], "environment.json"), "w") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info, indent=2))
EOF
}
step environment environment
gpu_count=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null \
    || echo 0)

# ---------------------------------------------------------------------------- 3. tests
tests() {
    local selection=(-m "not slow")
    [ "$full_tests" = 1 ] && selection=()
    DIST_VIDEO_TEST_DEVICE="$device" "$PY" -m pytest -q -p no:cacheprovider "${selection[@]}" \
        --junitxml="$out/tests.xml" tests || return 1
    if [ "$full_tests" = 0 ]; then  # the multi-process GPU-readiness test too
        DIST_VIDEO_TEST_DEVICE="$device" "$PY" -m pytest -q -p no:cacheprovider -m slow \
            --junitxml="$out/tests-readiness.xml" tests/test_gpu_readiness.py
    fi
}
if [ "$device" = cuda ] && [ "$gpu_count" -lt 1 ]; then
    skip tests "no GPU"
else
    step tests tests
fi

# ---------------------------------------------------------------------------- 4. NCCL, 2 processes
nccl() {
    local dir="$out/nccl"
    rm -rf "$dir" && mkdir -p "$dir"
    "$VENV/bin/dist-video" make-synthetic "$dir/data" --num-train 64 --num-val 16 || return 1
    local sets=(model.method=dist model.clip=builtin:digits model.head=linear model.dist.num_frames=16
                model.dist.alpha=4 model.dist.temporal_dim=64 model.dist.integration_dim=128
                model.dist.pooling_layers=1 "model.dist.selected_layers=[0, 1]" data.format=csv
                "data.root=$dir/data" "data.train=$dir/data/train.csv" "data.val=$dir/data/val.csv"
                "data.classes=$dir/data/classes.txt" data.crop_size=48 data.test_scale=48 data.num_views=2
                data.workers=2 optim.epochs=2 train.batch_size=8 train.eval_every=0 train.device=cuda)
    local args=()
    for s in "${sets[@]}"; do args+=(--set "$s"); done
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m dist_video.cli train \
        --output "$dir/run" --no-progress "${args[@]}" || return 1
    grep -q "2 process(es)" "$out/logs/nccl.log" || { echo "the run did not report 2 processes"; return 1; }
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m dist_video.cli evaluate "$dir/run/model" \
        --config "$dir/run/config.yaml" --output "$dir/eval" --no-progress || return 1
    "$PY" - "$dir/run/eval/metrics.json" "$dir/eval/metrics.json" <<'PYEOF' || return 1
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
print(f"after training: top-1 {a['top1']:.4f} on {a['num_videos']} videos; stand-alone: {b['top1']:.4f} on "
      f"{b['num_videos']}")
# the same weights and precision; cuDNN's autotuner may pick other kernels: at most one video may differ
sys.exit(0 if a["num_videos"] == b["num_videos"] and abs(a["top1"] - b["top1"]) * a["num_videos"] <= 1 + 1e-9 else 1)
PYEOF
}
if [ "$device" != cuda ] || [ "$gpu_count" -lt 1 ]; then
    skip nccl "no GPU"
elif [ "$gpu_count" -lt 2 ]; then
    skip nccl "one GPU visible; 2-process NCCL needs two"
else
    step nccl nccl
fi

# ---------------------------------------------------------------------------- 5. benchmarks
bench="$out/benchmarks"
if [ "$device" = cuda ] && [ "$gpu_count" -lt 1 ]; then
    skip benchmark-inference "no GPU"
    skip benchmark-train-cost "no GPU"
else
    if [ "$device" = cuda ]; then
        inference_args=(--batches 1 8 32 --repeats 5)
        train_args=(--batches 4 8 --steps 5 --rounds 1 --res 224)
    else  # what fits a few minutes on a small CPU: inference throughput only
        inference_args=(--batches 1 --repeats 2 --no-costs)
        train_args=()
    fi
    step benchmark-inference "$PY" benchmarks/inference.py --device "$device" --skip-large \
        "${inference_args[@]}" --out "$bench"
    if [ "${#train_args[@]}" -gt 0 ]; then
        step benchmark-train-cost "$PY" benchmarks/train_cost.py --device "$device" "${train_args[@]}" --out "$bench"
    else
        skip benchmark-train-cost "CPU: 5 methods x 2 batches in fresh processes take over 10 minutes here; run benchmarks/train_cost.py"
    fi
fi
loader_args=(--videos 1 --repeats 2 --dataloader-clips 8 --cache "$out/loader-videos")
"$PY" benchmarks/loader.py --help 2>/dev/null | grep -q -- "--part" && loader_args+=(--part decode)
step benchmark-loader "$PY" benchmarks/loader.py "${loader_args[@]}" --out "$bench"

# ---------------------------------------------------------------------------- 6. summary
OUT="$out" DEVICE="$device" SECONDS_SO_FAR=$(( $(date +%s) - started )) "$PY" - <<'EOF'
import json, math, os
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])
bench = out / "benchmarks"


def load(name):
    path = bench / name if not (out / name).is_file() else out / name
    return json.loads(path.read_text()) if path.is_file() else None


steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
env = load("environment.json") or {}
summary = {"device": os.environ["DEVICE"], "environment": env, "steps": steps,
           "seconds": int(os.environ["SECONDS_SO_FAR"])}
tests = {}
for xml in ("tests.xml", "tests-readiness.xml"):
    if (out / xml).is_file():
        root = ET.parse(out / xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            tests[key] = tests.get(key, 0) + int(suite.get(key, 0))
summary["tests"] = tests

inference = load("inference.json")
if inference:
    summary["inference_clips_per_second"] = [
        {"batch": t["batch"], "dist": t["dist_clips_per_second"], "clip_alone": t["clip_clips_per_second"],
         "dist_over_clip_time": t["ratio_dist_to_clip"]} for t in inference["throughput"]]
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
                            if r["batch"] == biggest}}
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
         f"dist-video {env.get('dist_video', '?')}, PyAV {env.get('av', '?')}, Python {env.get('python', '?')}"
         + (f", driver {env['driver']}" if env.get("driver") else "") + ".  "]
if env.get("precision_auto"):
    p = env["precision_auto"]
    lines.append(f"Precision `auto` here: branch autocast {p['branch_autocast']}"
                 f"{' with a GradScaler' if p['grad_scaler'] else ''}, frozen CLIP {p['frozen_clip']}.")
lines += ["", f"Result: **{'FAILED: ' + ', '.join(s['step'] for s in failed) if failed else 'all steps passed'}** "
          f"({summary['seconds']} s in all).", "", "| step | status | seconds |", "| --- | --- | --- |"]
for s in steps:
    lines.append(f"| {s['step']} | {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} | "
                 f"{s.get('seconds', '')} |")
if tests:
    lines += ["", f"Tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped."]
if inference:
    lines += ["", "## Inference (fused form, ViT-B/16, 16 frames, 224 x 224)", "",
              "| batch | DiST clips/s | CLIP alone clips/s | DiST time / CLIP time |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['batch']} | {t['dist']:.1f} | {t['clip_alone']:.1f} | {t['dist_over_clip_time']:.2f} |"
              for t in summary["inference_clips_per_second"]]
if cost:
    t = summary["training"]
    lines += ["", f"## Training (ViT-B/16 at {t['resolution']} x {t['resolution']}, batch {t['batch']})", "",
              "| method | clips/s | peak memory (MiB) | peak memory per clip (MiB) | memory per extra clip (MiB) |",
              "| --- | --- | --- | --- | --- |"]
    for m, rate in t["clips_per_second"].items():
        per_clip = t["memory_per_clip_mib"].get(m)
        lines.append(f"| {m} | {rate:.2f} | {t['peak_memory_mib'][m]:.0f} | {t['peak_memory_mib'][m] / t['batch']:.0f} | "
                     f"{'' if per_clip is None else f'{per_clip:.0f}'} |")
    rates = t["clips_per_second"]
    if "dist" in rates and "full-finetune" in rates:
        lines.append(f"\nDiST trains {rates['dist'] / rates['full-finetune']:.2f}x as many clips/s as full fine-tuning. "
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
EOF

failed=$(grep -c '"status": "failed"' "$STEPS" || true)
echo "gpu_check: done in $(( $(date +%s) - started )) s; summary: $out/summary.md"
[ "$failed" = 0 ]
