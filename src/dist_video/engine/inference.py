"""What prediction, timelines and embedding need from the model they are given.

An inference model is anything callable on float32 clips B x 3 x T x H x W (CLIP-normalised)
that returns logits B x C, with attributes ``class_names`` (or None), ``num_classes`` and
``config.num_frames`` (``encode_video`` B x 3 x T x H x W -> B x E for embeddings): a
model's fused form (``model.fuse()``), or a runner with no torch module inside (e.g. an ONNX
session). Nothing here asks it for parameters.
"""

from __future__ import annotations

import torch

from ..data.decoding import VideoDecodeError

__all__ = ["model_device", "class_names_of", "error_message", "check_finite", "NonFiniteOutputError", "FILE_ERRORS"]

#: What a bad video file raises while it is read and classified (anything else propagates).
FILE_ERRORS = (VideoDecodeError, ValueError, OSError, RuntimeError)


class NonFiniteOutputError(ArithmeticError):
    """The model computed NaN or infinite outputs: a fault of the model (e.g. damaged weights),
    not of the file it was given, so it is not one of :data:`FILE_ERRORS`."""


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` unchanged, or :class:`NonFiniteOutputError` when any is NaN or infinite."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteOutputError(f"the model's {what} are not finite (NaN or infinity): its weights are "
                                   "damaged or overflow in this precision")
    return values


def model_device(model) -> torch.device:
    """Where ``model`` computes: its ``device`` attribute, else its first buffer or parameter,
    else the CPU (a runner that holds no torch tensors)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    for tensors in (getattr(model, "buffers", None), getattr(model, "parameters", None)):
        if callable(tensors):
            for t in tensors():
                return t.device
    return torch.device("cpu")


def class_names_of(model) -> list[str]:
    """The model's class names, or ``"0" .. "C-1"`` when it has none."""
    names = getattr(model, "class_names", None)
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def error_message(error: BaseException) -> str:
    """The cause of a per-file error on one line (without the path a VideoDecodeError repeats)."""
    text = error.cause if isinstance(error, VideoDecodeError) else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]
