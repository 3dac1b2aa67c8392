"""Prediction on video files and clip tensors, zero-shot heads from label names, and
conversion of the authors' checkpoints.

Per-file results are plain dicts (the ``--json`` output of ``dist-video predict``):
``{"video", "views", "top": [{"class", "probability"}, ...]}``, a timeline
``{"video", "windows": [{"start", "end", "top"}, ...]}``, or ``{"video", "error"}``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..classifier import VideoClassifier, read_model_config, resolve_clip_dtype
from ..clip_loaders import resolve_clip_path
from ..prompts import label_embeddings, parse_labels, templates_of, text_tokenizer
from .distributed import resolve_device
from .inference import FILE_ERRORS, class_names_of, error_message, model_device

__all__ = ["load_for_inference", "use_labels", "labels_refusal", "text_query", "predict_clip", "predict_file",
           "predict_files", "model_device", "convert_official", "read_class_names", "DEFAULT_PREPROCESS"]

logger = logging.getLogger(__name__)

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
                       labels: str | Sequence[str] | None = None, vocab: str | None = None,
                       prompt: str | Sequence[str] | None = None, device: str = "auto", clip_dtype: str = "auto",
                       num_frames: int = 8, require_head: bool = True) -> tuple[VideoClassifier, dict]:
    """A model ready to classify, and its test-time preprocessing. ``model_path``: a dist-video
    folder, an authors' ``.pyth`` (+ ``classes`` or ``labels``), or plain CLIP weights (any file
    :func:`dist_video.load_clip` reads, + ``labels``: the frozen frame-averaged CLIP zero-shot
    model over ``num_frames`` frames).

    ``labels`` (names, a comma-separated string or a file): replace the class head by these
    names' text embeddings (:func:`use_labels`; ``prompt``: a template, or None for CLIP's
    Kinetics ensemble). ``classes`` (``.pyth`` only): class names embedded as ``prompt + name``
    (default prompt: none). ``require_head=False``: a model without classes is fine (for
    embeddings and text search)."""
    need_head = require_head and labels is None
    path = Path(model_path)
    dev = resolve_device(device)
    clip_dtype = resolve_clip_dtype(clip_dtype, dev)  # "auto" is decided for the device the model runs on
    if path.is_dir():
        model = VideoClassifier.from_pretrained(path, clip_dtype=clip_dtype)
        meta = read_model_config(path)
        preprocess = {**DEFAULT_PREPROCESS, **meta.get("preprocess", {})}
        preprocess.setdefault("num_frames", model.config.num_frames)
        if model.head_type is None and need_head:
            raise ValueError(f"{path}: the model has no classifier head (pass --labels)")
    elif path.is_file() and path.suffix == ".pyth":
        from ..checkpoints import load_official_checkpoint
        model = load_official_checkpoint(path, clip=clip or None, clip_dtype=clip_dtype)
        if not classes and need_head:
            raise ValueError(f"{path}: the authors' checkpoints do not store class names: pass --labels "
                             "or --classes (a file, or kinetics400 / ssv2)")
        if classes and labels is None:
            _text_head(model, read_class_names(classes), vocab=vocab, checkpoint=path,
                       prompt=prompt if isinstance(prompt, str) else "")
        preprocess = {**DEFAULT_PREPROCESS, "num_frames": model.config.num_frames}
    elif path.is_file():
        model, preprocess = _clip_zero_shot(path, vocab=vocab, clip_dtype=clip_dtype, num_frames=num_frames)
        if need_head:
            raise ValueError(f"{path}: plain CLIP weights have no classes: pass --labels")
    else:
        raise FileNotFoundError(f"no model at {model_path}")
    if labels is not None:
        use_labels(model, labels, prompt=prompt, vocab=vocab, checkpoint=path)
    return model.to(dev).eval(), preprocess


def _clip_zero_shot(path: Path, *, vocab: str | None, clip_dtype: str, num_frames: int
                    ) -> tuple[VideoClassifier, dict]:
    """Plain CLIP weights as the frozen frame-averaged model (every frame of the clip through CLIP)."""
    from ..baselines import BaselineConfig, FrozenMeanClassifier
    from ..clip_loaders import load_clip

    clip = load_clip(path, vocab=vocab)
    model = FrozenMeanClassifier(clip, BaselineConfig(num_frames=num_frames, alpha=1), clip_dtype=clip_dtype)
    size = clip.config.image_size
    return model, {**DEFAULT_PREPROCESS, "num_frames": num_frames, "crop_size": size, "test_scale": size}


def use_labels(model: VideoClassifier, labels: str | Sequence[str], *, prompt: str | Sequence[str] | None = None,
               vocab: str | None = None, checkpoint: str | os.PathLike | None = None) -> VideoClassifier:
    """Zero-shot head: the model classifies into ``labels`` (names in this order; a
    comma-separated string or a file, see :func:`dist_video.prompts.parse_labels`), scored
    against their text embeddings under ``prompt`` (a template with ``{}`` or a prefix; None:
    CLIP's Kinetics prompt ensemble, :data:`dist_video.prompts.KINETICS_TEMPLATES`).
    Models with a linear head are refused: its weights belong to the classes it was trained on."""
    names = parse_labels(labels)
    refusal = labels_refusal(model)
    if refusal is not None:
        raise ValueError(refusal)
    tokenizer = text_tokenizer(model.clip, vocab=vocab, checkpoint=checkpoint)
    embeddings = label_embeddings(model.encode_text, tokenizer, names, templates_of(prompt))
    return model.set_class_embeddings(embeddings, names)


def labels_refusal(model: VideoClassifier, option: str = "--labels") -> str | None:
    """Why ``model`` cannot score label names it was not trained on (None: it can): a linear
    head, or CLIP weights without a text tower. ``option``: how the message names the request."""
    if model.head_type == "linear":
        return ("the model has a linear head (one learned weight row per training class), so it cannot score "
                f"new label names: {option} needs a model with a class-text head (trained with model.head=text, "
                "an authors' .pyth checkpoint, or plain CLIP weights)")
    if not model.clip.has_text:
        return "the CLIP weights have no text tower, so label names cannot be embedded"
    return None


def text_query(model: VideoClassifier, text: str, *, prompt: str | None = None, vocab: str | None = None
               ) -> torch.Tensor:
    """E: the text tower's embedding of ``text`` (under ``prompt``, a template; None: the text as
    it is), L2-normalised, to compare with the model's video embeddings."""
    if model.head_type == "linear":
        logger.warning("the model was trained with a linear head: its video embeddings were not trained to "
                       "match text, so text search ranks them loosely")
    tokenizer = text_tokenizer(model.clip, vocab=vocab)
    return label_embeddings(model.encode_text, tokenizer, [text], templates_of(prompt or "{}"))[0]


