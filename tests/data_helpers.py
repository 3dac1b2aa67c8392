"""Test videos whose frames carry their own index, written with PyAV.

Every frame paints its index as 10 binary blocks (black / white, 2 rows x 5 columns in the
top half) over a moving textured background, which survives lossy compression; read it
back with :func:`frame_code`.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

BITS = 10


def coded_frame(index: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 frame (height x width x 3) showing ``index`` as binary blocks."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (128 + 60 * np.sin((xx + 3 * index) / 7.0)).astype(np.uint8)
    img[..., 1] = (128 + 60 * np.cos((yy - 2 * index) / 5.0)).astype(np.uint8)
    img[..., 2] = (((xx * 7 + yy * 13 + index * 29) % 97) + 80).astype(np.uint8)
    bh, bw = height // 4, width // 5
    for b in range(BITS):
        r, c = divmod(b, 5)
        img[r * bh + 2:(r + 1) * bh - 2, c * bw + 2:(c + 1) * bw - 2] = 255 if (index >> b) & 1 else 0
    return img


def frame_code(frame: np.ndarray) -> int:
    """The index painted by :func:`coded_frame` (frame: H x W x 3 RGB or H x W grey)."""
    frame = np.asarray(frame)
    h, w = frame.shape[:2]
    grey = frame.astype(np.float32).mean(-1) if frame.ndim == 3 else frame.astype(np.float32)
    bh, bw = h // 4, w // 5
    value = 0
    for b in range(BITS):
        r, c = divmod(b, 5)
        if grey[r * bh + 4:(r + 1) * bh - 4, c * bw + 4:(c + 1) * bw - 4].mean() > 128:
            value |= 1 << b
    return value


def write_coded_video(path: str | Path, num_frames: int, *, codec: str = "libx264", width: int = 160,
                      height: int = 120, fps: int = 30, pix_fmt: str = "yuv420p", options: dict | None = None,
                      variable_rate: bool = False, grey: bool = False, fmt: str | None = None,
                      container_options: dict | None = None, seed: int = 1) -> Path:
    """Write ``num_frames`` coded frames. ``variable_rate``: irregular timestamps (20-90 ms
    apart, millisecond time base). ``grey``: frames given to the encoder as grey."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.thread_count = 1
        if options:
            stream.options = dict(options)
        if variable_rate:
            stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(num_frames):
            img = coded_frame(i, width, height)
            if grey:
                frame = av.VideoFrame.from_ndarray(img.mean(-1).astype(np.uint8), format="gray")
            else:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if variable_rate:
                frame.pts, frame.time_base = t, Fraction(1, 1000)
                t += int(rng.integers(20, 90))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode_all(path: str | Path) -> list[np.ndarray]:
    """Every frame of the file, decoded sequentially with plain PyAV (the reference)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def write_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """A WAV file: a container FFmpeg opens, with no video stream."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(int(8000 * seconds)) / 5) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def truncate(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst``."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def write_synthetic(out: str | Path, num_train: int, num_val: int, *, seed: int = 0, size: int = 32,
                    num_frames: int = 8) -> Path:
    """The demo's synthetic moving-digit dataset, small, written by one process into ``out``."""
    from dist_video.data.synthetic import make_synthetic

    make_synthetic(out, num_train=num_train, num_val=num_val, seed=seed, size=size, num_frames=num_frames, workers=1)
    return Path(out)


TINY_CLIP = Path(__file__).parent / "assets" / "official-tiny" / "clip_openai_state_dict.pt"


def tiny_run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments for a seconds-long DiST training run on the CSV dataset ``data`` into ``out``
    (``extra``: more ``KEY=VALUE`` overrides; a later one wins)."""
    sets = [
        f"model.clip={TINY_CLIP}", "model.head=linear", "model.dist.num_frames=8", "model.dist.temporal_dim=16",
        "model.dist.integration_dim=64", "data.format=csv", f"data.root={data}", f"data.train={data / 'train.csv'}",
        f"data.val={data / 'val.csv'}", f"data.classes={data / 'classes.txt'}", "data.crop_size=32",
        "data.test_scale=32", "data.num_views=2", "data.workers=0", "augment.mixup_alpha=0.8",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.lr=1e-3", "train.batch_size=4", "train.accumulation=2",
        "train.eval_every=0", "train.log_every=1", "eval.batch_size=6", *extra,
    ]
    return ["--output", str(out), "--no-progress", *[a for s in sets for a in ("--set", s)]]


def realistic_scales(module: torch.nn.Module) -> None:
    """Random weights with realistic scales in place (the default init leaves biases zero and
    LayerNorm weights one): biases N(0, 0.02), LayerNorm weights N(1, 0.1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
