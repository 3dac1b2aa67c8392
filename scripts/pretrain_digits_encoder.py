"""Pre-train dist-video's built-in image encoder: a small CLIP-layout ViT that knows handwritten
digits from still images only.

    python scripts/pretrain_digits_encoder.py            # train, write the shipped files
    python scripts/pretrain_digits_encoder.py --check    # re-train, compare with the shipped files

What it does
------------
* Digit images: the *training* part of scikit-learn's bundled 8x8 digits (1258 of 1797), as given
  by :func:`dist_video.data.synthetic.digit_image_split` (the split the synthetic videos use:
  the encoder never sees a held-out digit image; their videos are the demo's validation set).
* Still images drawn like single frames of those videos, with the video renderer's own helpers
  (``_background``: the smooth coloured texture; ``_scaled_digit``: the bilinear 8x8 upscale):
  a 64x64 frame, a light digit (colour U(0.75, 1) per channel) alpha-blended at a random place
  and size (side log-uniform in 12%..48% of the frame: the videos go from 12.6% at the end of
  "recede" to 47% at the end of "approach"; 30% of the stills draw from 12%..20%, the hardest
  sizes), Gaussian noise (std 0.015), uint8 rounding; then the video pipeline's training view: a
  random resized crop (area 70..100%, aspect 3/4..4/3, keeping >= 80% of the digit's ink)
  resized to 48x48 (bilinear, antialiased), brightness and contrast jitter (+-40%, p = 0.8,
  random order) and CLIP's mean/std normalisation. Backgrounds come from a bank of 4096 drawn
  with ``_background``, re-used under flips, transposition and channel permutations (which leave
  the texture distribution unchanged) so that drawing a batch stays cheap.
* Model: ``CLIP(CLIPConfig(image_size=48, patch_size=8, vision_width=128, vision_layers=4,
  vision_heads=2, embed_dim=128, act="quick_gelu", text_layers=0))`` plus two throw-away heads: a
  linear 10-way head on the image embedding (``encode_image``: ``ln_post(class token) @ proj``)
  and a linear 11-way head on every final patch token (``ln_post(token)``: the digit if the patch
  holds enough of its ink, else "background"; soft targets), cross-entropy on both.
* Training speed-ups that leave the shipped model a plain CLIP ViT: a size curriculum (digits no
  smaller than 30% of the frame at first, the full range after 20% of the steps) and token
  dropping (for the first 90% of the steps the transformer sees the class token and 8 of the 36
  patch tokens: the digit's patches first, then random background ones; the last 10% use all
  tokens, as at inference).
* Evaluation (fixed seeds, no augmentation, the pipeline's test view: the whole 64x64 frame
  resized to 48x48): accuracy of the pre-training head on held-out digit images drawn as stills
  (4 renderings of each held-out image, also split by digit size) and on every frame of one
  synthetic video of each held-out image (:func:`~dist_video.data.synthetic.render_video`,
  motions left/right/approach/recede), on training digit images, and a linear probe (logistic
  regression fitted on frozen embeddings of training digit images) on the held-out stills.

Outputs (``--out-dir``, default ``src/dist_video/assets``)
---------------------------------------------------------
* ``digits-vit.safetensors``: the ``visual.*`` weights in OpenAI's CLIP layout (float32), with
  metadata ``format=openai-clip-visual``, ``act=quick_gelu`` and the full ``clip_config`` (JSON),
  which :func:`dist_video.load_clip` honours.
* ``digits-vit.json``: the accuracies, training time, machine, model config and recipe.

``--check`` trains again with the recorded recipe (into a temporary folder), compares its
held-out accuracy with the recorded one (must agree within one point), reports whether the
weights came out bit-identical, and stores the outcome under ``"reproduction_check"`` in
``digits-vit.json`` (the shipped weights are not touched).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_video.clip import CLIP, CLIPConfig
from dist_video.data.synthetic import (DEFAULT_MOTIONS, _background, _digits, _scaled_digit,
                                       digit_image_split, render_video)
from dist_video.data.transforms import CLIP_MEAN, CLIP_STD

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "dist_video" / "assets"
NAME = "digits-vit"
SIDE_BUCKETS = [(0, 8), (8, 10), (10, 13), (13, 17), (17, 24)]  # digit side at 48x48, pixels
FORMAT = "openai-clip-visual"


# ============================================================================ recipe
@dataclass
class Recipe:
    """Everything that determines the weights (recorded in the JSON and the safetensors metadata)."""

    seed: int = 0
    digit_split_seed: int = 0          # digit_image_split(seed)
    # model
    image_size: int = 48
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    embed_dim: int = 128
    act: str = "quick_gelu"
    # data
    frame_size: int = 64               # frames are drawn at the synthetic videos' size, then resized
    side_range: tuple = (0.12, 0.48)   # digit side / frame side, log-uniform
    small_digit_p: float = 0.3         # probability of drawing the side from [side_range[0], small_digit_max]
    small_digit_max: float = 0.2       # (extra practice on the hardest, smallest digits)
    curriculum_min_side: float = 0.30  # the smallest side starts here (large digits first) ...
    curriculum_frac: float = 0.2       # ... and reaches side_range[0] (log-linearly) after this part of training
    crop_area: tuple = (0.7, 1.0)      # random resized crop (fraction of the frame's area)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    crop_keep_digit: float = 0.8       # crops keep at least this fraction of the digit's ink
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8
    noise_std: float = 0.015
    background_bank: int = 4096
    # optimisation
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    keep_tokens: int = 8               # >0: train on the class token + this many patch tokens (the
                                       # digit's patches first, then random background ones) ...
    full_tokens_frac: float = 0.1      # ... except in this last part of training (all tokens)
    patch_loss: float = 1.0            # weight of the auxiliary per-patch loss (0: off)
    patch_full_coverage: float = 0.1   # a patch whose digit coverage reaches this is labelled the digit
    bf16: bool = True                  # bf16 autocast on CPU (weights and optimiser in float32)
    threads: int = 2
    # evaluation
    eval_renders_per_image: int = 4
    eval_train_images: int = 2000

    def clip_config(self) -> CLIPConfig:
        return CLIPConfig(embed_dim=self.embed_dim, image_size=self.image_size, patch_size=self.patch_size,
                          vision_width=self.width, vision_layers=self.layers,
                          vision_heads=max(1, self.width // 64), act=self.act, text_layers=0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ============================================================================ rendering
_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as float32 8x8 images in [0, 1] and their labels (the videos' arrays)."""
    return _digits()


