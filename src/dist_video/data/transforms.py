"""Clip transforms in plain torch: uint8 ``T x H x W x 3`` in, float ``3 x T x S x S`` out.

Every random parameter is drawn once per clip and applied to all its frames. The work is
ordered so that almost nothing is spent beyond decoding: the crop is a view of the uint8
frames, the only resampling is one ``F.interpolate`` of the crop to ``S x S`` in uint8
(antialiased when downscaling), and colour jitter, grayscale and normalisation are folded
into a single affine colour map applied while converting to float.

Each transform runs in two steps. :meth:`TrainTransform.geometry` (crop, resize, flip, and the
draw of the clip's colour map) stays in uint8 and is what DataLoader workers run: a worker ships
a quarter of the bytes of a float32 clip. :func:`normalize_clips` (colour map, clamp,
``(x - mean) / std``) takes a batch of such clips on any device, after they are moved there.
Calling a transform runs both (``transform(clip)`` returns the float clip).

Colour jitter (brightness, contrast, saturation, hue; random order like torchvision's
``ColorJitter``) is therefore an affine map per clip: hue is a rotation about the grey axis
in YIQ space (torchvision rotates in HSV), the contrast reference is the clip's mean grey,
and values are clamped to [0, 1] once at the end (torchvision clamps after each step). Without
the intermediate clamps the four operations commute, so the random order (kept for parity)
does not change the result. The statistics of the augmentation are the same; individual
saturated pixels can differ a little.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .sampling import Rng, randint, uniform

__all__ = ["CLIP_MEAN", "CLIP_STD", "TrainTransform", "TestTransform", "flip_label_map",
           "random_resized_crop_box", "color_jitter_matrix", "normalize_clips"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ITU-R BT.601 luma weights (what torchvision's rgb_to_grayscale uses)
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.595716, -0.274453, -0.321263],
                            [0.211456, -0.522591, 0.311135]], dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: Rng) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random crop covering ``scale`` of the area
    with aspect ratio (w/h) in ``ratio`` (log-uniform); torchvision's algorithm: 10 tries,
    then a centre crop with the ratio clamped to the allowed range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = uniform(rng, 2)
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return randint(rng, 0, height - h), randint(rng, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter_matrix(brightness: float, contrast: float, saturation: float, hue: float, *,
                        order: Sequence[int], mean_rgb: torch.Tensor, grayscale: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine colour map ``x -> M @ x + b`` (x: RGB in [0, 1]) of a colour jitter with
    the given factors (brightness/contrast/saturation multiplicative, 1 = identity; hue in
    turns, 0 = identity) applied in ``order`` (a permutation of 0..3 for brightness,
    contrast, saturation, hue), then grayscale if asked. ``mean_rgb`` (3,) is the clip's mean
    colour, the reference of the contrast step. Returns (M 3x3, b 3), float64."""
    m = torch.eye(3, dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    mean_rgb = mean_rgb.to(torch.float64)
    for op in order:
        if op == 0:
            m, b = brightness * m, brightness * b
        elif op == 1:
            grey = float(_LUMA @ (m @ mean_rgb + b))
            m, b = contrast * m, contrast * b + (1 - contrast) * grey * ones
        elif op == 2:
            s = saturation * torch.eye(3, dtype=torch.float64) + (1 - saturation) * torch.outer(ones, _LUMA)
            m, b = s @ m, s @ b
        elif op == 3:
            theta = -2 * math.pi * hue  # sign: positive hue moves red towards yellow, as in HSV
            c, s_ = math.cos(theta), math.sin(theta)
            rot = torch.tensor([[1, 0, 0], [0, c, -s_], [0, s_, c]], dtype=torch.float64)
            h = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
            m, b = h @ m, h @ b
    if grayscale:
        g = torch.outer(ones, _LUMA)
        m, b = g @ m, g @ b
    return m, b


def normalize_clips(clips: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    colour: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 clips ``B x 3 x T x S x S`` -> float32 of the same shape, on the clips' device:
    each clip's affine colour map (``colour`` ``B x 3 x 4`` float32, ``[M | b]`` acting on RGB in
    [0, 1] as ``M @ x + b``, from :meth:`TrainTransform.geometry`), clamped to [0, 1], then
    ``(x - mean) / std``. ``colour=None``: no colour map (test clips; identity maps make the clamp a
    no-op). ``out``: a float32 tensor of the clips' shape and device to write into (a buffer
    reused batch after batch). Without a colour map the output is the only float copy made; with
    one, a float copy of the batch besides the output. The constants go to the device with
    non-blocking copies, so a training step does not wait here."""
    if clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"expected uint8 clips B x 3 x T x S x S, got {tuple(clips.shape)} {clips.dtype}")
    if out is not None and (out.shape != clips.shape or out.dtype != torch.float32 or out.device != clips.device):
        raise ValueError(f"out must be float32 {tuple(clips.shape)} on {clips.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    b = clips.shape[0]
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    flat = clips.reshape(b, 3, -1)
    target = None if out is None else out.view(b, 3, -1)

    def on_device(values: torch.Tensor) -> torch.Tensor:  # 3 per-channel constants, as 1 x 3 x 1
        return values.to(torch.float32).view(1, 3, 1).to(clips.device, non_blocking=True)

    if colour is None:
        x = flat.to(torch.float32) if target is None else target.copy_(flat)
        torch.addcmul(on_device(-mean_t / std_t), x, on_device(1 / (255 * std_t)), out=x)  # in place
        return x.view(clips.shape)
    if tuple(colour.shape) != (b, 3, 4):
        raise ValueError(f"expected colour maps {b} x 3 x 4, got {tuple(colour.shape)}")
    colour = colour.to(device=clips.device, dtype=torch.float32)
    y = torch.baddbmm(colour[:, :, 3:], colour[:, :, :3] / 255, flat.to(torch.float32), out=target)
    y.clamp_(0.0, 1.0).sub_(on_device(mean_t)).div_(on_device(std_t))
    return y.view(clips.shape)


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``T x 3 x h x w`` -> ``T x 3 x size``, bilinear, antialiased when downscaling."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    down = frames.shape[-2] > size[0] or frames.shape[-1] > size[1]
    frames = frames.contiguous(memory_format=torch.channels_last)
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=down)


Clip = torch.Tensor | Sequence[torch.Tensor]  # T x H x W x 3, or T frames H x W x 3 (uint8)


def _clip_size(clip: Clip) -> tuple[int, int]:
    """(H, W) of a uint8 clip given as one ``T x H x W x 3`` tensor or as a sequence of
    ``H x W x 3`` frames (as :func:`~dist_video.data.decoding.read_frame_list` returns them)."""
    if isinstance(clip, torch.Tensor):
        if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[-1] != 3:
            raise ValueError(f"expected a uint8 clip T x H x W x 3, got {tuple(clip.shape)} {clip.dtype}")
        return clip.shape[1], clip.shape[2]
    if not clip:
        raise ValueError("expected a uint8 clip, got no frames")
    size = clip[0].shape
    for frame in clip:
        if frame.dtype != torch.uint8 or frame.dim() != 3 or frame.shape[-1] != 3 or frame.shape != size:
            raise ValueError(f"expected uint8 frames H x W x 3 of one size, got {tuple(frame.shape)} {frame.dtype}")
    return size[0], size[1]


def _crop(clip: Clip, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """uint8 ``T x 3 x height x width`` (channels-last memory): a view of a tensor clip; from a
    sequence of frames, only the crop of each frame is copied."""
    if isinstance(clip, torch.Tensor):
        return clip[:, top:top + height, left:left + width, :].permute(0, 3, 1, 2)
    return torch.stack([f[top:top + height, left:left + width] for f in clip]).permute(0, 3, 1, 2)


_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def flip_label_map(class_names: Sequence[str]) -> list[int | None]:
    """Label after a horizontal flip, for each label: names that mention left/right map to
    the name with the two words swapped (e.g. SSv2 "Pushing something from left to right"
    <-> "... from right to left"); names without them map to themselves; a name whose
    swapped form is not a class maps to ``None`` (do not flip such samples)."""
    index = {name.strip().lower(): i for i, name in enumerate(class_names)}

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.capitalize() if word[0].isupper() else other

    out: list[int | None] = []
    for i, name in enumerate(class_names):
        swapped = _SIDE.sub(swap, name)
        if swapped == name:
            out.append(i)
        else:
            out.append(index.get(swapped.strip().lower()))
    return out


@dataclass
class TrainTransform:
    """Training augmentation: random resized crop -> ``crop_size``, horizontal flip (with a
    label permutation for datasets whose labels name left/right), colour jitter with
    probability ``color_jitter_p``, random grayscale, normalisation.

    Call: ``transform(clip, label=y, generator=g)`` with clip uint8 ``T x H x W x 3``;
    returns (float ``3 x T x S x S``, label after flipping). The same in two steps, for loader
    workers that ship uint8: :meth:`geometry` in the worker, :meth:`normalize` on the batch."""

    crop_size: int = 224
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    flip_labels: Sequence[int | None] | None = None  # from flip_label_map(class names)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    mean: Sequence[float] = field(default_factory=lambda: CLIP_MEAN)
    std: Sequence[float] = field(default_factory=lambda: CLIP_STD)

    def __call__(self, clip: torch.Tensor, *, label: int = -1, generator: Rng = None,
                 crop: int = 0) -> tuple[torch.Tensor, int]:
        frames, colour, label = self.geometry(clip, label=label, generator=generator)
        return self.normalize(frames[None], colour[None])[0], label

    def geometry(self, clip: Clip, *, label: int = -1, generator: Rng = None,
                 crop: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The uint8 step: (uint8 ``3 x T x S x S`` crop, resized and maybe flipped; the clip's
        colour map ``3 x 4`` float32 for :func:`normalize_clips` (identity without jitter and
        grayscale); label after flipping). Draws every random number of the transform. ``clip``:
        uint8 ``T x H x W x 3``, or a sequence of ``H x W x 3`` frames (only their crops are copied)."""
        h, w = _clip_size(clip)
        top, left, ch, cw = random_resized_crop_box(h, w, self.scale, self.ratio, generator)
        u_flip, u_jitter, u_gray = uniform(generator, 3)
        frames = _resize(_crop(clip, top, left, ch, cw), (self.crop_size, self.crop_size))
        do_flip = self.flip and u_flip < 0.5
        if do_flip and self.flip_labels is not None and label >= 0:
            flipped = self.flip_labels[label]
            if flipped is None:
                do_flip = False  # its mirrored action is not a class
            else:
                label = int(flipped)
        if do_flip:
            frames = frames.flip(-1)
        colour = self._colour(frames, u_jitter < self.color_jitter_p, u_gray < self.grayscale_p, generator)
        return frames.permute(1, 0, 2, 3).contiguous(), colour, label

    def normalize(self, clips: torch.Tensor, colour: torch.Tensor, *, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Float clips from a batch of :meth:`geometry` outputs: :func:`normalize_clips` with
        this transform's mean and std (uint8 ``B x 3 x T x S x S`` and ``B x 3 x 4``, on any device)."""
        return normalize_clips(clips, self.mean, self.std, colour, out=out)

    def _colour(self, frames: torch.Tensor, jitter: bool, gray: bool, rng: Rng) -> torch.Tensor:
        """The clip's colour map ``[M | b]`` (3 x 4 float32)."""
        if not jitter and not gray:
            return torch.eye(3, 4)
        factors = [1.0, 1.0, 1.0, 0.0]
        order: list[int] = []
        mean_rgb = torch.zeros(3)
        if jitter:
            u = uniform(rng, 4)
            factors = [1 + self.brightness * (2 * u[0] - 1), 1 + self.contrast * (2 * u[1] - 1),
                       1 + self.saturation * (2 * u[2] - 1), self.hue * (2 * u[3] - 1)]
            order = _permutation(rng, 4)
            if self.contrast:
                mean_rgb = frames[:, :, ::4, ::4].float().mean(dim=(0, 2, 3)) / 255
        m, b = color_jitter_matrix(*factors, order=order, mean_rgb=mean_rgb, grayscale=gray)
        return torch.cat([m, b[:, None]], dim=1).to(torch.float32)


def _permutation(rng: Rng, n: int) -> list[int]:
    keys = uniform(rng, n)
    return sorted(range(n), key=lambda i: keys[i])


@dataclass
class TestTransform:
    """Test preprocessing: resize the short side to ``short_side``, take one of
    ``num_crops`` ``crop_size`` squares (1: centre; 3: start/centre/end along the long side),
    normalise. Only the crop's source region is resampled.

    Call: ``transform(clip, crop=c)`` with clip uint8 ``T x H x W x 3``; returns
    (float ``3 x T x S x S``, label unchanged). In two steps like :class:`TrainTransform`:
    :meth:`geometry` (uint8, in loader workers), then :meth:`normalize` on the batch."""

    __test__ = False  # not a pytest test class

    crop_size: int = 224
    short_side: int = 224
    num_crops: int = 1
    mean: Sequence[float] = field(default_factory=lambda: CLIP_MEAN)
    std: Sequence[float] = field(default_factory=lambda: CLIP_STD)

    def __post_init__(self) -> None:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {self.num_crops}")
        if self.crop_size > self.short_side:
            raise ValueError(f"crop_size {self.crop_size} is larger than short_side {self.short_side}")

    def crop_box(self, height: int, width: int, crop: int = 0) -> tuple[int, int, int, int]:
        """(top, left, height, width) in the source frame of crop ``crop`` (0..num_crops-1)."""
        r = self.short_side / min(height, width)
        side = min(self.crop_size / r, height, width)   # the crop's size in source pixels
        hs, ws = min(height, side), min(width, side)
        if self.num_crops == 1 or crop == 1:
            where = 0.5
        else:
            where = 0.0 if crop == 0 else 1.0
        if width >= height:  # landscape: crops move along the width
            top, left = (height - hs) / 2, (width - ws) * where
        else:
            top, left = (height - hs) * where, (width - ws) / 2
        top_i, left_i = int(round(top)), int(round(left))
        hs_i, ws_i = max(1, int(round(hs))), max(1, int(round(ws)))
        return top_i, left_i, min(hs_i, height - top_i), min(ws_i, width - left_i)

    def __call__(self, clip: torch.Tensor, *, label: int = -1, generator: Rng = None,
                 crop: int = 0) -> tuple[torch.Tensor, int]:
        frames, colour, label = self.geometry(clip, label=label, crop=crop)
        return self.normalize(frames[None], colour)[0], label

    def geometry(self, clip: Clip, *, label: int = -1, generator: Rng = None,
                 crop: int = 0) -> tuple[torch.Tensor, None, int]:
        """The uint8 step: (uint8 ``3 x T x S x S`` crop ``crop``, resized; ``None``: no colour
        map; label unchanged). ``generator`` is not used (the test protocol is deterministic).
        ``clip`` as in :meth:`TrainTransform.geometry`."""
        h, w = _clip_size(clip)
        if not 0 <= crop < self.num_crops:
            raise ValueError(f"crop {crop} out of range for {self.num_crops} crops")
        top, left, ch, cw = self.crop_box(h, w, crop)
        frames = _resize(_crop(clip, top, left, ch, cw), (self.crop_size, self.crop_size))
        return frames.permute(1, 0, 2, 3).contiguous(), None, label

    def normalize(self, clips: torch.Tensor, colour: None = None, *, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Float clips from a batch of :meth:`geometry` outputs (uint8 ``B x 3 x T x S x S``, on
        any device): ``(x / 255 - mean) / std``; ``out``: as :func:`normalize_clips`."""
        return normalize_clips(clips, self.mean, self.std, out=out)
