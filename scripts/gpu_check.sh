#!/usr/bin/env bash
# Check dist-video on this machine in one call, also on a compute node without network access:
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--python PATH] [--wheelhouse DIR]
#                        [--tests device|full|none] [--skip STEP,STEP] [--step-timeout SECONDS]
#
# --python PATH    use that interpreter as it is (its PyTorch, its packages): the package comes
#                  from src/ through PYTHONPATH and the CLI runs as `PATH -m dist_video.cli`.
#                  Nothing is downloaded. Without it: .venv through scripts/install.sh (network).
# --wheelhouse DIR install the missing packages whose wheels are in DIR, offline
#                  (pip install --no-index --find-links DIR): into the interpreter when its
#                  site-packages is writable, else into OUT/site-packages (put on PYTHONPATH;
#                  then without dependencies: bring them too, e.g. wcwidth for ftfy).
# --tests          device (default): the tests that exercise the device (GPU readiness, tests
#                  taking the `device` fixture); full: the whole suite; none.
# --skip           steps to leave out: preflight's later steps by name (see below).
# --step-timeout   the time limit of each step (default 300 s); a step past it fails.
#
# Steps, and the packages each needs besides PyTorch, NumPy and PyYAML (the core):
#   preflight             which packages are missing; whether PyTorch sees CUDA
#   wheelhouse            (with --wheelhouse) the offline install of the missing ones
#   environment           GPUs, versions, the precision "auto" picks
#   tests                 pytest, av (PyAV: anything that decodes), scikit-learn (synthetic videos);
#                         --tests full also: ftfy + regex (the tokenizer), safetensors, matplotlib,
#                         the serving extra (fastapi, uvicorn, python-multipart, httpx) and
#                         onnx/onnxscript/onnxruntime, whose tests are skipped without them
#   cli-train             one process: the CLI's make-synthetic, train (2 loader workers,
#                         precision auto: bf16 on compute >= 8.0) and evaluate on the device;
#                         av, scikit-learn, safetensors, matplotlib
#   nccl                  with 2+ GPUs: 2-process NCCL training + evaluation; as cli-train
#   benchmark-inference   DiST vs CLIP alone, eager and torch.compile; no extra package
#   benchmark-train-cost  (GPU) DiST, full fine-tuning, adapter; matplotlib
#   benchmark-loader      av, scikit-learn
# A step whose packages are missing is skipped and says which; a failed set-up (preflight,
# wheelhouse, environment) stops the check with its reason. Results: summary.md and
# summary.json (per step: passed/failed/skipped, seconds, reason), logs/, benchmarks/ under
# --out (default gpu-check-<UTC time>): one folder to pack. Exit status 0 when nothing failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

device=""
out=""
python=""
wheelhouse=""
tests_mode=device
skip_steps=""
step_timeout=300
while [ $# -gt 0 ]; do
    case "$1" in
        --device|--out|--python|--wheelhouse|--tests|--skip|--step-timeout)
            [ $# -ge 2 ] || { echo "gpu_check: $1 needs a value" >&2; exit 2; }
            value="$2"; opt="$1"; shift 2 ;;
        --*=*) opt="${1%%=*}"; value="${1#*=}"; shift ;;
        --full-tests) opt=--tests; value=full; shift ;;
        -h|--help) sed -n '2,39p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    case "$opt" in
        --device) device="$value" ;;
        --out) out="$value" ;;
        --python) python="$value" ;;
        --wheelhouse) wheelhouse="$value" ;;
        --tests) tests_mode="$value" ;;
        --skip) skip_steps="$skip_steps,$value" ;;
        --step-timeout) step_timeout="$value" ;;
        *) echo "gpu_check: unknown argument '$opt' (see --help)" >&2; exit 2 ;;
    esac
done
gpu_visible() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if [ -z "$device" ]; then
    if gpu_visible; then device=cuda; else device=cpu; fi
fi
case "$device" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
case "$tests_mode" in device|full|none) ;; *) echo "gpu_check: --tests must be device, full or none" >&2; exit 2 ;; esac
case "$step_timeout" in ''|*[!0-9]*) echo "gpu_check: --step-timeout must be whole seconds" >&2; exit 2 ;; esac
if [ -n "$wheelhouse" ] && [ ! -d "$wheelhouse" ]; then
    echo "gpu_check: --wheelhouse $wheelhouse is not a folder" >&2; exit 2
