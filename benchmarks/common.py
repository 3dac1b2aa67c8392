"""Shared helpers for the benchmarks: machine description, timing, bf16 matmul rate, models."""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from dist_video.baselines import AdapterClassifier, BaselineConfig, FrozenMeanClassifier, FullFinetuneClassifier
from dist_video.classifier import resolve_clip_dtype
from dist_video.clip import CLIP, clip_config_for_architecture
from dist_video.dist import DiSTConfig
from dist_video.engine.allocator import keep_freed_memory
from dist_video.model import DiSTVideoModel

# As in the command line: on Linux CPUs, freed memory is kept for reuse (every method alike).
KEEPS_FREED_MEMORY = keep_freed_memory()

METHODS = ("dist", "adapter", "full-finetune", "frozen-mean")


def machine(device: torch.device | str | None = None) -> dict:
    """What the numbers were measured on: the host, and the device the benchmark ran on
    (``device``; default: the first GPU if there is one, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "malloc_keeps_freed_memory": KEEPS_FREED_MEMORY,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=torch.cuda.get_device_name(index), gpu_index=index,
                    gpu_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> tuple[float, list]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bf16_matmul_rate(device: torch.device, n: int = 2048, repeats: int = 7) -> float:
    """Measured bf16 matrix-product rate in FLOP/s (median of ``repeats`` n x n x n products)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    med, _ = median_time(lambda: a @ b, repeats, warmup=2, device=device)
    return 2 * n ** 3 / med


def build_method(method: str, arch: str, num_frames: int, alpha: int, device: torch.device,
                 dist_preset: str | None = None, num_classes: int = 400, seed: int = 0):
    """A randomly initialised classifier of ``method`` around a CLIP of architecture ``arch``,
    each at its best supported precision on ``device`` (decided for ``device``, not the host)."""
    torch.manual_seed(seed)
    clip_dtype = resolve_clip_dtype("auto", device)
    clip = CLIP(clip_config_for_architecture(arch, text=False))
    if method == "dist":
        cfg = DiSTConfig.from_preset(dist_preset) if dist_preset else DiSTConfig(num_frames=num_frames, alpha=alpha)
        model = DiSTVideoModel(clip, cfg, clip_dtype=clip_dtype)
    else:
        base = BaselineConfig(num_frames=num_frames, alpha=alpha)
        cls = {"adapter": AdapterClassifier, "full-finetune": FullFinetuneClassifier,
               "frozen-mean": FrozenMeanClassifier}[method]
        model = cls(clip, base, clip_dtype=clip_dtype)
    model.set_linear_head(num_classes)
    return model.to(device)
