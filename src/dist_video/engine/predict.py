"""Prediction on video files and clip tensors, and conversion of the authors' checkpoints."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..classifier import VideoClassifier, read_model_config, resolve_clip_dtype
from ..clip_loaders import resolve_clip_path
from .distributed import resolve_device

__all__ = ["load_for_inference", "predict_clip", "predict_files", "convert_official", "read_class_names",
           "DEFAULT_PREPROCESS"]

#: The paper's test-time protocol, used when a model folder does not record its own.
DEFAULT_PREPROCESS = {"sampling": "segment", "interval": 4, "crop_size": 224, "test_scale": 224, "num_views": 3,
                      "num_crops": 1, "mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711]}


def read_class_names(spec: str) -> list[str]:
    """Class names from a file (one per line; or a JSON list / SSv2 labels dict) or a built-in
    list name (``kinetics400``, ``ssv2``)."""
    from importlib import resources

    builtin = {"kinetics400": "kinetics400.txt", "k400": "kinetics400.txt", "ssv2": "ssv2.txt"}
    if spec in builtin:
        path = resources.files("dist_video") / "assets" / "classnames" / builtin[spec]
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"class-name list not found: {spec} (a file, or one of {', '.join(builtin)})")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):  # SSv2 labels: {"template": "index"}
            ordered = sorted(data.items(), key=lambda kv: int(kv[1]))
            return [name.replace("[", "").replace("]", "") for name, _ in ordered]
        return [str(x) for x in data]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{spec}: the class-name list is empty")
    return names


def load_for_inference(model_path: str, *, clip: str | None = None, classes: str | None = None,
                       vocab: str | None = None, prompt: str = "", device: str = "auto",
                       clip_dtype: str = "auto") -> tuple[VideoClassifier, dict]:
    """A model ready to classify (a dist-video folder, or an authors' ``.pyth`` + class names),
    and its test-time preprocessing."""
    path = Path(model_path)
    dev = resolve_device(device)
    clip_dtype = resolve_clip_dtype(clip_dtype, dev)  # "auto" is decided for the device the model runs on
    if path.is_dir():
        model = VideoClassifier.from_pretrained(path, clip_dtype=clip_dtype)
        meta = read_model_config(path)
        preprocess = {**DEFAULT_PREPROCESS, **meta.get("preprocess", {})}
        preprocess.setdefault("num_frames", model.config.num_frames)
        if model.head_type is None:
            raise ValueError(f"{path}: the model has no classifier head")
    elif path.is_file():
        from ..checkpoints import load_official_checkpoint
        model = load_official_checkpoint(path, clip=clip or None, clip_dtype=clip_dtype)
        if not classes:
            raise ValueError(f"{path}: the authors' checkpoints do not store class names: pass --classes "
                             "(a file, or kinetics400 / ssv2)")
        _text_head(model, read_class_names(classes), vocab=vocab, checkpoint=path, prompt=prompt)
        preprocess = {**DEFAULT_PREPROCESS, "num_frames": model.config.num_frames}
    else:
        raise FileNotFoundError(f"no model at {model_path}")
    return model.to(dev).eval(), preprocess


def _text_head(model: VideoClassifier, names: list[str], *, vocab: str | None, checkpoint: Path, prompt: str) -> None:
    tokenizer = model.clip.tokenizer
    if tokenizer is None or vocab:
        from ..tokenizer import Tokenizer, find_vocab
        tokenizer = Tokenizer(find_vocab(checkpoint_path=checkpoint, vocab=vocab))
    with torch.no_grad():
        model.set_class_names(names, tokenizer, prompt=prompt)


@torch.no_grad()
def predict_clip(model: VideoClassifier | torch.nn.Module, video: torch.Tensor, topk: int = 5
                 ) -> list[list[tuple[str, float]]]:
    """Top classes of normalised clips: ``video`` 3 x T x H x W or B x 3 x T x H x W ->
    for each clip, ``[(class name, probability), ...]`` best first. ``model``: a classifier
    or its inference form (``model.fuse()``; pass that when calling this in a loop)."""
    if video.dim() == 4:
        video = video.unsqueeze(0)
    device = next(itertools.chain(model.buffers(), model.parameters())).device
    probs = model(video.to(device)).float().softmax(dim=1)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[(names[i], float(v)) for v, i in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]


@torch.no_grad()
def predict_files(model: VideoClassifier | torch.nn.Module, videos: Sequence[str], preprocess: dict, *, topk: int = 5,
                  views: int | None = None) -> list[dict]:
    """Classify video files with the model's test protocol (views x crops, probabilities
    averaged), through its inference form (made once here; ``model`` may already be one)."""
    from .data import test_clips_of_file

    fused = model.fuse() if isinstance(model, VideoClassifier) else model
    device = next(fused.buffers()).device
    names = fused.class_names or [str(i) for i in range(fused.num_classes)]
    out = []
    for path in videos:
        clips = test_clips_of_file(path, preprocess, num_frames=fused.config.num_frames, views=views)
        probs = fused(clips.to(device)).float().softmax(dim=1).mean(dim=0)
        p, idx = probs.topk(min(topk, probs.numel()))
        top = [{"class": names[i], "probability": float(v)} for v, i in zip(p.tolist(), idx.tolist())]
        out.append({"video": str(path), "views": int(clips.shape[0]), "top": top})
    return out


def convert_official(checkpoint: str, output: str, *, clip: str | None = None, classes: str | None = None,
                     vocab: str | None = None, prompt: str = "", selected_layers: list[int] | None = None,
                     copy_clip: bool = False) -> Path:
    """An authors' ``.pyth`` -> a dist-video model folder (with a class-text head if ``classes``)."""
    from ..checkpoints import load_official_checkpoint

    overrides = {"selected_layers": selected_layers} if selected_layers else {}
    clip_path = resolve_clip_path(clip) if clip else None
    model = load_official_checkpoint(checkpoint, clip=clip_path, clip_dtype="fp32", **overrides)
    if classes:
        _text_head(model, read_class_names(classes), vocab=vocab, checkpoint=Path(checkpoint), prompt=prompt)
    ref = clip_path if (clip_path and not copy_clip) else None
    return model.save_pretrained(output, clip_path=ref, metadata={
        "preprocess": {**DEFAULT_PREPROCESS, "num_frames": model.config.num_frames},
        "converted_from": os.path.abspath(checkpoint)})