def _paste(frame: np.ndarray, image: np.ndarray, rng: np.random.Generator, side_range,
           alpha_out: np.ndarray | None = None) -> float:
    """Alpha-blend ``image`` (8x8, [0,1]) into ``frame`` (S x S x 3, float) in place, the way the
    synthetic videos do: a light colour, bilinear upscale, random side (log-uniform) and place.
    Writes the digit's alpha into ``alpha_out`` (S x S) if given; returns (top, left, side) in pixels."""
    size = frame.shape[0]
    colour = rng.uniform(0.75, 1.0, 3).astype(np.float32)
    lo, hi = math.log(side_range[0]), math.log(side_range[1])
    side = max(3, int(round(size * math.exp(rng.uniform(lo, hi)))))
    top = int(rng.integers(0, size - side + 1))
    left = int(rng.integers(0, size - side + 1))
    a = _scaled_digit(image, side)
    patch = frame[top:top + side, left:left + side]
    frame[top:top + side, left:left + side] = patch * (1 - a[:, :, None]) + colour * a[:, :, None]
    if alpha_out is not None:
        alpha_out[top:top + side, left:left + side] = a
    return top, left, side


def to_model_input(frames_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 N x 3 x S x S (whole frames) -> float N x 3 x s x s: the pipeline's test view
    (bilinear resize, antialiased when shrinking) and CLIP normalisation."""
    x = frames_uint8
    if x.shape[-1] != image_size:
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(image_size, image_size),
                          mode="bilinear", align_corners=False, antialias=x.shape[-1] > image_size)
    return (x.float() / 255 - _MEAN) / _STD


def render_stills(images: np.ndarray, seed, recipe: Recipe, return_sides: bool = False):
    """Evaluation stills: one frame per 8x8 image with a fresh ``_background`` and the videos'
    noise, shown whole (no crop, no jitter). Deterministic in ``seed``. -> N x 3 x s x s float
    (and the digit sides as fractions of the frame, with ``return_sides``)."""
    rng = np.random.default_rng(seed)
    size = recipe.frame_size
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    sides = np.empty(len(images))
    for k, image in enumerate(images):
        frame = _background(rng, size)
        sides[k] = _paste(frame, image, rng, recipe.side_range)[2] / size
        frame = frame + rng.normal(0.0, recipe.noise_std, frame.shape).astype(np.float32)
        out[k] = torch.from_numpy((np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8)).permute(2, 0, 1)
    x = to_model_input(out, recipe.image_size)
    return (x, sides) if return_sides else x


def render_video_frames(images: np.ndarray, seed: int, recipe: Recipe, num_frames: int = 16) -> torch.Tensor:
    """Every frame of one synthetic video per image (motions cycling through the demo's four),
    as the pipeline's test view sees them. -> (N * num_frames) x 3 x s x s float."""
    clips = []
    for k, image in enumerate(images):
        motion = DEFAULT_MOTIONS[k % len(DEFAULT_MOTIONS)]
        frames = render_video(image, motion, np.random.default_rng([seed, k]),
                              num_frames=num_frames, size=recipe.frame_size)
        clips.append(torch.from_numpy(frames).permute(0, 3, 1, 2))
    return to_model_input(torch.cat(clips), recipe.image_size)


class TrainRenderer:
    """Augmented training stills, drawn batch by batch from one numpy and one torch generator."""

    def __init__(self, images: np.ndarray, recipe: Recipe, seed: int):
        self.images = images
        self.r = recipe
        self.rng = np.random.default_rng([seed, 1])
        self.gen = torch.Generator().manual_seed(seed + 2)
        bank_rng = np.random.default_rng([seed, 3])
        self.bank = np.stack([_background(bank_rng, recipe.frame_size) for _ in range(recipe.background_bank)])

    def _background_into(self, out: np.ndarray) -> None:
        """A bank background, randomly flipped / transposed / channel-permuted, copied into ``out``."""
        rng = self.rng
        bg = self.bank[rng.integers(len(self.bank))]
        if rng.random() < 0.5:
            bg = bg[::-1]
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        if rng.random() < 0.5:
            bg = bg.transpose(1, 0, 2)
        perm = rng.permutation(3)
        for c in range(3):
            out[:, :, c] = bg[:, :, perm[c]]

    def _crop_box(self, alpha: np.ndarray, dt: int, dl: int, side: int) -> tuple[int, int, int, int]:
        """A random resized crop (top, left, h, w) of the S x S frame that keeps at least
        ``crop_keep_digit`` of the digit's ink (``alpha``), so that no still loses its label."""
        rng, r = self.rng, self.r
        size = alpha.shape[0]
        ink = alpha[dt:dt + side, dl:dl + side]
        total = float(ink.sum())
        for _ in range(20):
            area = size * size * rng.uniform(*r.crop_area)
            ratio = math.exp(rng.uniform(math.log(r.crop_ratio[0]), math.log(r.crop_ratio[1])))
            w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < w <= size and 0 < h <= size:
                top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
                kept = ink[max(0, top - dt):max(0, top + h - dt), max(0, left - dl):max(0, left + w - dl)]
                if float(kept.sum()) >= r.crop_keep_digit * total:
                    return top, left, h, w
        return 0, 0, size, size

    def batch(self, indices: np.ndarray, side_range=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs N x 3 x s x s and the digit's coverage of each patch, N x g x g (the mean
        alpha of the digit over the patch's pixels, after the same crop and resize)."""
        r, size, s = self.r, self.r.frame_size, self.r.image_size
        side_range = side_range or r.side_range
        n = len(indices)
        frames = np.zeros((n, size, size, 4), dtype=np.float32)  # RGB + the digit's alpha
        boxes = []
        for k, i in enumerate(indices):
            frame = frames[k]
            self._background_into(frame[:, :, :3])
            sides = side_range
            if r.small_digit_p and self.rng.random() < r.small_digit_p:
                sides = (side_range[0], max(side_range[0], min(r.small_digit_max, side_range[1])))
            boxes.append(_paste(frame[:, :, :3], self.images[i], self.rng, sides, frame[:, :, 3]))
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # N x 4 x S x S, channels-last in memory
        x[:, :3] += r.noise_std * torch.randn((n, size, size, 3), generator=self.gen).permute(0, 3, 1, 2)
        x = (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8)  # the videos' frames are uint8
        views = torch.empty(n, 4, s, s, dtype=torch.uint8)
        for k in range(n):
            dt, dl, side = boxes[k]  # the digit's ink lies inside this box
            top, left, h, w = self._crop_box(frames[k, :, :, 3], dt, dl, side)
            views[k] = F.interpolate(x[k:k + 1, :, top:top + h, left:left + w], size=(s, s), mode="bilinear",
                                     align_corners=False, antialias=h > s or w > s)[0]
        coverage = F.avg_pool2d(views[:, 3:].float() / 255, r.patch_size)[:, 0]  # N x g x g
        y = views[:, :3].float() / 255
        # brightness / contrast jitter (probability jitter_p, random order), as the video pipeline's
        u = torch.rand(n, 4, generator=self.gen)
        on = (u[:, 0] < r.jitter_p).float().view(n, 1, 1, 1)
        b = (1 + r.brightness * (2 * u[:, 1] - 1)).view(n, 1, 1, 1)
        c = (1 + r.contrast * (2 * u[:, 2] - 1)).view(n, 1, 1, 1)
        b = on * b + (1 - on)
        c = on * c + (1 - on)
        grey = lambda t: (t * _LUMA).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # noqa: E731
        bright_first = (u[:, 3] < 0.5).view(n, 1, 1, 1)
        y1 = y * b
        y1 = (y1 - grey(y1)) * c + grey(y1)          # brightness, then contrast
        y2 = (y - grey(y)) * c + grey(y)
        y2 = y2 * b                                  # contrast, then brightness
        y = torch.where(bright_first, y1, y2).clamp(0, 1)
        return (y - _MEAN) / _STD, coverage


class TrainStream(torch.utils.data.IterableDataset):
    """The training batches of a whole run, in order: (inputs, patch coverage, labels, token-drop
    scores) for each step. Deterministic, so it can run in a worker process (rendering then
    overlaps the training step) or in the main one with identical results."""

    def __init__(self, recipe: Recipe):
        self.r = recipe

    def __iter__(self):
        r = self.r
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)
        images, targets = digit_images()
        train_idx, _ = digit_image_split(r.digit_split_seed)
        renderer = TrainRenderer(images, r, r.seed)
        order_rng = np.random.default_rng([r.seed, 4])
        order = np.empty(0, dtype=np.int64)
        grid = r.image_size // r.patch_size
        for step in range(r.steps):
            while len(order) < r.batch_size:  # epochs over the training digit images, reshuffled
                order = np.concatenate([order, train_idx[order_rng.permutation(len(train_idx))]])
            idx, order = order[:r.batch_size], order[r.batch_size:]
            x, coverage = renderer.batch(idx, _side_range_at(step, r))
            scores = torch.rand(len(idx), grid * grid, generator=renderer.gen)
            yield x, coverage, torch.from_numpy(targets[idx]), scores


# ============================================================================ training
def _setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _side_range_at(step: int, r: Recipe) -> tuple[float, float]:
    """Size curriculum: the smallest digit side shrinks log-linearly from curriculum_min_side to
    side_range[0] over the first curriculum_frac of the steps."""
    lo, hi = r.side_range
    t = min(1.0, step / max(1, r.curriculum_frac * r.steps)) if r.curriculum_frac > 0 else 1.0
    start = max(lo, min(r.curriculum_min_side, hi))
    return math.exp(math.log(start) + t * (math.log(lo) - math.log(start))), hi


def _lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    t = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def embed(model: CLIP, x: torch.Tensor, bf16: bool, batch: int = 512) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model.encode_image(x[i:i + batch]).float())
    return torch.cat(out)


def train(recipe: Recipe, log=print, workers: int = 0) -> tuple[CLIP, torch.nn.Linear, dict]:
    """Train the encoder and its throw-away head. Returns (model, head, stats)."""
    r = recipe
    _setup(r.threads)
    torch.manual_seed(r.seed)
    train_idx, _ = digit_image_split(r.digit_split_seed)
    model = CLIP(r.clip_config())
    head = torch.nn.Linear(r.embed_dim, 10)
    patch_head = torch.nn.Linear(r.width, 11)  # per patch: the digit, or 10 = background
    named = (list(model.named_parameters()) + list(head.named_parameters())
             + list(patch_head.named_parameters()))
    params = [p for _, p in named]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=tuple(r.betas))
    t0 = time.perf_counter()
    stream = torch.utils.data.DataLoader(TrainStream(r), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    batches = iter(stream)
    t_wait = 0.0
    loss_ema, acc_ema = None, None
    for step in range(r.steps):
        tw = time.perf_counter()
        x, coverage, y, scores = next(batches)
        t_wait += time.perf_counter() - tw
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, r)
        model.train()
        cov = coverage.flatten(1)  # N x g*g
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            emb = model.visual.embed(x)  # N x (1 + g*g) x D
            if r.keep_tokens and step < (1 - r.full_tokens_frac) * r.steps:
                # token dropping: the digit's patches (random order) first, then random others
                score = scores + (cov > 0.02).float()
                sel = score.topk(r.keep_tokens, dim=1).indices.sort(1).values  # N x K
                patches = emb[:, 1:].gather(1, sel[..., None].expand(-1, -1, emb.shape[-1]))
                emb = torch.cat([emb[:, :1], patches], 1)
                cov = cov.gather(1, sel)
            tokens, _ = model.visual.transformer(emb)
            logits = head(model.visual.pool(tokens)).float()
            if r.patch_loss:
                patch_logits = patch_head(model.visual.ln_post(tokens[:, 1:])).float()  # N x g*g x 11
        loss = F.cross_entropy(logits, y, label_smoothing=r.label_smoothing)
        if r.patch_loss:
            # soft per-patch targets: the digit with weight min(1, coverage / full), else background
            w = (cov / r.patch_full_coverage).clamp(max=1.0)  # N x tokens
            target = torch.zeros(patch_logits.shape)
            target[..., 10] = 1 - w
            target.scatter_(2, y.view(-1, 1, 1).expand(-1, w.shape[1], 1), w[..., None])
            patch_ce = -(target * F.log_softmax(patch_logits, -1)).sum(-1).mean()
            loss = loss + r.patch_loss * patch_ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
        opt.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        acc_ema = acc if acc_ema is None else 0.95 * acc_ema + 0.05 * acc
        if (step + 1) % 100 == 0 or step == 0:
            log(f"step {step + 1:5d}/{r.steps}  lr {_lr_at(step, r):.2e}  loss {loss_ema:.3f}  "
                f"batch acc {100 * acc_ema:5.1f}%  {time.perf_counter() - t0:6.1f} s")
    seconds = time.perf_counter() - t0
    model.eval()
    return model, head, {"train_seconds": round(seconds, 1), "waiting_for_data_seconds": round(t_wait, 1),
                         "images_seen": r.steps * r.batch_size,
                         "epochs_over_digit_images": round(r.steps * r.batch_size / len(train_idx), 1)}


