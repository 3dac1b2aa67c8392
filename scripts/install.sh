#!/usr/bin/env bash
# Set up a virtual environment in .venv with dist-video installed in editable mode.
#   scripts/install.sh            runtime dependencies
#   scripts/install.sh test       runtime + test dependencies, and the system packages some tests use
#                                 (FFmpeg's shared libraries for torchcodec, Chromium for the page's
#                                 browser test): installed with apt-get when run as root, else the
#                                 command that installs them is printed and those tests are skipped
# PyTorch: a CUDA build when an NVIDIA GPU is visible, otherwise a CPU-only build
# (a CPU wheel that pip can already see offline is preferred; else PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

gpu_visible=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu_visible=1; fi
# keep the venv's PyTorch when it is recent enough and, with a GPU visible, a CUDA build
if ! GPU_VISIBLE=$gpu_visible "$VENV/bin/python" -c 'import os, sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 5) and (os.environ["GPU_VISIBLE"] == "0" or torch.version.cuda) else 1)' 2>/dev/null; then
    if [ "$gpu_visible" = 1 ]; then
        echo "install: NVIDIA GPU found, installing a CUDA build of PyTorch"
        "${pip[@]}" install --force-reinstall --no-deps "torch>=2.5,<3" && "${pip[@]}" install "torch>=2.5,<3"
    else
        tmp=$(mktemp -d)
        if "${pip[@]}" download --no-index --no-deps --only-binary=:all: -d "$tmp" "torch>=2.5,<3" >/dev/null 2>&1 \
            && ls "$tmp"/torch-*+cpu-*.whl >/dev/null 2>&1; then
            echo "install: no GPU, installing the local CPU build $(basename "$tmp"/torch-*.whl)"
            "${pip[@]}" install "$tmp"/torch-*.whl
        else
            echo "install: no GPU, installing a CPU build of PyTorch from PyTorch's CPU wheel index"
            "${pip[@]}" install "torch>=2.5,<3" --index-url https://download.pytorch.org/whl/cpu
        fi
        rm -rf "$tmp"
    fi
fi

# System packages of the tests: Chromium + chromedriver (tests/test_serve_browser.py) and FFmpeg's
# shared libraries (the torchcodec backend's tests in tests/test_data_decoding.py).
install_test_system_packages() {
    local missing=()
    if ! command -v chromedriver >/dev/null 2>&1 \
        || ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
        missing+=(chromium chromium-driver)
    fi
    if ! ldconfig -p 2>/dev/null | grep 'libavdevice\.so\.' >/dev/null; then
        missing+=(ffmpeg-libraries)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    local command="apt-get install ${missing[*]/ffmpeg-libraries/ffmpeg}"
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install: ${missing[*]} missing: the browser and torchcodec tests will be skipped; to run them: sudo $command"
        return 0
    fi
    echo "install: installing the tests' system packages (${missing[*]})"
    local packages=("${missing[@]/ffmpeg-libraries/}") libs=""
    if apt-get update -qq; then
        if [[ " ${missing[*]} " == *" ffmpeg-libraries "* ]]; then
            libs=$(apt-cache pkgnames | grep -E '^lib(avcodec|avdevice|avfilter|avformat|avutil|swresample|swscale)[0-9]+$' \
                   | sort || true)
        fi
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${packages[*]} $libs >/dev/null && return 0
    fi
    echo "install: the tests' system packages could not be installed; those tests will be skipped ($command)"
}

if [[ ",$extras," == *",test,"* ]]; then
    install_test_system_packages
fi

if [ -n "$extras" ]; then
    "${pip[@]}" install -e ".[$extras]"
else
    "${pip[@]}" install -e .
fi
"$VENV/bin/python" -c 'import torch, dist_video; print(f"install: dist-video {dist_video.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'
