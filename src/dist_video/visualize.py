"""Pictures of clips: a film strip of a video's frames."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["film_strip"]


def film_strip(video: str | os.PathLike, path: str | os.PathLike, *, frames: int = 8, title: str = "") -> Path:
    """Save ``frames`` evenly spaced frames of ``video`` side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import probe, read_frames

    info = probe(video)
    n = max(1, min(frames, info.num_frames))
    indices = [round(i * (info.num_frames - 1) / max(1, n - 1)) for i in range(n)]
    images = read_frames(video, indices)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.1))
    axes = [axes] if n == 1 else list(axes)
    for ax, img, idx in zip(axes, images, indices):
        ax.imshow(img.numpy())
        ax.set_title(f"frame {idx}", fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
