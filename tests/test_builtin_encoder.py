"""The bundled image encoder: size, loading through load_clip, and that it knows digits."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_video import load_clip
from dist_video.data.synthetic import _digits, digit_image_split, render_video
from dist_video.data.transforms import CLIP_MEAN, CLIP_STD
from dist_video.clip_loaders import resolve_clip_path

ASSETS = resources.files("dist_video") / "assets"


def test_shipped_files_and_model_card():
    weights = ASSETS / "digits-vit.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 5 * 2**20
    card = (ASSETS / "digits-vit.md").read_text()
    results = json.loads((ASSETS / "digits-vit.json").read_text())
    assert f"{100 * results['heldout_stills_accuracy']:.1f}%" in card  # the card quotes the measured number
    assert results["heldout_stills_accuracy"] > 0.85
    assert resolve_clip_path("builtin:digits") == str(weights)


def _frames(indices: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """The middle frame of one synthetic video per digit image, as the demo's pipeline sees it."""
    images, targets = _digits()
    frames = []
    for k, i in enumerate(indices):
        video = render_video(images[i], ("left", "approach")[k % 2], np.random.default_rng([seed, k]))
        frames.append(torch.from_numpy(video[8]).permute(2, 0, 1))
    x = F.interpolate(torch.stack(frames).float() / 255, size=(48, 48), mode="bilinear", antialias=True)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return x, targets[indices]


@pytest.mark.slow
def test_loads_as_an_image_only_clip_and_separates_held_out_digits():
    from sklearn.linear_model import LogisticRegression

    clip = load_clip(resolve_clip_path("builtin:digits"))
    assert clip.config.image_size == 48 and clip.config.patch_size == 8 and clip.config.text_layers == 0
    assert clip.config.act == "quick_gelu"
    train_idx, held_idx = digit_image_split(0)
    xs, ys = _frames(train_idx[:300], 1)
    xh, yh = _frames(held_idx[:200], 2)
    with torch.no_grad():
        es, eh = clip.encode_image(xs), clip.encode_image(xh)
    assert es.shape == (300, 128)
    mu, sd = es.mean(0), es.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000).fit(((es - mu) / sd).numpy(), ys)
    accuracy = (probe.predict(((eh - mu) / sd).numpy()) == yh).mean()
    assert accuracy > 0.85, accuracy  # the same ViT with random weights: 0.085
