#!/usr/bin/env bash
# Check `scripts/gpu_check.sh --wheelhouse` as a compute node without network meets it: a Python
# that has PyTorch but lacks PyAV and ftfy, a folder of their wheels, no network.
#
#   scripts/offline_wheelhouse_check.sh [--wheelhouse DIR] [--out DIR] [-- GPU_CHECK_ARGS...]
#
# 1. the wheelhouse: DIR, or (with the network, before going offline) `pip download` of the
#    wheels of av, ftfy and wcwidth (ftfy's dependency) for this Python into OUT/wheelhouse;
# 2. a venv with this Python's packages but av, ftfy and wcwidth (scripts/python_without.py);
# 3. gpu_check.sh --device cpu --python that venv --wheelhouse DIR in `unshare -rn` (no network;
#    loopback up) with PIP_NO_INDEX=1; default GPU_CHECK_ARGS: --skip benchmark-inference;
# 4. passes when the wheelhouse step installed them offline and no step failed.
# Python: PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
wheelhouse=""
out="offline-wheelhouse-check"
while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) wheelhouse="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "offline_wheelhouse_check: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
extra=("$@")
[ "${#extra[@]}" -eq 0 ] && extra=(--skip benchmark-inference)
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
rm -rf "$out" && mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -z "$wheelhouse" ]; then
    wheelhouse="$out/wheelhouse"
    "$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: --no-deps -d "$wheelhouse" av ftfy wcwidth
fi
echo "wheelhouse: $(ls "$wheelhouse" | tr '\n' ' ')"
node_python=$("$PY" scripts/python_without.py "$out/node-venv" --pip av ftfy wcwidth)
if "$node_python" -c 'import av' 2>/dev/null || "$node_python" -c 'import ftfy' 2>/dev/null; then
    echo "offline_wheelhouse_check: the node's Python still has av or ftfy" >&2; exit 1
fi
run=(scripts/gpu_check.sh --device cpu --python "$node_python" --wheelhouse "$wheelhouse" --out "$out/check" "${extra[@]}")
if unshare -rn ip link set lo up 2>/dev/null; then
    PIP_NO_INDEX=1 unshare -rn sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}" || true
else
    echo "offline_wheelhouse_check: unshare -rn is not permitted here: running with the network, pip's index off" >&2
    PIP_NO_INDEX=1 "${run[@]}" || true
fi
"$PY" - "$out/check/summary.json" "$node_python" <<'PYEOF'
import json, subprocess, sys
summary = json.load(open(sys.argv[1]))
steps = {s["step"]: s for s in summary["steps"]}
installed = subprocess.run([sys.argv[2], "-c", "import av, ftfy; print(av.__version__, ftfy.__version__)"],
                           capture_output=True, text=True)
problems = [f"{s['step']} failed: {s.get('reason')}" for s in summary["steps"] if s["status"] == "failed"]
if steps.get("wheelhouse", {}).get("status") != "passed":
    problems.append("the wheelhouse step did not pass")
if installed.returncode:
    problems.append("av and ftfy do not import after the check")
for s in summary["steps"]:
    print(f"{s['step']}: {s['status']}{' (' + s['reason'] + ')' if s.get('reason') else ''} {s['seconds']} s")
print(f"missing at the start: {summary['preflight'].get('missing')}; installed offline: {installed.stdout.strip()}")
sys.exit("offline_wheelhouse_check: FAILED: " + "; ".join(problems) if problems else 0)
PYEOF
echo "offline_wheelhouse_check: passed (summary: $out/check/summary.md)"
