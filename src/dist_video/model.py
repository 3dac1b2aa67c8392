"""DiSTVideoModel: frozen CLIP + DiST branch + class head.

The frozen CLIP runs under ``torch.no_grad`` in its own dtype (bf16 by default where the
device supports it), on the T' = T / alpha sparse frames only, and stops after the last
selected block. Only the DiST branch (and a linear head, if chosen) has trainable parameters.
"""

from __future__ import annotations

import torch

from .classifier import VideoClassifier
from .authors_keys import LAYER_PARTS, branch_keys_from_authors
from .clip import CLIP
from .dist import DiSTBranch, DiSTConfig, checkpointing_mode
from .fused import FusedDiSTModel, fuse_dist

__all__ = ["DiSTVideoModel"]


class DiSTVideoModel(VideoClassifier):
    """A video classifier: frozen CLIP on sparse frames + the DiST branch on dense frames.

    ``encode_video(B x 3 x T x H x W) -> B x E`` (not normalised);
    ``logits(video, text_embeddings C x E) -> B x C``;
    ``forward(video) -> B x C`` with the head set by :meth:`set_class_embeddings` /
    :meth:`set_class_names` (class-text head) or :meth:`set_linear_head` (learnable).
    """

    method = "dist"
    #: Besides CLIP's: every branch parameter named ``*cls_token*``, i.e. the integration class
    #: tokens, the pooling queries (``aggregated_*cls_token``) and the pooling layers' class-token
    #: maps (``output_map_*cls_token``). The branch's position embeddings match CLIP's name.
    no_weight_decay_names = VideoClassifier.no_weight_decay_names + ("cls_token",)

    def __init__(self, clip: CLIP, config: DiSTConfig, *, clip_dtype: str | torch.dtype | None = "auto"):
        super().__init__(clip, clip_dtype=clip_dtype)
        self.config = config
        self.selected_layers = config.resolve_layers(clip.visual.num_layers)
        self.branch = DiSTBranch(config, clip.visual.width, clip.visual.patch_size, clip.embed_dim,
                                 self.selected_layers).to(clip.logit_scale.device)

    def method_config(self) -> dict:
        return {**self.config.to_dict(), "selected_layers": self.selected_layers}

    def set_grad_checkpointing(self, mode: bool | str = True) -> DiSTVideoModel:
        """What the branch recomputes in backward instead of storing: ``mode`` as
        :func:`dist_video.dist.checkpointing_mode` takes it (False/True/"off"/"selective"/"full").
        A run-time choice, not part of the saved model."""
        self.branch.activation_checkpointing = checkpointing_mode(mode)
        return self

    def fuse(self, dtype: torch.dtype | None = None, onednn: bool = True) -> FusedDiSTModel:
        """The inference form (:class:`~dist_video.fused.FusedDiSTModel`). ``onednn``: fused
        oneDNN convolutions where they run (CPUs); a trace or export records portable kernels."""
        return fuse_dist(self, dtype, onednn)

    @classmethod
    def upgrade_saved_tensors(cls, tensors: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """Format 1 kept the branch's per-layer parts in the authors' lists (``input_linears.<i>``
        ...) and the temporal network in ``temporal_encoder.stem`` / ``temporal_encoder.blocks``."""
        if version >= 2:
            return tensors
        temporal_list = next(theirs for theirs, ours in LAYER_PARTS.items() if ours == "temporal_block")
        legacy = {"temporal_encoder.stem.": "temporal_stem.", "temporal_encoder.blocks.": temporal_list + "."}
        branch, rest = {}, {}
        for key, value in tensors.items():
            if not key.startswith("branch."):
                rest[key] = value
                continue
            key = key[len("branch."):]
            for old, authors in legacy.items():
                if key.startswith(old):
                    key = authors + key[len(old):]
            branch[key] = value
        return {**rest, **{"branch." + k: v for k, v in branch_keys_from_authors(branch).items()}}

    @classmethod
    def from_method_config(cls, clip: CLIP, config: dict, **kwargs) -> DiSTVideoModel:
        return cls(clip, DiSTConfig.from_dict(config), **kwargs)

    @torch.no_grad()
    def clip_layers(self, video: torch.Tensor) -> dict[int, torch.Tensor]:
        """CLIP tokens of the sparse frames: B x 3 x T x H x W -> {layer: B*T' x (N+1) x D}."""
        frames = video[:, :, :: self.config.alpha]  # B x 3 x T' x H x W
        frames = frames.transpose(1, 2).flatten(0, 1)  # B*T' x 3 x H x W (frame index fastest)
        return self.clip.visual.forward_layers(frames.to(self.clip_dtype), self.selected_layers)

    @torch.no_grad()
    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP embeddings of the sparse frames: B x 3 x T x H x W -> B x T' x E."""
        frames = video[:, :, :: self.config.alpha].transpose(1, 2)
        b, t = frames.shape[:2]
        emb = self.clip.encode_image(frames.flatten(0, 1).to(self.clip_dtype))
        return emb.view(b, t, -1).float()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W (normalised dense frames) -> B x E video embedding (not normalised)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(video.shape)}")
        return self.branch(video, self.clip_layers(video))