fi
[ -n "$wheelhouse" ] && wheelhouse="$(cd "$wheelhouse" && pwd)"
out="${out:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out/logs" "$out/benchmarks" || exit 2
out="$(cd "$out" && pwd)"
if [ -n "$python" ]; then
    command -v "$python" >/dev/null 2>&1 || { echo "gpu_check: --python $python is not an executable" >&2; exit 2; }
    PY="$(command -v "$python")"
else
    VENV="${VENV:-.venv}"
    PY="$VENV/bin/python"
fi
STEPS="$out/steps.jsonl"
: > "$STEPS"
started=$(date +%s)
export PYTHONUNBUFFERED=1
# the venv this script makes sees only its own packages; --python's interpreter is used as it is
# (its user site included: PyTorch may be installed there)
[ -n "$python" ] || export PYTHONNOUSERSITE=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PY ROOT out device tests_mode
echo "gpu_check: device $device, python $PY, results in $out"

record() {  # record NAME STATUS SECONDS REASON
    "${PY_STDLIB:-python3}" - "$STEPS" "$@" <<'EOF'
import json, sys
path, name, status, seconds, reason = sys.argv[1:6]
entry = {"step": name, "status": status, "seconds": int(seconds)}
if reason:
    entry["reason"] = reason
with open(path, "a") as f:
    f.write(json.dumps(entry) + "\n")
EOF
}

