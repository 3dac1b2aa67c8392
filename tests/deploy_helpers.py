"""Tiny DiST model folders (a linear head; a class-text head with a text tower) and short test
videos for the export and serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_helpers import realistic_scales, write_coded_video

CLASS_NAMES = ["juggling", "knitting", "rowing", "surfing", "yawning"]
#: The tiny model's test protocol: 64 px crops of a 64 px short side, 2 segment views.
TINY_PREPROCESS = {"sampling": "segment", "interval": 4, "crop_size": 64, "test_scale": 64, "num_views": 2,
                   "num_crops": 1, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711]}


def tiny_dist_model(clip_factory, head_fill: float | None = None):
    """A DiST model (tiny CLIP, 8 frames, alpha 2), every branch weight non-zero, with a seeded
    random linear head over :data:`CLASS_NAMES`. ``head_fill``: every head weight set to this
    value (e.g. NaN, a damaged model)."""
    from dist_video import DiSTConfig, DiSTVideoModel

    clip = clip_factory()
    torch.manual_seed(7)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=8, alpha=2, temporal_dim=16, integration_dim=64,
                                            pooling_layers=2), clip_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.branch.named_parameters():  # non-zero everywhere, so every part counts
            p.normal_(mean=1.0 if name.endswith("ln.weight") else 0.0, std=0.05)
    model.set_linear_head(len(CLASS_NAMES), CLASS_NAMES)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
        if head_fill is not None:
            model.head.weight.fill_(head_fill)
    return model


def make_tiny_model_folder(path: Path, clip_factory, head_fill: float | None = None) -> Path:
    """:func:`tiny_dist_model` saved with :data:`TINY_PREPROCESS` as its test protocol."""
    model = tiny_dist_model(clip_factory, head_fill)
    model.save_pretrained(path, metadata={"preprocess": {**TINY_PREPROCESS, "num_frames": 8}})
    return path


def same_prediction(got: dict, want: dict, name: str) -> None:
    """``got`` (a server's answer for file ``name``) is ``want`` (in-process ``predict``): same
    views and top classes, probabilities within 1e-5."""
    assert got["video"] == name
    assert got["views"] == want["views"]
    assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
    np.testing.assert_allclose([t["probability"] for t in got["top"]], [t["probability"] for t in want["top"]],
                               atol=1e-5)


def make_tiny_text_model_folder(path: Path) -> Path:
    """A tiny DiST model whose CLIP has a text tower with the full 49408-token vocabulary (so the
    shipped OpenAI vocabulary tokenizes for it: per-request labels work) and a class-text head
    over :data:`CLASS_NAMES` (seeded random class embeddings), saved like :func:`make_tiny_model_folder`."""
    from dist_video import DiSTConfig, DiSTVideoModel
    from dist_video.clip import CLIP, CLIPConfig

    torch.manual_seed(11)
    clip = CLIP(CLIPConfig(embed_dim=64, image_size=64, patch_size=16, vision_width=128, vision_layers=4,
                           vision_heads=2, context_length=77, vocab_size=49408, text_width=32, text_heads=1,
                           text_layers=1)).eval()
    realistic_scales(clip)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=8, alpha=2, temporal_dim=16, integration_dim=64,
                                            pooling_layers=2), clip_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.branch.named_parameters():
            p.normal_(mean=1.0 if name.endswith("ln.weight") else 0.0, std=0.05)
    model.set_class_embeddings(torch.randn(len(CLASS_NAMES), 64), CLASS_NAMES)
    model.save_pretrained(path, metadata={"preprocess": {**TINY_PREPROCESS, "num_frames": 8}})
    return path


def write_test_videos(folder: Path) -> list[Path]:
    """Three short H.264 videos of different lengths and shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_coded_video(folder / "a.mp4", 40, width=96, height=72, seed=1),
            write_coded_video(folder / "b.mp4", 24, width=80, height=80, seed=2),
            write_coded_video(folder / "c.mp4", 57, width=72, height=96, seed=3)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``dist-video serve`` in a subprocess on a free loopback port; a context manager that
    waits until ``/health`` answers and stops the server (SIGTERM) on exit."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, token: str | None = None):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        cmd = [sys.executable, "-m", "dist_video.cli", "serve", str(model), "--port", str(self.port), *args]
        if token:
            cmd += ["--token", token]
        self.log = open(Path(env["TMPDIR"]) / f"server-{self.port}.log", "w+") if env and "TMPDIR" in env else None
        self.proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                     stdout=self.log or subprocess.DEVNULL, stderr=self.log or subprocess.DEVNULL)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __enter__(self) -> "Server":
        import time

        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers(), timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer /health within 180 s: {self.output()}")

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux ``/proc``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