def _text_head(model: VideoClassifier, names: list[str], *, vocab: str | None, checkpoint: Path, prompt: str) -> None:
    tokenizer = text_tokenizer(model.clip, vocab=vocab, checkpoint=checkpoint)
    with torch.no_grad():
        model.set_class_names(names, tokenizer, prompt=prompt)


def _top(probs: torch.Tensor, names: Sequence[str], topk: int) -> list[dict]:
    """C probabilities -> ``[{"class", "probability"}, ...]``, best first."""
    p, idx = probs.topk(min(topk, probs.numel()))
    return [{"class": names[i], "probability": float(v)} for v, i in zip(p.tolist(), idx.tolist())]


@torch.no_grad()
def predict_clip(model: VideoClassifier | torch.nn.Module, video: torch.Tensor, topk: int = 5
                 ) -> list[list[tuple[str, float]]]:
    """Top classes of normalised clips: ``video`` 3 x T x H x W or B x 3 x T x H x W ->
    for each clip, ``[(class name, probability), ...]`` best first. ``model``: a classifier
    or its inference form (``model.fuse()``; pass that when calling this in a loop)."""
    if video.dim() == 4:
        video = video.unsqueeze(0)
    probs = model(video.to(model_device(model))).float().softmax(dim=1)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[(names[i], float(v)) for v, i in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]


@torch.no_grad()
def predict_file(model, path: str | os.PathLike, preprocess: dict, *, topk: int = 5, views: int | None = None,
                 window: float | None = None, stride: float | None = None) -> dict:
    """One video file through an inference-form model (``model.fuse()``, or anything callable
    on B x 3 x T x H x W float32 -> B x C logits with ``class_names``, ``num_classes`` and
    ``config.num_frames``).

    Without ``window``: the model's test views (views x crops) with their probabilities
    averaged: ``{"video", "views", "top": [{"class", "probability"}, ...]}``. With ``window``
    (seconds; ``stride`` seconds, default the window): a timeline,
    ``{"video", "windows": [{"start", "end", "top": [...]}, ...]}`` (see
    :func:`dist_video.engine.timeline.video_timeline`). A file that cannot be read raises
    :class:`~dist_video.data.decoding.VideoDecodeError` (``ValueError`` for bad arguments)."""
    from .data import test_clips_of_file

    if window is not None:
        from .timeline import video_timeline
        return video_timeline(model, path, preprocess, window=window, stride=stride).to_dict(topk)
    if stride is not None:
        raise ValueError("stride needs a window")
    names = class_names_of(model)
    clips = test_clips_of_file(path, preprocess, num_frames=model.config.num_frames, views=views)
    probs = model(clips.to(model_device(model))).float().softmax(dim=1).mean(dim=0)
    return {"video": str(path), "views": int(clips.shape[0]), "top": _top(probs, names, topk)}


@torch.no_grad()
def predict_files(model: VideoClassifier | torch.nn.Module, videos: Sequence[str], preprocess: dict, *, topk: int = 5,
                  views: int | None = None, window: float | None = None, stride: float | None = None) -> list[dict]:
    """:func:`predict_file` for every file, through one inference form (made here when ``model``
    is a :class:`VideoClassifier`). A file that fails gives ``{"video": path, "error": cause}``
    and the others are still predicted; the list keeps the order of ``videos``."""
    fused = model.fuse() if isinstance(model, VideoClassifier) else model
    out = []
    for path in videos:
        try:
            out.append(predict_file(fused, path, preprocess, topk=topk, views=views, window=window, stride=stride))
        except FILE_ERRORS as e:
            logger.warning("%s: %s", path, error_message(e))
            out.append({"video": str(path), "error": error_message(e)})
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