skipped_by_user() { case ",$skip_steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME COMMAND...: COMMAND (a function of this script or a program) under the time limit,
# its output in logs/NAME.log; records passed/failed and the seconds. A command that prints
# "reason: ..." as its last line of failure gives the summary that reason.
step() {
    local name="$1"; shift
    if skipped_by_user "$name"; then skip "$name" "--skip $name"; return 0; fi
    local t0 rc reason="" status=passed log="$out/logs/$name.log"
    t0=$(date +%s)
    echo "== $name"
    if declare -F "$1" >/dev/null; then
        timeout -k 10 "$step_timeout" bash -c '"$@"' step "$@" > "$log" 2>&1
    else
        timeout -k 10 "$step_timeout" "$@" > "$log" 2>&1
    fi
    rc=$?
    if [ "$rc" -ne 0 ]; then
        status=failed
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            reason="timed out after $step_timeout s (--step-timeout)"
        else
            reason="$(grep '^reason: ' "$log" | tail -n 1 | cut -c9-)"
            [ -z "$reason" ] && reason="exit status $rc; see logs/$name.log"
        fi
    fi
    local seconds=$(( $(date +%s) - t0 ))
    record "$name" "$status" "$seconds" "$reason"
    echo "   $status in $seconds s${reason:+ ($reason)} (log: logs/$name.log)"
    [ "$status" = failed ] && tail -n 5 "$log" | sed 's/^/   | /'
    return "$rc"
}

skip() {  # skip NAME REASON
    record "$1" skipped 0 "$2"
    echo "== $1: skipped ($2)"
}

# missing MODULE...: the modules among these that the interpreter cannot import (empty: none)
missing() {
    "$PY" - "$@" <<'EOF' 2>/dev/null
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

# needs STEP MODULE...: true when all import; else the step is skipped with what is missing
needs() {
    local name="$1"; shift
    local absent
    absent="$(missing "$@")"
    [ -z "$absent" ] && return 0
    skip "$name" "needs $(echo "$absent" | sed 's/ /, /g') (missing from $PY; bring the wheels with --wheelhouse)"
    return 1
}

stop() {  # a failed set-up: write the summary and stop
    echo "gpu_check: stopped: $1" >&2
    echo "$1" > "$out/stopped.txt"
    summary
    exit 1
}

summary() {
    OUT="$out" DEVICE="$device" SECONDS_SO_FAR=$(( $(date +%s) - started )) "${PY_STDLIB:-python3}" \
        "$ROOT/scripts/gpu_check_summary.py" || echo "gpu_check: the summary could not be written" >&2
}
PY_STDLIB=python3
command -v python3 >/dev/null 2>&1 || PY_STDLIB="$PY"
export PY_STDLIB

# ---------------------------------------------------------------------------- set-up
install_venv() {
    if [ -x "$PY" ] && "$PY" -c 'import dist_video, pytest, sklearn, av, ftfy' 2>/dev/null \
        && { [ "$device" = cpu ] || "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; }; then
        echo "the environment in $VENV is installed already"
    else
        VENV="$VENV" scripts/install.sh test || { echo "reason: scripts/install.sh failed (it needs the network;" \
            "offline, pass --python with an interpreter that has PyTorch)"; return 1; }
    fi
}
export -f install_venv
if [ -z "$python" ]; then
    export VENV
    step install install_venv || stop "$(tail -n 1 "$out/logs/install.log" | sed 's/^reason: //')"
fi

preflight() {
    "$PY" - <<'EOF'
import importlib.util, json, os, sys

groups = {"core": ["torch", "numpy", "yaml"], "decoding (PyAV)": ["av"], "synthetic videos": ["sklearn"],
          "saving models": ["safetensors"], "plots": ["matplotlib"], "tokenizer": ["ftfy", "regex"],
          "tests": ["pytest"], "serving extra": ["fastapi", "uvicorn", "multipart", "httpx"],
          "export extra": ["onnx", "onnxscript", "onnxruntime"]}
state = {"python": sys.executable, "version": sys.version.split()[0], "missing": {}}
for group, modules in groups.items():
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        state["missing"][group] = absent
if "torch" in state["missing"].get("core", []):
    print(json.dumps(state, indent=2))
    print(f"reason: {sys.executable} has no PyTorch; pass --python with an interpreter that has it")
    sys.exit(1)
import torch

state.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
             gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
with open(os.path.join(os.environ["out"], "preflight.json"), "w") as f:
    json.dump(state, f, indent=2)
for group, absent in state["missing"].items():
    print(f"missing ({group}): {', '.join(absent)}")
print(f"PyTorch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (a CPU-only build)'}; "
      f"CUDA available: {state['cuda_available']} ({state['gpus']} GPU(s))")
if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
    print(f"reason: PyTorch {torch.__version__} at {sys.executable} is older than 2.5, which dist-video needs "
          "(weights-only loading with allowed types)")
    sys.exit(1)
if os.environ["device"] == "cuda" and not state["cuda_available"]:
    why = "it is a CPU-only build" if torch.version.cuda is None else "no GPU or driver visible to it"
    print(f"reason: --device cuda, but PyTorch {torch.__version__} at {sys.executable} sees no CUDA device ({why})")
    sys.exit(1)
EOF
}
export -f preflight
step preflight preflight || stop "preflight: $(grep '^reason: ' "$out/logs/preflight.log" | tail -n 1 | cut -c9-)"
sed -n '/^missing\|^PyTorch/p' "$out/logs/preflight.log" | sed 's/^/   /'

# The distributions behind the modules (pip names) that a wheelhouse may bring.
DISTRIBUTIONS="av:av ftfy:ftfy regex:regex wcwidth:wcwidth yaml:PyYAML numpy:numpy sklearn:scikit-learn \
safetensors:safetensors tqdm:tqdm matplotlib:matplotlib pytest:pytest fastapi:fastapi uvicorn:uvicorn \
multipart:python-multipart httpx:httpx onnx:onnx onnxscript:onnxscript onnxruntime:onnxruntime"
export DISTRIBUTIONS wheelhouse

install_wheelhouse() {
    local wanted=() pair module dist
    for pair in $DISTRIBUTIONS; do
        module="${pair%%:*}"; dist="${pair#*:}"
        [ -n "$(missing "$module")" ] || continue
        # a wheel or source archive of it in the wheelhouse (file names: lower case, _ for -)
        if ls "$wheelhouse" | tr 'A-Z' 'a-z' | grep -q "^$(echo "$dist" | tr 'A-Z-' 'a-z_')-"; then
            wanted+=("$dist")
        else
            echo "not in the wheelhouse: $dist (module $module)"
        fi
    done
    if [ "${#wanted[@]}" -eq 0 ]; then
        echo "nothing to install from $wheelhouse"
        return 0
    fi
    "$PY" -m pip --version >/dev/null 2>&1 || { echo "reason: $PY has no pip to install ${wanted[*]} with"; return 1; }
    local pip=("$PY" -m pip install --disable-pip-version-check --no-index --find-links "$wheelhouse"
               --no-build-isolation)
    if "$PY" -c 'import os, sys, sysconfig; sys.exit(0 if os.access(sysconfig.get_paths()["purelib"], os.W_OK) else 1)'
    then
        echo "installing ${wanted[*]} into $PY from $wheelhouse (offline)"
        "${pip[@]}" "${wanted[@]}" || { echo "reason: pip could not install ${wanted[*]} from $wheelhouse offline"; return 1; }
    else
        echo "installing ${wanted[*]} into $out/site-packages (the interpreter's site-packages is read-only)"
        "${pip[@]}" --no-deps --target "$out/site-packages" "${wanted[@]}" \
            || { echo "reason: pip could not install ${wanted[*]} from $wheelhouse into $out/site-packages"; return 1; }
    fi
}
export -f install_wheelhouse missing
if [ -n "$wheelhouse" ]; then
    step wheelhouse install_wheelhouse || stop "wheelhouse: $(grep '^reason: ' "$out/logs/wheelhouse.log" | tail -n 1 | cut -c9-)"
    [ -d "$out/site-packages" ] && export PYTHONPATH="$out/site-packages:$PYTHONPATH"
fi

environment() {
    "$PY" - <<'EOF'
import importlib.util, json, os, platform, subprocess

try:
    import torch

    import dist_video
    from dist_video.classifier import resolve_clip_dtype
except ImportError as e:
    raise SystemExit(f"reason: dist_video does not import from src/: {e}")
try:
    from dist_video.engine.train import resolve_precision
except ImportError as e:  # the training engine decodes videos: PyAV
    print(f"the precision 'auto' picks for training is not shown: {e}")
    resolve_precision = None

device = os.environ["device"]
av = None
if importlib.util.find_spec("av") is not None:
    import av
info = {"device": device, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "dist_video": dist_video.__version__,
        "av": av.__version__ if av else None, "cores": len(os.sched_getaffinity(0)), "gpus": []}
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
dev = torch.device("cuda:0" if device == "cuda" else "cpu")
names = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
if resolve_precision is not None:
    info["precision_auto"] = {"branch_autocast": names[resolve_precision("auto", dev)],
                              "grad_scaler": resolve_precision("auto", dev) == torch.float16,
                              "frozen_clip": names[resolve_clip_dtype("auto", dev)]}
with open(os.path.join(os.environ["out"], "environment.json"), "w") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info, indent=2))
EOF
}
export -f environment
step environment environment || stop "environment: $(grep '^reason: ' "$out/logs/environment.log" | tail -n 1 | cut -c9-)"
gpu_count=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null \
    || echo 0)