# ============================================================================ evaluation
def eval_sets(r: Recipe) -> dict:
    """Fixed evaluation inputs: {name: (x, y)}, and the held-out stills' digit sides."""
    images, targets = digit_images()
    train_idx, held_idx = digit_image_split(r.digit_split_seed)
    k = r.eval_renders_per_image
    held_rep = np.repeat(held_idx, k)
    train_pick = np.random.default_rng([r.seed, 10]).choice(train_idx, size=r.eval_train_images, replace=True)
    probe_pick = np.repeat(train_idx, 2)
    held_x, held_sides = render_stills(images[held_rep], [r.seed, 11], r, return_sides=True)
    return {
        "heldout_stills": (held_x, torch.from_numpy(targets[held_rep])),
        "heldout_sides": held_sides,
        "heldout_video_frames": (render_video_frames(images[held_idx], 12 + r.seed, r),
                                 torch.from_numpy(np.repeat(targets[held_idx], 16))),
        "train_stills": (render_stills(images[train_pick], [r.seed, 13], r), torch.from_numpy(targets[train_pick])),
        "probe_fit_train_stills": (render_stills(images[probe_pick], [r.seed, 14], r),
                                   torch.from_numpy(targets[probe_pick])),
    }


def linear_probe_accuracy(e_fit: torch.Tensor, y_fit: torch.Tensor, e_test: torch.Tensor,
                          y_test: torch.Tensor) -> float:
    """Logistic regression on standardised frozen embeddings (what a new head on the encoder gets)."""
    from sklearn.linear_model import LogisticRegression
    mu, sd = e_fit.mean(0), e_fit.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000)
    clf.fit(((e_fit - mu) / sd).numpy(), y_fit.numpy())
    return float((clf.predict(((e_test - mu) / sd).numpy()) == y_test.numpy()).mean())


