"""Mixup / CutMix on batches of clips, with label smoothing, and the soft-target loss.

A batch is mixed with itself reversed (sample i with sample B-1-i), one coefficient per
batch, as in timm's batch mode. CutMix cuts one box, the same on every frame of a clip.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MixupCutmix", "one_hot_smoothed", "soft_target_cross_entropy"]


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels (B,) -> targets (B x num_classes): ``1 - smoothing + smoothing / C`` on the
    label, ``smoothing / C`` elsewhere (rows sum to 1)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)
    return out


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c targets[b, c] * log_softmax(logits)[b, c]``;
    logits and targets are B x C."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


class MixupCutmix:
    """Batch-level Mixup (Beta(``mixup_alpha``)) or CutMix (Beta(``cutmix_alpha``)), chosen
    with probability ``switch_prob`` for CutMix when both are enabled, applied with
    probability ``prob``; targets are label-smoothed one-hots mixed with the same weight.

    ``mixer(video B x 3 x T x H x W, labels B, generator=g) -> (mixed video, targets B x C)``.
    ``last_lam`` and ``last_mode`` ("mixup", "cutmix" or "none") describe the last call.
    With both alphas 0 (or ``prob`` 0) the video passes through and targets are smoothed."""

    def __init__(self, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.last_lam = 1.0
        self.last_mode = "none"

    def _choose(self, rng: np.random.Generator) -> tuple[str, float]:
        mix_on, cut_on = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if not (mix_on or cut_on) or rng.random() >= self.prob:
            return "none", 1.0
        if mix_on and cut_on:
            use_cut = rng.random() < self.switch_prob
        else:
            use_cut = cut_on
        if use_cut:
            return "cutmix", float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        return "mixup", float(rng.beta(self.mixup_alpha, self.mixup_alpha))

    @staticmethod
    def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a box of area about ``(1 - lam) * H * W`` centred uniformly at
        random, clipped to the frame."""
        ratio = math.sqrt(1.0 - lam)
        ch, cw = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        return y0, y1, x0, x1

    def __call__(self, video: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if video.dim() != 5:
            raise ValueError(f"expected video B x 3 x T x H x W, got {tuple(video.shape)}")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        mode, lam = self._choose(rng)
        if mode == "mixup":
            video = video.mul(lam).add_(video.flip(0), alpha=1.0 - lam)
        elif mode == "cutmix":
            h, w = video.shape[-2:]
            y0, y1, x0, x1 = self.cut_box(h, w, lam, rng)
            video = video.clone()
            video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually kept
        targets = one_hot_smoothed(labels, self.num_classes, self.label_smoothing)
        if mode != "none":
            targets = targets * lam + targets.flip(0) * (1.0 - lam)
        self.last_lam, self.last_mode = lam, mode
        return video, targets