export gpu_count

# ---------------------------------------------------------------------------- tests
run_tests() {
    local args=(-q -p no:cacheprovider --junitxml="$out/tests.xml") files=tests rc
    local env=(DIST_VIDEO_TEST_DEVICE="$device")
    if [ "$tests_mode" = device ]; then
        # the files with tests taking the `device` fixture, and the GPU-readiness tests
        files=$(printf '%s\n' tests/test_gpu_readiness.py tests/test_gpu.py \
            $(grep -lE 'def test_[a-z0-9_]*\([^)]*\bdevice\b' tests/test_*.py) | sort -u)
        args+=(-p device_tests)
        env+=(PYTHONPATH="$ROOT/scripts:$PYTHONPATH")
    fi
    env "${env[@]}" "$PY" -m pytest "${args[@]}" $files 2>&1 | tee "$out/logs/pytest.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "reason: pytest: $(grep -E '^[0-9]+ (failed|passed|error)|^=+ .*(failed|error)' "$out/logs/pytest.txt" \
            | tail -n 1 | tr -d '='| sed 's/^ *//;s/ *$//'); $(grep -c '^FAILED\|^ERROR' "$out/logs/pytest.txt") failing:" \
            "$(grep '^FAILED\|^ERROR' "$out/logs/pytest.txt" | head -n 3 | cut -d' ' -f2 | tr '\n' ' ')"
    fi
    return "$rc"
}
export -f run_tests
if [ "$tests_mode" = none ]; then
    skip tests "--tests none"
elif skipped_by_user tests; then
    skip tests "--skip tests"
elif [ "$tests_mode" = full ] && needs tests pytest av sklearn; then
    step tests run_tests
elif [ "$tests_mode" = device ] && needs tests pytest av sklearn; then
    step tests run_tests
fi

