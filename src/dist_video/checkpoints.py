"""The authors' released checkpoints (``.pyth``): reading them and inferring their sizes.

Their files hold ``{"model_state": {...}}`` with every key under ``backbone.base_encoder.``
(sometimes behind a ``module.`` prefix from DDP): the OpenAI-layout CLIP weights plus the
branch under ``dist_net.`` (older files: ``ladder_net.`` with other sub-names).
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from .clip import CLIP
from .classifier import load_strict_state_dict
from .clip_loaders import clip_from_openai_state_dict, load_clip
from .dist import DiSTConfig, branch_keys_from_authors, branch_keys_to_authors
from .model import DiSTVideoModel
from .storage import torch_load

__all__ = ["load_official_checkpoint", "read_official_state_dict", "official_to_branch_state_dict",
           "branch_to_official_state_dict", "infer_dist_config"]

# Older releases named the branch ``ladder_net`` with these sub-names.
_LADDER_NAMES = {
    "input_map_feat_nets": "input_linears",
    "s2t_fuse_nets": "integration2temporal_nets",
    "t2s_fuse_nets": "temporal2integration_nets",
    "spatial_nets": "integration_nets",
    "final_temporal_nets": "adapooling_nets",
}


def read_official_state_dict(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with the ``module.`` and ``backbone.base_encoder.`` prefixes
    removed and ``ladder_net`` names mapped to ``dist_net`` names. Read with
    ``weights_only=True`` (the authors' files hold only tensors, dicts, numbers and strings); a
    file that needs more is refused unless ``trust_checkpoint`` (see :func:`dist_video.storage.torch_load`)."""
    obj = torch_load(path, trust=trust_checkpoint)
    if isinstance(obj, Mapping) and "model_state" in obj:
        obj = obj["model_state"]
    elif isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict with 'model_state', got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        key = key.removeprefix("module.").removeprefix("backbone.base_encoder.").removeprefix("module.")
        if key.startswith("ladder_net."):
            rest = key[len("ladder_net."):]
            head, _, tail = rest.partition(".")
            key = "dist_net." + _LADDER_NAMES.get(head, head) + ("." + tail if tail else "")
        out[key] = value
    if not any(k.startswith("dist_net.") for k in out):
        raise ValueError(f"{path}: no DiST branch weights (dist_net.* / ladder_net.*) found; "
                         f"is this a DiST checkpoint? First keys: {list(obj)[:5]}")
    return out


def official_to_branch_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``dist_net.*`` tensors (authors' names) -> :class:`~dist_video.dist.DiSTBranch` keys."""
    return branch_keys_from_authors({k[len("dist_net."):]: v for k, v in state_dict.items()
                                     if k.startswith("dist_net.")})


def branch_to_official_state_dict(branch_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_to_branch_state_dict`: our keys -> ``dist_net.*`` names."""
    return {"dist_net." + k: v for k, v in branch_keys_to_authors(branch_sd).items()}


def _indices(branch_sd: Mapping[str, torch.Tensor], name: str) -> int:
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.")
    return len({int(m.group(1)) for k in branch_sd if (m := pattern.match(k))})


def infer_dist_config(branch_sd: Mapping[str, torch.Tensor], **overrides) -> DiSTConfig:
    """Every :class:`DiSTConfig` field the tensor shapes determine; the rest from ``overrides``.

    ``branch_sd`` uses :class:`~dist_video.dist.DiSTBranch` keys."""
    stem = branch_sd["temporal_stem.weight"]  # C_t x 3 x k_s x P x P
    fuse = branch_sd["layers.0.temporal_to_integration.linear_fuse.weight"]  # C_i x C_t x alpha x 1 x 1
    cls_token = branch_sd["layers.0.temporal_to_integration.cls_token"]  # 1 x 1 x T' x C_i
    t_fc1 = branch_sd["layers.0.temporal_block.temporal_net.c_fc1.weight"]  # C_t*r x C_t x k x 1 x 1
    ffn = branch_sd["layers.0.integration_block.ffn.c_fc.weight"]  # C_i*r x C_i
    tffn = branch_sd["layers.0.integration_block.temporal_ffn.c_fc1.weight"]  # C_i*r' x C_i x 1 x 1 x 1
    temporal_dim, integration_dim = stem.shape[0], fuse.shape[0]
    alpha, sparse = fuse.shape[2], cls_token.shape[2]
    inferred = dict(
        num_frames=sparse * alpha,
        alpha=alpha,
        temporal_dim=temporal_dim,
        integration_dim=integration_dim,
        stem_kernel=stem.shape[2],
        temporal_kernel=t_fc1.shape[2],
        temporal_mlp_ratio=t_fc1.shape[0] / temporal_dim,
        integration_mlp_ratio=ffn.shape[0] / integration_dim,
        integration_temporal_mlp_ratio=tffn.shape[0] / integration_dim,
        pooling_layers=_indices(branch_sd, "adapooling_nets"),
    )
    for key, value in overrides.items():
        if key in inferred and value != inferred[key]:
            raise ValueError(f"{key}={value!r} contradicts the checkpoint, whose tensors say {inferred[key]!r}")
    return DiSTConfig(**{**inferred, **overrides})


def load_official_checkpoint(path: str | os.PathLike, clip: CLIP | str | os.PathLike | None = None,
                             *, clip_dtype: str | torch.dtype | None = "auto", act: str = "quick_gelu",
                             trust_checkpoint: bool = False, **overrides) -> DiSTVideoModel:
    """A :class:`DiSTVideoModel` from one of the authors' ``.pyth`` checkpoints.

    ``clip``: a CLIP model or a path for :func:`dist_video.load_clip`; by default the CLIP
    weights stored in the checkpoint. ``overrides``: DiSTConfig fields the tensors do not
    determine (``selected_layers``, default all CLIP blocks). ``trust_checkpoint``: load files
    that need more than tensors (this one and ``clip``), for files you made or trust."""
    state = read_official_state_dict(path, trust_checkpoint=trust_checkpoint)
    branch_sd = official_to_branch_state_dict(state)
    if clip is None:
        clip_sd = {k: v for k, v in state.items() if not k.startswith("dist_net.")}
        if "visual.conv1.weight" not in clip_sd:
            raise ValueError(f"{path}: the checkpoint holds no CLIP weights; pass clip=<CLIP file>")
        clip = clip_from_openai_state_dict(clip_sd, act=act, source=str(path))
    elif not isinstance(clip, CLIP):
        clip = load_clip(clip, trust_checkpoint=trust_checkpoint)
    num_branch_layers = _indices(branch_sd, "layers")
    try:
        config = infer_dist_config(branch_sd, **overrides)
    except KeyError as e:
        raise ValueError(f"{path}: the DiST branch is incomplete (no tensor {e.args[0]!r})") from None
    layers = config.resolve_layers(clip.visual.num_layers)
    if len(layers) != num_branch_layers:
        raise ValueError(
            f"{path}: the branch has {num_branch_layers} layers but selected_layers has {len(layers)} "
            f"({layers}); pass selected_layers=[...] with {num_branch_layers} CLIP block indices")
    stem_patch = branch_sd["temporal_stem.weight"].shape[-1]
    if stem_patch != clip.visual.patch_size:
        raise ValueError(f"{path}: the temporal stem's patch is {stem_patch} but CLIP's is "
                         f"{clip.visual.patch_size}: their token grids cannot be fused")
    model = DiSTVideoModel(clip, config, clip_dtype=clip_dtype)
    load_strict_state_dict(model.branch, model.branch.state_dict(), branch_sd, str(path))
    return model