def evaluate(model: CLIP, head: torch.nn.Linear, r: Recipe) -> dict:
    sets = eval_sets(r)
    emb = {name: embed(model, v[0], r.bf16) for name, v in sets.items() if isinstance(v, tuple)}
    out = {}
    with torch.no_grad():
        for name in ("heldout_stills", "heldout_video_frames", "train_stills"):
            pred = head(emb[name]).argmax(1)
            out[f"{name}_accuracy"] = round(float((pred == sets[name][1]).float().mean()), 4)
            out[f"{name}_count"] = len(sets[name][1])
    out["linear_probe_heldout_stills_accuracy"] = round(linear_probe_accuracy(
        emb["probe_fit_train_stills"], sets["probe_fit_train_stills"][1],
        emb["heldout_stills"], sets["heldout_stills"][1]), 4)
    pred = head(emb["heldout_stills"]).argmax(1)
    y = sets["heldout_stills"][1]
    out["heldout_stills_per_digit_accuracy"] = [round(float((pred[y == d] == d).float().mean()), 4)
                                                for d in range(10)]
    px = torch.from_numpy(sets["heldout_sides"] * r.image_size)  # digit side in model-input pixels
    by_side = {}
    for lo, hi in SIDE_BUCKETS:
        sel = (px >= lo) & (px < hi)
        if sel.any():
            by_side[f"{lo}-{hi}px"] = {"accuracy": round(float((pred[sel] == y[sel]).float().mean()), 4),
                                       "count": int(sel.sum())}
    out["heldout_stills_accuracy_by_digit_side"] = by_side
    return out


