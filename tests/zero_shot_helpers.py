"""Models for zero-shot tests: a small CLIP with a full-size text vocabulary, and a real BPE
tokenizer folded into the official-tiny text tower's 512 embeddings."""

from __future__ import annotations

from pathlib import Path

import torch

import dist_video.tokenizer as tk
from dist_video.clip import CLIP, CLIPConfig

SMALL_GZ = Path(__file__).parent / "assets" / "tokenizer" / "small" / "bpe_small_2000.txt.gz"


class ModuloTokenizer:
    """The small 2000-merge test vocabulary's BPE with its ids taken modulo 512: a deterministic
    stand-in for official-tiny's own vocabulary (no real CLIP vocabulary is that small)."""

    vocab_size = 512
    vocab_path = SMALL_GZ

    def __init__(self):
        self.inner = tk.Tokenizer(SMALL_GZ)

    def __call__(self, texts):
        return self.inner(texts) % 512


def tiny_text_clip(path: Path) -> Path:
    """A small CLIP (32 px, patch 16) with a full-size 49408-token text vocabulary, saved as
    OpenAI-layout weights (what ``torch.save(model.state_dict())`` of OpenAI's CLIP gives)."""
    torch.manual_seed(3)
    cfg = CLIPConfig(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=1,
                     context_length=77, vocab_size=49408, text_width=32, text_heads=1, text_layers=1)
    torch.save(CLIP(cfg).state_dict(), path)
    return path
