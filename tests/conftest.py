"""Shared test helpers. Tests take these as fixtures; no test file imports another test file."""

from __future__ import annotations

import os

import pytest
import torch

from dist_video.clip import CLIP, CLIPConfig

# One intra-op thread unless OMP_NUM_THREADS says otherwise: the tests' models are tiny, so on a
# shared 2-core machine torch's default (a thread per core) makes the suite 2-3x slower, and
# CPU results then do not depend on the machine's core count. (The CLI subprocesses set their own.)
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def _tiny_clip(width=128, layers=4, heads=None, patch=16, image=64, embed=64, seed=0):
    """A small image-only CLIP with seeded random weights at realistic scales, in eval mode."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(embed_dim=embed, image_size=image, patch_size=patch, vision_width=width,
                     vision_layers=layers, vision_heads=heads or width // 64, text_layers=0)
    clip = CLIP(cfg)
    # Random weights with realistic scales (the default init leaves biases zero).
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
    return clip.eval()


@pytest.fixture(scope="session")
def tiny_clip():
    """Factory: ``tiny_clip(width=128, layers=4, heads=None, patch=16, image=64, embed=64, seed=0)`` builds a
    new tiny CLIP on every call (seeded, so the same arguments give the same weights)."""
    return _tiny_clip
