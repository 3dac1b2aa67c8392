"""PyTorch's own distributed runtime: set-up from ``torchrun``'s environment, small helpers.

One process per device. ``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them the run is a single process. NCCL on GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "setup_distributed", "cleanup_distributed", "all_gather_objects", "barrier",
           "resolve_device", "broadcast_object", "local_world_size", "use_fast_gpu_kernels"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def local_world_size() -> int:
    """Processes on this machine (``LOCAL_WORLD_SIZE`` from ``torchrun``; else ``WORLD_SIZE``
    when only that is set; else 1)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))


def _one_gpu_named_by_launcher() -> bool:
    """Whether ``CUDA_VISIBLE_DEVICES`` names exactly one GPU: the launcher chose this process's
    GPU (SLURM ``--gpus-per-task=1``, a per-process wrapper)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and len([d for d in visible.split(",") if d.strip()]) == 1


def resolve_device(name: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """This process's device: ``auto`` -> its GPU if there is one, else CPU; ``cuda`` -> its GPU.

    "Its GPU" is ``cuda:{local_rank}`` when this machine's processes each see every GPU
    (``torchrun``), and ``cuda:0`` when the launcher gives each process one GPU through
    ``CUDA_VISIBLE_DEVICES`` (one visible GPU, named there). One visible GPU that the launcher
    did not name for this process (``CUDA_VISIBLE_DEVICES`` unset or listing several) with
    several processes on this machine would put them all on that GPU, where NCCL fails: that
    is refused here. ``cuda:N`` names one GPU, which only makes sense for one process per
    machine (``local_world``: processes on this machine)."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    visible = torch.cuda.device_count()
    if device.index is None:
        if visible == 1:
            if local_world > 1 and not _one_gpu_named_by_launcher():
                raise RuntimeError(f"device {name!r} would put all {local_world} processes of this machine on its "
                                   "one visible GPU: start one process per GPU (torchrun --nproc_per_node=1 here), "
                                   "or give each process its own GPU through CUDA_VISIBLE_DEVICES")
            return torch.device("cuda:0")
        if local_rank >= visible:
            raise RuntimeError(f"process {local_rank} of this machine needs a GPU, but only {visible} are "
                               "visible (CUDA_VISIBLE_DEVICES); start at most one process per GPU")
        return torch.device(f"cuda:{local_rank}")
    if local_world > 1:
        raise RuntimeError(f"device {name!r} would put all {local_world} processes of this machine on one GPU: "
                           "use --device cuda (process i takes GPU i) and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if device.index >= visible:
        raise RuntimeError(f"device {name!r} requested but only {visible} GPU(s) are visible")
    return device


def use_fast_gpu_kernels(device: torch.device | str) -> None:
    """On a GPU, what training and inference runs use (the CLI and the benchmarks alike): cuDNN's
    autotuner picks the fastest convolution algorithms for the run's fixed shapes, and float32
    matrix products and convolutions use TF32 tensor cores (the frozen CLIP and autocast regions
    compute in bf16/fp16 anyway). Process-wide PyTorch settings; nothing on a CPU."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def setup_distributed(device_name: str = "auto") -> DistEnv:
    """Join the process group when launched by ``torchrun``; otherwise a single-process env.
    A GPU process makes its GPU the current one (CUDA's default device for anything not
    placed explicitly: NCCL, pinned memory, caching allocators)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = local_world_size()
    device = resolve_device(device_name, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":  # device_id: NCCL binds this GPU now, not on the first collective
            dist.init_process_group(backend="nccl", rank=rank, world_size=world, device_id=device)
        else:
            dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    if device.type == "cpu" and world > 1:
        # Share the cores between the processes of this machine instead of oversubscribing.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistEnv(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
