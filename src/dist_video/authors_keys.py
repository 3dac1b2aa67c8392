"""The authors' checkpoint names, in one place: how their released ``.pyth`` files name the
DiST branch and the CLIP inside it, and the map between their branch keys and
:class:`~dist_video.dist.DiSTBranch`'s.

Their files hold ``{"model_state": {...}}`` with every key under ``backbone.base_encoder.``
(sometimes behind a ``module.`` prefix from DDP): the OpenAI-layout CLIP weights plus the
branch under ``dist_net.`` (older files: ``ladder_net.`` with other sub-names). Inside the
branch they keep one list per part (``temporal_nets.<i>``, ``input_linears.<i>`` ...) where
this package keeps the parts of one layer together (``layers.<i>.temporal_block`` ...); the
names inside each part are the same.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

__all__ = ["STATE_KEYS", "DDP_PREFIX", "MODEL_PREFIX", "BRANCH_PREFIX", "LEGACY_BRANCH_PREFIX", "LEGACY_BRANCH_NAMES",
           "LAYER_PARTS", "strip_prefixes", "branch_keys_from_authors", "branch_keys_to_authors"]

#: The top-level entries that hold the tensors, in the order they are looked for.
STATE_KEYS = ("model_state", "state_dict")
#: The prefix a model saved from DistributedDataParallel carries.
DDP_PREFIX = "module."
#: The prefix of every model key (CLIP and branch).
MODEL_PREFIX = "backbone.base_encoder."
#: The DiST branch's prefix, and its name in older releases.
BRANCH_PREFIX = "dist_net."
LEGACY_BRANCH_PREFIX = "ladder_net."

#: Older releases' sub-names of the branch -> the current ones (all others are unchanged).
LEGACY_BRANCH_NAMES = {
    "input_map_feat_nets": "input_linears",
    "s2t_fuse_nets": "integration2temporal_nets",
    "t2s_fuse_nets": "temporal2integration_nets",
    "spatial_nets": "integration_nets",
    "final_temporal_nets": "adapooling_nets",
}

#: The authors' per-layer lists -> the parts of :class:`~dist_video.dist.DiSTLayer` (``layers.<i>.*``).
LAYER_PARTS = {
    "temporal_nets": "temporal_block",
    "input_linears": "input_linear",
    "integration2temporal_nets": "integration_to_temporal",
    "temporal2integration_nets": "temporal_to_integration",
    "integration_nets": "integration_block",
}
_AUTHORS_KEY = re.compile(r"(" + "|".join(LAYER_PARTS) + r")\.(\d+)\.(.*)")
_OUR_KEY = re.compile(r"layers\.(\d+)\.(" + "|".join(LAYER_PARTS.values()) + r")\.(.*)")


def strip_prefixes(key: str) -> str:
    """A key of the authors' file without its DDP and model prefixes, older branch names
    mapped to the current ones: ``module.backbone.base_encoder.ladder_net.spatial_nets.0.x``
    -> ``dist_net.integration_nets.0.x``."""
    key = key.removeprefix(DDP_PREFIX).removeprefix(MODEL_PREFIX).removeprefix(DDP_PREFIX)
    if key.startswith(LEGACY_BRANCH_PREFIX):
        head, _, tail = key[len(LEGACY_BRANCH_PREFIX):].partition(".")
        key = BRANCH_PREFIX + LEGACY_BRANCH_NAMES.get(head, head) + ("." + tail if tail else "")
    return key


def _renamed(state_dict: Mapping[str, torch.Tensor], pattern: re.Pattern, rename) -> dict[str, torch.Tensor]:
    """``state_dict`` with every key that ``pattern`` matches replaced by ``rename(*groups)``."""
    return {(rename(*m.groups()) if (m := pattern.fullmatch(key)) else key): value
            for key, value in state_dict.items()}


def branch_keys_from_authors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A branch state dict with the authors' names (``dist_net.`` removed: ``temporal_stem``,
    ``input_linears.<i>.*``, ...) -> :class:`~dist_video.dist.DiSTBranch` keys
    (``layers.<i>.input_linear.*``, ...)."""
    return _renamed(state_dict, _AUTHORS_KEY, lambda part, index, rest: f"layers.{index}.{LAYER_PARTS[part]}.{rest}")


def branch_keys_to_authors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`branch_keys_from_authors`."""
    theirs = {v: k for k, v in LAYER_PARTS.items()}
    return _renamed(state_dict, _OUR_KEY, lambda index, part, rest: f"{theirs[part]}.{index}.{rest}")
