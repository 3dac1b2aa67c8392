"""Build a classifier (DiST or a baseline) from a :class:`~dist_video.config.ModelConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..baselines import BaselineConfig
from ..classifier import VideoClassifier, model_class
from ..clip import CLIP
from ..clip_loaders import load_clip, resolve_clip_path
from ..config import ModelConfig

# resolve_clip_path lives in dist_video.clip_loaders (load_clip takes builtin:<name> itself); it
# stays importable from here for code written before it moved.
__all__ = ["load_clip_for", "build_classifier", "attach_head", "resolve_clip_path"]


def load_clip_for(cfg: ModelConfig) -> CLIP:
    """The CLIP of ``cfg.clip`` (a checkpoint file or folder, or ``builtin:<name>``)."""
    if not cfg.clip:
        raise ValueError("no CLIP weights given: set model.clip to a checkpoint file or folder "
                         "(e.g. --set model.clip=/models/ViT-B-16.pt) or to builtin:digits")
    return load_clip(cfg.clip, act=cfg.clip_act, vocab=cfg.vocab)


def build_classifier(cfg: ModelConfig, clip: CLIP | None = None) -> VideoClassifier:
    """The network of ``cfg.method`` around ``clip`` (loaded from ``cfg.clip`` if not given),
    initialised from ``cfg.init`` when set. No head yet: see :func:`attach_head`."""
    return _network(cfg, clip).set_grad_checkpointing(cfg.activation_checkpointing)


def _network(cfg: ModelConfig, clip: CLIP | None) -> VideoClassifier:
    if cfg.init:
        init = Path(cfg.init)
        if init.is_dir():
            return VideoClassifier.from_pretrained(init, clip=clip, clip_dtype=cfg.clip_dtype)
        from ..checkpoints import load_official_checkpoint
        overrides = {"selected_layers": cfg.dist.selected_layers} if cfg.dist.selected_layers else {}
        model = load_official_checkpoint(init, clip=clip, clip_dtype=cfg.clip_dtype, **overrides)
        if model.config.num_frames != cfg.dist.num_frames or model.config.alpha != cfg.dist.alpha:
            raise ValueError(f"{init}: the checkpoint was built for {model.config.num_frames} frames "
                             f"(alpha {model.config.alpha}) but the config asks for {cfg.dist.num_frames} "
                             f"(alpha {cfg.dist.alpha})")
        return model
    clip = clip if clip is not None else load_clip_for(cfg)
    cls = model_class(cfg.method)
    if cfg.method == "dist":
        return cls(clip, cfg.dist, clip_dtype=cfg.clip_dtype)
    base = BaselineConfig(num_frames=cfg.dist.num_frames, alpha=cfg.dist.alpha, adapter_dim=cfg.adapter_dim,
                          adapter_kernel=cfg.adapter_kernel)
    return cls(clip, base, clip_dtype=cfg.clip_dtype)


def attach_head(model: VideoClassifier, cfg: ModelConfig, class_names: Sequence[str], tokenizer=None
                ) -> VideoClassifier:
    """Give ``model`` a head for ``class_names``: class-name text through CLIP's text tower
    (``head: text``, tokenized by ``tokenizer``, default the one :func:`dist_video.load_clip`
    found) or a learnable linear layer (``head: linear``). A model that already has a head for
    the same classes keeps it; a different class list is an error."""
    class_names = list(class_names)
    if model.head_type is not None:
        if model.num_classes != len(class_names) or (model.class_names and model.class_names != class_names):
            raise ValueError(f"the model was trained for {model.num_classes} classes "
                             f"({(model.class_names or [])[:3]}...) but the data has {len(class_names)} "
                             f"({class_names[:3]}...)")
        return model
    if cfg.head == "linear":
        return model.set_linear_head(len(class_names), class_names)
    if cfg.head != "text":
        raise ValueError(f"model.head must be 'text' or 'linear', got {cfg.head!r}")
    if not model.clip.has_text:
        raise ValueError("the CLIP weights have no text tower, so class names cannot be embedded: "
                         "use --set model.head=linear")
    tokenizer = tokenizer or model.clip.tokenizer
    if tokenizer is None:
        raise ValueError("no BPE vocabulary was found for CLIP's tokenizer: pass --set model.vocab=PATH "
                         "(bpe_simple_vocab_16e6.txt.gz, or a Hugging Face folder with vocab.json)")
    with torch.no_grad():
        return model.set_class_names(class_names, tokenizer, prompt=cfg.prompt)