# ---------------------------------------------------------------------------- a real CLI run
# cli_run DIR PROCESSES: make-synthetic, train (loader workers, precision auto), evaluate; the
# stand-alone evaluation agrees with the one after training (cuDNN's autotuner may pick other
# kernels: at most one video may differ).
cli_run() {
    local dir="$1" procs="$2"
    rm -rf "$dir" && mkdir -p "$dir"
    local cli=("$PY" -m dist_video.cli)
    [ "$procs" -gt 1 ] && cli=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$procs" -m dist_video.cli)
    "$PY" -m dist_video.cli make-synthetic "$dir/data" --num-train 64 --num-val 16 --workers 2 \
        || { echo "reason: make-synthetic failed"; return 1; }
    local sets=(model.method=dist model.clip=builtin:digits model.head=linear model.dist.num_frames=16
                model.dist.alpha=4 model.dist.temporal_dim=64 model.dist.integration_dim=128
                model.dist.pooling_layers=1 "model.dist.selected_layers=[0, 1]" data.format=csv
                "data.root=$dir/data" "data.train=$dir/data/train.csv" "data.val=$dir/data/val.csv"
                "data.classes=$dir/data/classes.txt" data.crop_size=48 data.test_scale=48 data.num_views=2
                data.workers=2 optim.epochs=2 train.batch_size=8 train.eval_every=0 train.precision=auto
                model.clip_dtype=auto "train.device=$device")
    local args=() s
    for s in "${sets[@]}"; do args+=(--set "$s"); done
    "${cli[@]}" train --output "$dir/run" --no-progress "${args[@]}" 2>&1 | tee "$dir/train.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "reason: dist-video train failed"; return 1; }
    if [ "$procs" -gt 1 ]; then
        grep -q "$procs process(es)" "$dir/train.log" || { echo "reason: the run did not report $procs processes"; return 1; }
    fi
    "${cli[@]}" evaluate "$dir/run/model" --config "$dir/run/config.yaml" --output "$dir/eval" --no-progress \
        || { echo "reason: dist-video evaluate failed"; return 1; }
    "$PY" - "$dir/run/eval/metrics.json" "$dir/eval/metrics.json" <<'PYEOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
print(f"after training: top-1 {a['top1']:.4f} on {a['num_videos']} videos; stand-alone: {b['top1']:.4f} on "
      f"{b['num_videos']}")
if not (a["num_videos"] == b["num_videos"] and abs(a["top1"] - b["top1"]) * a["num_videos"] <= 1 + 1e-9):
    sys.exit("reason: the stand-alone evaluation disagrees with the one after training")
PYEOF
}
export -f cli_run
cli_single() { cli_run "$out/cli-train" 1; }
nccl() { cli_run "$out/nccl" 2; }
export -f cli_single nccl
if [ "$device" = cuda ] && [ "$gpu_count" -lt 1 ]; then
    skip cli-train "PyTorch sees no CUDA device"
elif needs cli-train av sklearn safetensors; then
    step cli-train cli_single
fi
if [ "$device" != cuda ]; then
    skip nccl "--device cpu: the 2-process NCCL run needs 2+ CUDA GPUs (Gloo is in the tests)"
elif [ "$gpu_count" -lt 2 ]; then
    skip nccl "$gpu_count GPU visible; 2-process NCCL needs two"
elif needs nccl av sklearn safetensors; then
    step nccl nccl
fi

# ---------------------------------------------------------------------------- benchmarks
bench="$out/benchmarks"
export bench
if [ "$device" = cuda ]; then
    inference_args=(--batches 1 8 32 --repeats 5 --compile --no-costs)  # the cost table is the CPU run's
    train_args=(--batches 4 8 --steps 5 --rounds 1 --res 224)
else  # what fits a few minutes on a small CPU: inference throughput only
    inference_args=(--batches 1 --repeats 2 --no-costs)
    train_args=()
fi
"$PY" benchmarks/inference.py --help 2>/dev/null | grep -q -- "--compile" || inference_args=("${inference_args[@]/--compile}")
step benchmark-inference "$PY" benchmarks/inference.py --device "$device" --skip-large \
    ${inference_args[@]} --out "$bench"
if [ "${#train_args[@]}" -eq 0 ]; then
    skip benchmark-train-cost "--device cpu: 5 methods x 2 batches in fresh processes take over 10 minutes on a small CPU; run benchmarks/train_cost.py"
elif needs benchmark-train-cost matplotlib; then
    step benchmark-train-cost "$PY" benchmarks/train_cost.py --device "$device" "${train_args[@]}" --out "$bench"
fi
if needs benchmark-loader av sklearn; then
    loader_args=(--videos 1 --repeats 2 --dataloader-clips 8 --cache "$out/loader-videos")
    "$PY" benchmarks/loader.py --help 2>/dev/null | grep -q -- "--part" && loader_args+=(--part decode)
    step benchmark-loader "$PY" benchmarks/loader.py "${loader_args[@]}" --out "$bench"
fi

summary
failed=$(grep -c '"status": "failed"' "$STEPS" || true)
echo "gpu_check: done in $(( $(date +%s) - started )) s; summary: $out/summary.md"
[ "$failed" = 0 ]
