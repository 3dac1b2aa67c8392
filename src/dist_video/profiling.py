"""Counting the cost of a model: parameters and multiply-accumulates per view.

MACs are PyTorch's FLOP counter (``torch.utils.flop_counter``) halved, the convention of the
DiST paper. The attention products (QK^T and AV) are left out on every device, as in the
paper's count: PyTorch's counter skips the CPU's fused attention kernel but counts the CUDA
ones (flash, memory-efficient, cuDNN), so those are counted as zero here; they are a few
percent of a ViT's cost (``attention_macs`` gives them separately).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .classifier import VideoClassifier
from .model import DiSTVideoModel

__all__ = ["count_macs", "cost_per_view", "inference_cost_per_view", "count_parameters"]


def _fused_attention_ops() -> list:
    """The fused scaled-dot-product attention kernels (forward and backward) of this PyTorch
    build, CPU and CUDA alike."""
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
             "_flash_attention_forward", "_flash_attention_backward",
             "_efficient_attention_forward", "_efficient_attention_backward")
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _extra_flop_formulas() -> dict:
    """FLOP formulas for products that PyTorch's counter does not know and would silently
    skip: the in-place matrix products the no-autograd paths use to accumulate into a
    residual (``addmm_``, ``baddbmm_``), and oneDNN's fused convolutions (conv + SiLU, conv +
    add) of the inference temporal blocks. The fused attention kernels count zero on every
    device (see the module docstring)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    mapping = {}

    def no_flops(*args, **kwargs):
        return 0

    no_flops._get_raw = True
    for op in _fused_attention_ops():
        mapping[op] = no_flops
    for in_place, out_of_place in ((aten.addmm_, aten.addmm), (aten.baddbmm_, aten.baddbmm)):
        formula = flop_registry[out_of_place]  # already takes tensors (shape-wrapped)

        def raw(*args, _formula=formula, **kwargs):
            return _formula(*args, **kwargs)

        raw._get_raw = True  # tells the counter not to wrap it a second time
        mapping[in_place] = raw

    def fused_convolution(*args, out_val=None, **kwargs):
        # (input, weight, bias, padding, ...) or .binary (input, other, weight, bias, padding, ...)
        weight = args[1] if isinstance(args[3], (list, tuple)) else args[2]
        return 2 * out_val.numel() * weight[0].numel()

    fused_convolution._get_raw = True
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is not None and hasattr(mkldnn, "_convolution_pointwise"):
        mapping[mkldnn._convolution_pointwise] = fused_convolution
    return mapping


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())


def count_macs(fn, *args, **kwargs) -> int:
    """Multiply-accumulates of ``fn(*args, **kwargs)`` as PyTorch's FLOP counter sees them."""
    # Run with autograd on: the counter's module tracker fails on no-grad tensors that
    # require grad (expanded parameters).
    with torch.enable_grad(), _flop_counter() as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


def count_parameters(model: VideoClassifier) -> dict:
    """Parameter counts: CLIP image tower, CLIP text tower, and the trainable part."""
    clip = model.clip
    visual = sum(p.numel() for p in clip.visual.parameters())
    total_clip = sum(p.numel() for p in clip.parameters())
    out = {"clip_visual": visual, "clip_text": total_clip - visual,
           "trainable": sum(p.numel() for _, p in model.trainable_parameters())}
    if isinstance(model, DiSTVideoModel):
        out["dist_branch"] = sum(p.numel() for p in model.branch.parameters())
    return out


def attention_macs(model: VideoClassifier, height: int, width: int) -> int:
    """The QK^T and AV products of CLIP's image tower for one view (not in :func:`count_macs`)."""
    v = model.clip.visual
    tokens = (height // v.patch_size) * (width // v.patch_size) + 1
    frames = model.config.num_frames // model.config.alpha
    return 2 * tokens * tokens * v.width * v.num_layers * frames


def inference_cost_per_view(model: VideoClassifier, height: int = 224, width: int = 224) -> dict:
    """MACs of one view as the model's inference form (``model.fuse()``) executes them:
    ``{"clip": ..., "branch": ..., "total": ...}`` (branch only for DiST). DiST's fused branch
    computes the same function with fewer products than the architecture's count
    (:func:`cost_per_view`): its pooling layers never form keys and values."""
    fused = model.fuse()
    device = next(fused.buffers()).device
    video = torch.zeros(1, 3, model.config.num_frames, height, width, device=device)
    if not isinstance(model, DiSTVideoModel):
        with _flop_counter() as counter:
            fused.encode_video(video)
        total = counter.get_total_flops() // 2
        return {"clip": total, "total": total}
    with _flop_counter() as counter:
        layers = fused.clip_layers(video)
    clip = counter.get_total_flops() // 2
    with _flop_counter() as counter:
        fused.branch(video, layers)
    branch = counter.get_total_flops() // 2
    return {"clip": clip, "branch": branch, "total": clip + branch}


def cost_per_view(model: VideoClassifier, height: int = 224, width: int = 224) -> dict:
    """MACs of one view (1 clip): ``{"clip": ..., "branch": ..., "total": ...}`` (branch only for DiST)."""
    cfg = model.config
    device = next(model.parameters()).device
    video = torch.zeros(1, 3, cfg.num_frames, height, width, device=device)
    total = count_macs(model.encode_video, video)
    if isinstance(model, DiSTVideoModel):
        clip = count_macs(model.clip_layers, video)
        return {"clip": clip, "branch": total - clip, "total": total}
    return {"clip": total, "total": total}
