"""The authors' released checkpoints (``.pyth``): reading them and inferring their sizes.

Their key names (prefixes, the branch's per-layer lists, older releases' names) are in
:mod:`dist_video.authors_keys`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from .authors_keys import BRANCH_PREFIX, STATE_KEYS, branch_keys_from_authors, branch_keys_to_authors, strip_prefixes
from .clip import CLIP
from .classifier import load_strict_state_dict
from .clip_loaders import clip_from_openai_state_dict, load_clip
from .dist import DiSTConfig
from .model import DiSTVideoModel
from .storage import torch_load

__all__ = ["load_official_checkpoint", "read_official_state_dict", "official_to_branch_state_dict",
           "branch_to_official_state_dict", "infer_dist_config"]


def read_official_state_dict(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with the ``module.`` and ``backbone.base_encoder.`` prefixes
    removed and ``ladder_net`` names mapped to ``dist_net`` names. Read with
    ``weights_only=True`` (the authors' files hold only tensors, dicts, numbers and strings); a
    file that needs more is refused unless ``trust_checkpoint`` (see :func:`dist_video.storage.torch_load`)."""
    obj = torch_load(path, trust=trust_checkpoint)
    state_key = next((k for k in STATE_KEYS if isinstance(obj, Mapping) and k in obj), None)
    if state_key is not None:
        obj = obj[state_key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict with 'model_state', got {type(obj).__name__}")
    out = {strip_prefixes(key): value for key, value in obj.items() if torch.is_tensor(value)}
    if not any(k.startswith(BRANCH_PREFIX) for k in out):
        raise ValueError(f"{path}: no DiST branch weights (dist_net.* / ladder_net.*) found; "
                         f"is this a DiST checkpoint? First keys: {list(obj)[:5]}")
    return out


def official_to_branch_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``dist_net.*`` tensors (authors' names) -> :class:`~dist_video.dist.DiSTBranch` keys."""
    return branch_keys_from_authors({k[len(BRANCH_PREFIX):]: v for k, v in state_dict.items()
                                     if k.startswith(BRANCH_PREFIX)})


def branch_to_official_state_dict(branch_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_to_branch_state_dict`: our keys -> ``dist_net.*`` names."""
    return {BRANCH_PREFIX + k: v for k, v in branch_keys_to_authors(branch_sd).items()}


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
        clip_sd = {k: v for k, v in state.items() if not k.startswith(BRANCH_PREFIX)}
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
