"""Build a :class:`~dist_video.clip.CLIP` from checkpoints in OpenAI's layout.

The architecture is read from tensor shapes, never from a name or a table of known models.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from .clip import CLIP, CLIPConfig

__all__ = ["clip_config_from_openai_state_dict", "clip_from_openai_state_dict"]


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise ValueError(f"transformer blocks under {prefix!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def clip_config_from_openai_state_dict(state_dict: Mapping[str, torch.Tensor], act: str = "quick_gelu",
                                       layer_norm_eps: float = 1e-5) -> CLIPConfig:
    """Infer the CLIP sizes from an OpenAI-layout state dict (``visual.*``, ``transformer.*``...)."""
    if "visual.conv1.weight" not in state_dict:
        if any(k.startswith("visual.layer1.") for k in state_dict):
            raise ValueError("this is a CLIP ResNet checkpoint; DiST needs a CLIP ViT (patch tokens)")
        raise ValueError("no 'visual.conv1.weight' in the state dict: not an OpenAI-layout CLIP ViT")
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    num_pos = state_dict["visual.positional_embedding"].shape[0]
    grid = round((num_pos - 1) ** 0.5)
    if grid * grid + 1 != num_pos:
        raise ValueError(f"visual.positional_embedding has {num_pos} rows: not a square grid + class token")
    vision_layers = _count_blocks(state_dict, "visual.transformer.resblocks.")
    vision_mlp = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    proj = state_dict.get("visual.proj")
    has_text = "token_embedding.weight" in state_dict
    if proj is not None:
        embed_dim = proj.shape[1]
    elif has_text:
        embed_dim = state_dict["text_projection"].shape[1]
    else:
        embed_dim = vision_width
    cfg = dict(
        embed_dim=embed_dim,
        image_size=grid * patch_size,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=vision_layers,
        vision_heads=max(1, vision_width // 64),
        vision_mlp_ratio=vision_mlp / vision_width,
        act=act,
        layer_norm_eps=layer_norm_eps,
        vision_proj=proj is not None,
    )
    if has_text:
        text_width = state_dict["ln_final.weight"].shape[0]
        cfg.update(
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            text_width=text_width,
            text_heads=max(1, text_width // 64),
            text_layers=_count_blocks(state_dict, "transformer.resblocks."),
            text_mlp_ratio=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        )
    else:
        cfg.update(text_layers=0)
    return CLIPConfig(**cfg)


def clip_from_openai_state_dict(state_dict: Mapping[str, torch.Tensor], act: str = "quick_gelu",
                                config: CLIPConfig | None = None, source: str = "state dict") -> CLIP:
    """A float32 :class:`CLIP` holding the weights of an OpenAI-layout state dict."""
    config = config or clip_config_from_openai_state_dict(state_dict, act=act)
    sd = {k: v for k, v in state_dict.items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    model = CLIP(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: CLIP weights do not fit the inferred architecture "
                         f"({config.vision_layers} vision blocks of width {config.vision_width}, "
                         f"{config.text_layers} text blocks): missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model.float().eval()
