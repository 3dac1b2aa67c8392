"""The inference form of a video classifier, made once: :func:`fuse_dist` / :func:`fuse_frames`.

Each part of the training form owns its inference form, made by its ``fuse(dtype, ...)``
method beside its ``forward`` (:mod:`dist_video.clip`: ``MLP``, ``ResidualAttentionBlock``,
``VisionTransformer``; :mod:`dist_video.dist`: the stem, the temporal block, the two maps
between the branches, the integration block, the layer, the pooling parts and the branch). An
inference form computes what its part computes in ``eval()`` mode without autograd, with
every algebraic simplification done once, into buffers in the compute dtype (the shared folds:
:mod:`dist_video.folding`). This module holds what spans the parts:

- the contract between consecutive fused DiST layers, :class:`~dist_video.dist.FusedSeam`
  (defined beside the layers that honour it and threaded by ``DiSTBranch.fuse``): the temporal
  features are carried multiplied by 1.702 (QuickGELU's factor, so each temporal block ends in
  a plain SiLU), and each layer's input-map and temporal->integration biases ride in the
  previous layer's integration-block output bias;
- the classifier head (:class:`FusedHead`);
- the whole models, :class:`FusedDiSTModel` and :class:`FusedFrameModel`, and the entry points.

``docs/method.md`` writes every fold out. A fused model is an ordinary ``nn.Module``: no
parameter, no global state, no dependence on grad mode; it can be pickled, moved with
``.to(device)``, traced with ``torch.jit.trace`` or exported with ``torch.export``. It does
not follow later changes of the model it was made from: fuse again after training.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import FusedVisionTower
from .dist import FusedDiSTBranch, onednn_fusion_available
from .folding import Buffers, f64

__all__ = ["FusedVisionTower", "FusedDiSTBranch", "FusedHead", "FusedDiSTModel", "FusedFrameModel", "fuse_dist",
           "fuse_frames", "onednn_fusion_available", "average_frames"]


# ---------------------------------------------------------------------------- heads and models
class FusedHead(Buffers):
    """A classifier head in ``dtype`` (float32 or wider): class-text embeddings (normalised, times CLIP's
    ``exp(logit_scale)``, against the normalised video embedding) or a linear layer.
    z: B x E -> B x C."""

    def __init__(self, kind: str | None, dtype: torch.dtype, *, text: torch.Tensor | None = None,
                 logit_scale: float | None = None, linear: nn.Linear | None = None):
        super().__init__()
        self.kind = kind
        if kind == "text":
            self.keep(dtype, weight=F.normalize(f64(text), dim=-1) * math.exp(logit_scale), bias=None)
        elif kind == "linear":
            self.keep(dtype, weight=linear.weight, bias=linear.bias)
        elif kind is not None:
            raise ValueError(f"unknown head type {kind!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            raise RuntimeError("this model has no classifier head (set one on the model before fusing)")
        z = z.to(self.weight.dtype)
        if self.kind == "text":
            z = F.normalize(z, dim=-1)
        return F.linear(z, self.weight, self.bias)


def _head_of(model: nn.Module, dtype: torch.dtype) -> FusedHead:
    if model.head_type == "text":
        return FusedHead("text", dtype, text=model.class_embeddings, logit_scale=float(model.clip.logit_scale))
    if model.head_type == "linear":
        return FusedHead("linear", dtype, linear=model.head)
    return FusedHead(None, dtype)


class _FusedClassifier(nn.Module):
    """What the fused models share: ``forward(video) -> B x C`` through :meth:`encode_video`
    and the head, computed in the fused dtype whatever autocast context is around it; the
    embeddings and logits come out in float32 (or the fused dtype, if wider)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.method = model.method
        self.dtype = dtype
        self.output_dtype = torch.promote_types(dtype, torch.float32)
        self.class_names = list(model.class_names) if model.class_names is not None else None
        self.config = copy.deepcopy(model.config)
        self.head = _head_of(model, self.output_dtype)

    @property
    def num_classes(self) -> int | None:
        return None if self.head.kind is None else self.head.weight.shape[0]

    def text_head(self, text_embeddings: torch.Tensor, logit_scale: float) -> FusedHead:
        """A class-text head for this model (C x E class-text embeddings, e.g. from the model's
        ``encode_text``; ``logit_scale`` CLIP's, before ``exp``), in the model's output dtype on its
        device, made exactly as the model's own text head is. The model is left as it is: give the
        head to :meth:`classify` (several heads can share one model)."""
        device = next(self.buffers()).device
        return FusedHead("text", self.output_dtype, text=text_embeddings, logit_scale=logit_scale).to(device)

    def set_class_embeddings(self, text_embeddings: torch.Tensor, logit_scale: float,
                             class_names: Sequence[str] | None = None) -> "_FusedClassifier":
        """Use class-text embeddings (C x E, e.g. from the model's ``encode_text``) as the head."""
        self.head = self.text_head(text_embeddings, logit_scale)
        self.class_names = list(class_names) if class_names is not None else None
        return self

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W (normalised dense frames) -> B x E (not normalised)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(video.shape)}")
        with torch.autocast(video.device.type, enabled=False):
            return self.embed(video).to(self.output_dtype)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, embeddings: torch.Tensor, head: FusedHead | None = None) -> torch.Tensor:
        """Embeddings B x E (from :meth:`encode_video`) -> B x C class logits through ``head``
        (default: the model's own; or one from :meth:`text_head`), outside any autocast."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return (self.head if head is None else head)(embeddings)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W -> B x C class logits."""
        return self.classify(self.encode_video(video))