# ============================================================================ files
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} logical CPUs visible; {platform.system()} {platform.release()}"


def save(model: CLIP, r: Recipe, results: dict, out_dir: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {f"visual.{k}": v.detach().float().contiguous() for k, v in model.visual.state_dict().items()}
    cfg = r.clip_config().to_dict()
    meta = {"format": FORMAT, "act": r.act, "clip_config": json.dumps(cfg, sort_keys=True),
            "layer_norm_eps": str(cfg["layer_norm_eps"]), "vision_heads": str(cfg["vision_heads"]),
            "image_mean": json.dumps(list(CLIP_MEAN)), "image_std": json.dumps(list(CLIP_STD)),
            "name": NAME, "description": "dist-video built-in digits encoder: image-only CLIP-layout ViT "
            "pre-trained on still images of sklearn digits (training split) on textured backgrounds",
            "digit_split_seed": str(r.digit_split_seed),
            "heldout_stills_accuracy": str(results["heldout_stills_accuracy"]),
            "recipe": json.dumps(r.to_dict(), sort_keys=True)}
    wpath = out_dir / f"{NAME}.safetensors"
    save_file(weights, str(wpath), metadata=meta)
    os.chmod(wpath, 0o644)  # safetensors writes 0600; the file ships inside the package
    jpath = out_dir / f"{NAME}.json"
    jpath.write_text(json.dumps(results, indent=2) + "\n")
    return wpath, jpath


def run(recipe: Recipe, out_dir: Path, log=print, workers: int = 0,
        command: str = "python scripts/pretrain_digits_encoder.py") -> dict:
    t0 = time.perf_counter()
    model, head, stats = train(recipe, log, workers)
    t_eval = time.perf_counter()
    metrics = evaluate(model, head, recipe)
    results = {
        "file": f"{NAME}.safetensors",
        **metrics,
        **stats,
        "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "parameters": sum(p.numel() for p in model.visual.parameters()),
        "clip_config": recipe.clip_config().to_dict(),
        "recipe": recipe.to_dict(),
        "heldout_digit_images": int(len(digit_image_split(recipe.digit_split_seed)[1])),
        "train_digit_images": int(len(digit_image_split(recipe.digit_split_seed)[0])),
        "machine": machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "command": command,
    }
    wpath, jpath = save(model, recipe, results, out_dir)
    results["weights_path"], results["json_path"] = str(wpath), str(jpath)
    results["_model"] = model
    return results


def check(out_dir: Path, tolerance: float = 0.01, workers: int = 0) -> bool:
    """Re-train with the shipped recipe; compare accuracy (and weights) with the shipped files."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    jpath = out_dir / f"{NAME}.json"
    wpath = out_dir / f"{NAME}.safetensors"
    shipped = json.loads(jpath.read_text())
    with safe_open(str(wpath), framework="pt") as f:
        shipped_recipe = json.loads(f.metadata()["recipe"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in shipped_recipe.items()}
    recipe = Recipe(**fields)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = run(recipe, Path(tmp), log=lambda s: print(s, file=sys.stderr), workers=workers,
                    command=shipped.get("command", ""))
        a, b = load_file(str(wpath)), load_file(fresh["weights_path"])
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        max_diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("nan")
    keys = ("heldout_stills_accuracy", "heldout_video_frames_accuracy", "train_stills_accuracy",
            "linear_probe_heldout_stills_accuracy")
    diffs = {k: round(fresh[k] - shipped[k], 4) for k in keys}
    ok = abs(diffs["heldout_stills_accuracy"]) <= tolerance
    outcome = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "passed": ok, "tolerance": tolerance,
               "retrained": {k: fresh[k] for k in keys}, "shipped": {k: shipped[k] for k in keys},
               "difference": diffs, "weights_bit_identical": identical, "max_abs_weight_difference": max_diff,
               "train_seconds": fresh["train_seconds"], "total_seconds": fresh["total_seconds"],
               "machine": fresh["machine"], "torch": fresh["torch"]}
    shipped["reproduction_check"] = outcome
    jpath.write_text(json.dumps(shipped, indent=2) + "\n")
    print(json.dumps(outcome, indent=2))
    print("reproduction check " + ("PASSED" if ok else "FAILED") +
          f": held-out accuracy {100 * fresh['heldout_stills_accuracy']:.2f}% vs shipped "
          f"{100 * shipped['heldout_stills_accuracy']:.2f}% (tolerance {100 * tolerance:.0f} point)")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"where to write (default {DEFAULT_OUT})")
    p.add_argument("--check", action="store_true",
                   help="re-train with the shipped recipe and compare with the shipped accuracy")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (experiments)")
    p.add_argument("--threads", type=int, default=None, help="override the thread count (default 2)")
    p.add_argument("--render-workers", type=int, default=0,
                   help="draw the training images in this many worker processes (0: in the training "
                        "process; the fastest on 2 cores). Does not change the weights")
    args = p.parse_args(argv)
    recipe = Recipe()
    if args.steps is not None:
        recipe.steps = args.steps
    if args.threads is not None:
        recipe.threads = args.threads
    if args.check:
        return 0 if check(args.out_dir, workers=args.render_workers) else 1
    command = "python scripts/pretrain_digits_encoder.py" + "".join(
        f" {flag} {value}" for flag, value in (("--steps", args.steps), ("--threads", args.threads))
        if value is not None)
    res = run(recipe, args.out_dir, workers=args.render_workers, command=command)
    show = {k: v for k, v in res.items() if not k.startswith("_") and k not in ("recipe", "clip_config")}
    print(json.dumps(show, indent=2))
    print(f"held-out accuracy: {100 * res['heldout_stills_accuracy']:.2f}% (stills), "
          f"{100 * res['heldout_video_frames_accuracy']:.2f}% (video frames); "
          f"train {100 * res['train_stills_accuracy']:.2f}%; {res['train_seconds']:.0f} s training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
