"""Prediction on video files and clip tensors, zero-shot heads from label names, and
conversion of the authors' checkpoints.

Per-file results are plain dicts (the ``--json`` output of ``dist-video predict``):
``{"video", "views", "top": [{"class", "probability"}, ...]}``, a timeline
``{"video", "windows": [{"start", "end", "top"}, ...]}``, or ``{"video", "error"}``."""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..classifier import VideoClassifier
from ..label_maps import BUILTIN_CLASS_LISTS, builtin_class_names
from ..prompts import label_embeddings, parse_labels, templates_of, text_tokenizer
from .inference import FILE_ERRORS, TestClips, class_names_of, error_message, model_device, read_ahead, read_test_clips

__all__ = ["use_labels", "labels_refusal", "text_query", "predict_clip", "predict_file", "predict_files",
           "model_device", "read_class_names", "DEFAULT_PREPROCESS"]

logger = logging.getLogger(__name__)

#: The paper's test-time protocol; a model that does not record its own gets it at its CLIP's
#: native input size (:func:`dist_video.loading.native_preprocess`).
DEFAULT_PREPROCESS = {"sampling": "segment", "interval": 4, "crop_size": 224, "test_scale": 224, "num_views": 3,
                      "num_crops": 1, "mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711]}


def read_class_names(spec: str) -> list[str]:
    """Class names from a file (one per line; or a JSON list / SSv2 labels dict) or a built-in
    list name (:data:`~dist_video.label_maps.BUILTIN_CLASS_LISTS`: ``kinetics400``,
    ``kinetics600``, ``kinetics700``, ``kinetics710``, ``ssv2``)."""
    if spec in BUILTIN_CLASS_LISTS:
        return builtin_class_names(spec)
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"class-name list not found: {spec} (a file, or one of "
                                f"{', '.join(BUILTIN_CLASS_LISTS)})")
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


def use_labels(model: VideoClassifier, labels: str | Sequence[str], *, prompt: str | Sequence[str] | None = None,
               vocab: str | None = None, checkpoint: str | os.PathLike | None = None, tokenizer=None
               ) -> VideoClassifier:
    """Zero-shot head: the model classifies into ``labels`` (names in this order; a
    comma-separated string or a file, see :func:`dist_video.prompts.parse_labels`), scored
    against their text embeddings under ``prompt`` (a template with ``{}`` or a prefix; None:
    CLIP's Kinetics prompt ensemble, :data:`dist_video.prompts.KINETICS_TEMPLATES`).
    Models with a linear head are refused: its weights belong to the classes it was trained on.
    ``tokenizer``: the text tower's (default: :func:`~dist_video.prompts.text_tokenizer` with
    ``vocab`` and ``checkpoint``)."""
    names = parse_labels(labels)
    refusal = labels_refusal(model)
    if refusal is not None:
        raise ValueError(refusal)
    tokenizer = tokenizer or text_tokenizer(model.clip, vocab=vocab, checkpoint=checkpoint)
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


def text_query(model: VideoClassifier, text: str, *, prompt: str | None = None, vocab: str | None = None,
               tokenizer=None) -> torch.Tensor:
    """E: the text tower's embedding of ``text`` (under ``prompt``, a template; None: the text as
    it is), L2-normalised, to compare with the model's video embeddings."""
    if model.head_type == "linear":
        logger.warning("the model was trained with a linear head: its video embeddings were not trained to "
                       "match text, so text search ranks them loosely")
    tokenizer = tokenizer or text_tokenizer(model.clip, vocab=vocab)
    return label_embeddings(model.encode_text, tokenizer, [text], templates_of(prompt or "{}"))[0]


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
                 window: float | None = None, stride: float | None = None,
                 cancel: threading.Event | None = None) -> dict:
    """One video file through an inference-form model (``model.fuse()``, or anything callable
    on B x 3 x T x H x W float32 -> B x C logits with ``class_names``, ``num_classes`` and
    ``config.num_frames``).

    Without ``window``: the model's test views (views x crops) with their probabilities
    averaged: ``{"video", "views", "top": [{"class", "probability"}, ...]}``. With ``window``
    (seconds; ``stride`` seconds, default the window): a timeline,
    ``{"video", "windows": [{"start", "end", "top": [...]}, ...]}`` (see
    :func:`dist_video.engine.timeline.video_timeline`). A file that cannot be read raises
    :class:`~dist_video.data.decoding.VideoDecodeError` (``ValueError`` for bad arguments).
    ``cancel``: a set event stops the decoding with :class:`~dist_video.data.decoding.Cancelled`."""
    if window is not None:
        from .timeline import video_timeline
        return video_timeline(model, path, preprocess, window=window, stride=stride, cancel=cancel).to_dict(topk)
    if stride is not None:
        raise ValueError("stride needs a window")
    clips = read_test_clips(path, preprocess, num_frames=model.config.num_frames, views=views, cancel=cancel)
    return _predict_clips(model, path, clips, topk)


def _predict_clips(model, path: str | os.PathLike, clips: TestClips, topk: int) -> dict:
    """The result of :func:`predict_file` from the file's decoded clips."""
    names = class_names_of(model)
    probs = model(clips.on(model_device(model))).float().softmax(dim=1).mean(dim=0)
    return {"video": str(path), "views": int(clips.clips.shape[0]), "top": _top(probs, names, topk)}


def _file_result(path: str | os.PathLike, predict: Callable[[], dict]) -> dict:
    """``predict()``, or ``{"video": path, "error": cause}`` when the file fails."""
    try:
        return predict()
    except FILE_ERRORS as e:
        logger.warning("%s: %s", path, error_message(e))
        return {"video": str(path), "error": error_message(e)}


@torch.no_grad()
def predict_files(model: VideoClassifier | torch.nn.Module, videos: Sequence[str], preprocess: dict, *, topk: int = 5,
                  views: int | None = None, window: float | None = None, stride: float | None = None) -> list[dict]:
    """:func:`predict_file` for every file, through one inference form (made here when ``model``
    is a :class:`VideoClassifier`). A file that fails gives ``{"video": path, "error": cause}``
    and the others are still predicted; the list keeps the order of ``videos``. Without
    ``window``, the next file is decoded in a background thread while the model runs on this
    one (:func:`~dist_video.engine.inference.read_ahead`)."""
    fused = model.fuse() if isinstance(model, VideoClassifier) else model
    if window is not None or stride is not None:
        return [_file_result(path, lambda: predict_file(fused, path, preprocess, topk=topk, views=views,
                                                        window=window, stride=stride)) for path in videos]
    read = partial(read_test_clips, preprocess=preprocess, num_frames=fused.config.num_frames, views=views,
                   pin=model_device(fused).type == "cuda")
    out = []
    with closing(read_ahead(videos, read)) as reads:
        for path, clips in reads:
            out.append(_file_result(path, lambda: _predict_clips(fused, path, clips.result(), topk)))
    return out