def _sparse_frames(video: torch.Tensor, alpha: int, dtype: torch.dtype) -> torch.Tensor:
    """B x 3 x T x H x W -> B*T' x 3 x H x W (every alpha-th frame, frame index fastest)."""
    return video[:, :, ::alpha].transpose(1, 2).flatten(0, 1).to(dtype)


class FusedDiSTModel(_FusedClassifier):
    """The inference form of :class:`~dist_video.model.DiSTVideoModel`: the frozen CLIP up to
    the last selected block and the DiST branch, fused."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, onednn: bool):
        super().__init__(model, dtype)
        self.selected_layers = list(model.selected_layers)
        self.alpha = model.config.alpha
        self.clip = model.clip.visual.fuse(dtype, depth=max(self.selected_layers) + 1, pooled=False)
        self.branch = model.branch.fuse(dtype, onednn)

    def clip_layers(self, video: torch.Tensor) -> dict[int, torch.Tensor]:
        """B x 3 x T x H x W -> {layer: B*T' x (N+1) x D} of the sparse frames."""
        return self.clip.forward_layers(_sparse_frames(video, self.alpha, self.dtype), self.selected_layers)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        return self.branch(video, self.clip_layers(video))


class FusedFrameModel(_FusedClassifier):
    """The inference form of the frame-averaging baselines (``frozen-mean``, ``full-finetune``,
    ``adapter``): CLIP on the sparse frames (with the adapter before each block, if any),
    frame embeddings averaged."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, adapters: nn.ModuleList | None = None):
        super().__init__(model, dtype)
        self.alpha = model.config.alpha
        self.sparse_frames = model.config.num_frames // model.config.alpha
        self.clip = model.clip.visual.fuse(dtype)
        self.adapters = None if adapters is None else _frozen_copy(adapters, dtype)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        frames = _sparse_frames(video, self.alpha, self.dtype)
        if self.adapters is None:
            emb = self.clip(frames)
        else:
            p = self.clip.patch_size
            grid = (frames.shape[-2] // p, frames.shape[-1] // p)
            x = self.clip.embed(frames)
            for adapter, block in zip(self.adapters, self.clip.blocks):
                x = block(adapter(x, self.sparse_frames, grid))
            emb = self.clip.pool(x)
        return average_frames(emb, b)


def average_frames(embeddings: torch.Tensor, batch: int) -> torch.Tensor:
    """B*T' x E frame embeddings -> B x E, averaged in float32 (or wider)."""
    embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    return embeddings.view(batch, -1, embeddings.shape[-1]).mean(dim=1)


def _frozen_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` whose parameters are buffers of the same names (the
    same forward, nothing that requires grad)."""
    module = copy.deepcopy(module).to(dtype)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


def _resolve(model: nn.Module, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.device]:
    """The compute dtype (default: the frozen CLIP's, or float32 for a trained CLIP) and device."""
    device = model.clip.logit_scale.device
    return dtype or model.clip_dtype, device


def fuse_dist(model: nn.Module, dtype: torch.dtype | None = None, onednn: bool = True) -> FusedDiSTModel:
    """The inference form of a :class:`~dist_video.model.DiSTVideoModel` (see the module
    docstring). ``dtype``: the compute dtype (default: the frozen CLIP's); ``onednn``: use
    oneDNN's fused convolutions where they run (False for export to other runtimes)."""
    dtype, device = _resolve(model, dtype)
    fused = FusedDiSTModel(model, dtype, onednn and onednn_fusion_available(device, dtype))
    return fused.to(device).eval()


def fuse_frames(model: nn.Module, dtype: torch.dtype | None = None, adapters: nn.ModuleList | None = None
                ) -> FusedFrameModel:
    """The inference form of a frame-averaging baseline (``adapters``: the adapter baseline's)."""
    dtype, device = _resolve(model, dtype)
    return FusedFrameModel(model, dtype, adapters).to(device).eval()
