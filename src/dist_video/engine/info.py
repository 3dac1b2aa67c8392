"""``dist-video info``: what a model is, what it costs, how it is configured."""

from __future__ import annotations

import json
from pathlib import Path

from ..classifier import VideoClassifier
from ..clip import CLIP, clip_config_for_architecture
from ..clip_loaders import load_clip
from ..config import Config, config_to_dict
from ..loading import load_model
from ..profiling import attention_macs, cost_per_view, count_parameters, inference_cost_per_view
from .builder import build_classifier

__all__ = ["describe"]


def _model_from_config(cfg: Config, clip_path: str | None, arch: str | None) -> VideoClassifier:
    if clip_path or (cfg.model.clip and (cfg.model.clip.startswith("builtin:") or Path(cfg.model.clip).exists())):
        clip = load_clip(clip_path or cfg.model.clip, act=cfg.model.clip_act)
    else:
        name = arch or ("ViT-L/14" if "l14" in str(cfg.output_dir) or "L-14" in cfg.model.clip else "ViT-B/16")
        clip = CLIP(clip_config_for_architecture(name, text=False))  # random weights: shapes only
    cfg.model.init = None
    return build_classifier(cfg.model, clip)


def _exported(loaded, as_json: bool) -> str:
    """What an exported folder records: its model, input and classes (no network to count)."""
    record = loaded.model.record
    info = {"method": loaded.method, "runtime": loaded.runtime, "model": record.get("model"),
            "input": record.get("input"), "preprocess": loaded.preprocess, "classes": loaded.num_classes,
            "opset": record.get("opset")}
    if as_json:
        return json.dumps(info, indent=2, default=str)
    size = loaded.preprocess.get("crop_size")
    return "\n".join([f"method            {info['method']} (exported, run by onnxruntime)",
                      f"input per view    {loaded.config.num_frames} dense frames, {size}x{size}",
                      f"classes           {loaded.num_classes}", f"opset             {info['opset']}"])


def describe(model_path: str | None, cfg: Config | None, *, clip: str | None = None, arch: str | None = None,
             size: int | None = None, as_json: bool = False, trust_checkpoint: bool = False) -> str:
    """A text (or JSON) description: method, CLIP, parameters, MACs/FLOPs per view, config.
    ``model_path``: any path :func:`dist_video.load_model` opens (else ``cfg``'s model)."""
    recorded = None
    if model_path:
        loaded = load_model(model_path, clip=clip, device="cpu", clip_dtype="fp32", trust_checkpoint=trust_checkpoint)
        if loaded.network is None:
            return _exported(loaded, as_json)
        model, recorded = loaded.network, loaded.preprocess.get("crop_size")
    elif cfg is not None:
        model = _model_from_config(cfg, clip, arch)
    else:
        raise ValueError("give a model (folder or .pyth) or a --preset/--config to describe")
    model.eval()
    res = size or recorded or model.clip.visual.image_size
    params = count_parameters(model)
    cost = cost_per_view(model, res, res)
    executed = inference_cost_per_view(model, res, res)
    attn = attention_macs(model, res, res)
    clip_cfg = model.clip.config
    info = {
        "method": model.method,
        "clip": {"width": clip_cfg.vision_width, "layers": clip_cfg.vision_layers, "patch": clip_cfg.patch_size,
                 "image_size": clip_cfg.image_size, "embed_dim": clip_cfg.embed_dim,
                 "text_tower": clip_cfg.text_layers > 0},
        "config": model.method_config(),
        "input": {"frames": model.config.num_frames, "clip_frames": model.config.num_frames // model.config.alpha,
                  "resolution": res},
        "parameters": params,
        "gmacs_per_view": {k: v / 1e9 for k, v in cost.items()},
        "gflops_per_view": {k: 2 * v / 1e9 for k, v in cost.items()},
        "gmacs_per_view_executed_fused": {k: v / 1e9 for k, v in executed.items()},
        "attention_gmacs_not_counted": attn / 1e9,
        "classes": model.num_classes,
    }
    if cfg is not None:
        info["run_config"] = config_to_dict(cfg)
    if as_json:
        return json.dumps(info, indent=2, default=str)
    lines = [
        f"method            {info['method']}",
        f"CLIP image tower  ViT width {clip_cfg.vision_width}, {clip_cfg.vision_layers} blocks, patch "
        f"{clip_cfg.patch_size}, {clip_cfg.image_size}px, embedding {clip_cfg.embed_dim}"
        f"{'' if clip_cfg.text_layers else ' (image-only)'}",
        f"input per view    {info['input']['frames']} dense frames, {info['input']['clip_frames']} through CLIP, "
        f"{res}x{res}",
        f"parameters        CLIP image {params['clip_visual']:,}  text {params['clip_text']:,}  "
        f"trainable {params['trainable']:,}" + (f"  (DiST branch {params['dist_branch']:,})"
                                                 if "dist_branch" in params else ""),
        "cost per view     " + "  ".join(f"{k} {v:.2f} GMACs" for k, v in info["gmacs_per_view"].items())
        + f"  (= {info['gflops_per_view']['total']:.2f} GFLOPs; attention products, {attn / 1e9:.2f} GMACs, "
          "not counted, as in the paper)",
        "executed (fused)  " + "  ".join(f"{k} {v:.2f} GMACs" for k, v in info["gmacs_per_view_executed_fused"].items())
        + "  (the inference form computes the same function with fewer products)",
    ]
    if model.num_classes:
        lines.append(f"classes           {model.num_classes} ({model.head_type} head)")
    lines.append("config            " + json.dumps(model.method_config()))
    return "\n".join(lines)
