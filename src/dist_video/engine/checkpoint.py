"""Training checkpoints that survive a killed run: atomic writes, full state, exact resume."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..storage import atomic_write, torch_load

__all__ = ["save_training_state", "load_training_state", "rng_state", "set_rng_state", "cuda_rng_state",
           "model_training_state", "check_output_dir", "atomic_torch_save"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never half of one."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The state of ``device``'s CUDA generator (``None`` for other devices)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def rng_state(cuda_states: Sequence[torch.Tensor | None] | None = None) -> dict:
    """The Python, NumPy and torch CPU generators' states, and ``cuda_states``: each process's
    CUDA generator, in rank order (see :func:`cuda_rng_state`), when the run is on GPUs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if cuda_states is not None and any(s is not None for s in cuda_states):
        state["cuda_by_rank"] = list(cuda_states)
    return state


def set_rng_state(state: dict, device: torch.device = torch.device("cpu"), rank: int = 0) -> None:
    """Restore the generators of :func:`rng_state`; on a GPU, process ``rank``'s CUDA generator
    goes to ``device`` (the GPU this process runs on). A run resumed with fewer processes or
    GPUs than it was saved with restores what it has (the other generators start afresh)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    if "cuda_by_rank" in state:
        saved = state["cuda_by_rank"]
        cuda = saved[rank] if rank < len(saved) else None
    else:  # older checkpoints: the saving process's generator of every GPU it could see
        saved = state.get("cuda") or []
        index = device.index or 0
        cuda = saved[index] if index < len(saved) else None
    if cuda is None:
        logger.info("no saved CUDA generator state for process %d (the checkpoint holds %d): it starts afresh",
                    rank, len(saved))
        return
    torch.cuda.set_rng_state(cuda, device)


def model_training_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint keeps of the model: everything but frozen CLIP weights."""
    trains_clip = getattr(model, "trains_clip", False)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if trains_clip or not k.startswith("clip.")}


def save_training_state(path: str | os.PathLike, *, model, optimizer, scheduler, scaler, epoch: int,
                        step: int, batch_in_epoch: int, config: dict, extra: dict | None = None,
                        rng: dict | None = None) -> None:
    """Everything needed to continue exactly: model, optimizer, scheduler, loss scaler, RNGs
    (``rng``, default: this process's :func:`rng_state`), epoch, optimizer step and position
    in the epoch."""
    state = {
        "model": model_training_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng if rng is not None else rng_state(),
        "epoch": epoch,
        "step": step,
        "batch_in_epoch": batch_in_epoch,
        "config": config,
        "extra": extra or {},
    }
    atomic_torch_save(state, path)


_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # renamed in NumPy 2
#: The non-tensor types a training checkpoint holds: NumPy's generator state (an array of uint32).
TRAINING_STATE_TYPES = (np.ndarray, np.dtype, type(np.dtype(np.uint32)), _NUMPY_CORE.multiarray._reconstruct)


def load_training_state(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict:
    """A checkpoint of :func:`save_training_state`, read with ``weights_only=True`` (plus
    :data:`TRAINING_STATE_TYPES`); anything else in it is refused unless ``trust_checkpoint``."""
    try:
        state = torch_load(path, trust=trust_checkpoint, allowed=TRAINING_STATE_TYPES)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise ValueError(f"cannot read the training checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a training checkpoint (holds a {type(state).__name__})")
    return state


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Create ``path`` and prove it is writable with room for ``need_bytes``; else one clear error."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {path} cannot be written: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes:
        raise OSError(f"output folder {path} has {free / 2**20:.0f} MiB free, but checkpoints need about "
                      f"{need_bytes / 2**20:.0f} MiB")
    return path
