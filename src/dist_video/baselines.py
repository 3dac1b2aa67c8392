"""Baselines that share DiST's data pipeline, heads and training loop (``model.method``).

- ``frozen-mean``: frozen CLIP on the sparse frames, frame embeddings averaged.
- ``full-finetune``: CLIP's image tower trained end to end, frame embeddings averaged.
- ``adapter``: frozen CLIP with a small bottleneck temporal adapter before every block (the
  ST-Adapter / AIM family): few trainable parameters, but gradients flow back through CLIP.

All three read ``T' = num_frames / alpha`` frames (every alpha-th of the dense clip), exactly
the frames DiST's CLIP sees, so the comparison is like for like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import VideoClassifier
from .clip import CLIP
from .fused import FusedFrameModel, average_frames, fuse_frames

__all__ = ["BaselineConfig", "FrozenMeanClassifier", "FullFinetuneClassifier", "AdapterClassifier",
           "TemporalAdapter"]


@dataclass
class BaselineConfig:
    num_frames: int = 16  # dense frames in the clip (as for DiST)
    alpha: int = 2  # every alpha-th frame goes through CLIP
    adapter_dim: int = 64
    adapter_kernel: int = 3

    @property
    def sparse_frames(self) -> int:
        return self.num_frames // self.alpha


def _sparse_frames(video: torch.Tensor, alpha: int) -> torch.Tensor:
    """B x 3 x T x H x W -> B*T' x 3 x H x W (every alpha-th frame, frame index fastest)."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(video.shape)}")
    return video[:, :, ::alpha].transpose(1, 2).flatten(0, 1)


class _BaselineClassifier(VideoClassifier):
    def __init__(self, clip: CLIP, config: BaselineConfig, *, clip_dtype="auto"):
        super().__init__(clip, clip_dtype=clip_dtype)
        self.config = config

    def method_config(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_method_config(cls, clip: CLIP, config: dict, **kwargs):
        return cls(clip, BaselineConfig(**config), **kwargs)

    def fuse(self, dtype: torch.dtype | None = None) -> FusedFrameModel:
        """The inference form (:class:`~dist_video.fused.FusedFrameModel`)."""
        return fuse_frames(self, dtype, getattr(self, "adapters", None))


class FrozenMeanClassifier(_BaselineClassifier):
    """Frozen CLIP image embeddings of the sparse frames, averaged over time."""

    method = "frozen-mean"

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W -> B x E."""
        b = video.shape[0]
        with torch.no_grad():
            emb = self.clip.encode_image(_sparse_frames(video, self.config.alpha).to(self.clip_dtype))
        return average_frames(emb, b)


class FullFinetuneClassifier(_BaselineClassifier):
    """CLIP's image tower trained end to end (fp32 master weights), frame embeddings averaged.
    The text tower stays frozen."""

    method = "full-finetune"
    trains_clip = True

    def __init__(self, clip: CLIP, config: BaselineConfig, *, clip_dtype="auto"):
        super().__init__(clip, config, clip_dtype=clip_dtype)
        self.clip.float()
        self.clip.requires_grad_(False)
        self.clip.visual.requires_grad_(True)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        emb = self.clip.encode_image(_sparse_frames(video, self.config.alpha))
        return average_frames(emb, b)


class TemporalAdapter(nn.Module):
    """Bottleneck adapter with a depthwise temporal convolution over the patch tokens.

    ``x + up(dwconv_t(down(x)))`` on B*T x (1 + g*g) x D; the class token passes through the
    bottleneck without the convolution. ``up`` starts at zero, so the adapted CLIP starts as CLIP.
    """

    def __init__(self, width: int, bottleneck: int, kernel: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, (kernel, 1, 1), padding=(kernel // 2, 0, 0),
                              groups=bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, frames: int, grid: tuple[int, int]) -> torch.Tensor:
        bt, length, _ = x.shape
        h = self.down(x.to(self.down.weight.dtype))  # B*T x L x r
        cls, patches = h[:, :1], h[:, 1:]
        r = h.shape[-1]
        p = patches.reshape(bt // frames, frames, grid[0], grid[1], r).permute(0, 4, 1, 2, 3)
        p = self.conv(p).permute(0, 2, 3, 4, 1).reshape(bt, length - 1, r)
        return x + self.up(F.gelu(torch.cat([cls, p], dim=1))).to(x.dtype)


class AdapterClassifier(_BaselineClassifier):
    """Frozen CLIP with a :class:`TemporalAdapter` before every transformer block."""

    method = "adapter"

    def __init__(self, clip: CLIP, config: BaselineConfig, *, clip_dtype="auto"):
        super().__init__(clip, config, clip_dtype=clip_dtype)
        width = clip.visual.width
        self.adapters = nn.ModuleList(
            [TemporalAdapter(width, config.adapter_dim, config.adapter_kernel)
             for _ in range(clip.visual.num_layers)]).to(clip.logit_scale.device)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        visual = self.clip.visual
        frames = _sparse_frames(video, self.config.alpha)
        grid = (frames.shape[-2] // visual.patch_size, frames.shape[-1] // visual.patch_size)
        x = visual.embed(frames.to(self.clip_dtype))
        for adapter, block in zip(self.adapters, visual.transformer.resblocks):
            x = adapter(x, self.config.sparse_frames, grid)
            x = block(x)
        emb = visual.pool(x)
        return average_frames(emb, b)
