"""The model a server answers with, loaded once for serving."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .labels import LabelHeads

__all__ = ["ServedModel", "load_served_model", "EXPORTED_LABELS_REFUSAL"]

logger = logging.getLogger(__name__)

EXPORTED_LABELS_REFUSAL = ("an exported model has a fixed class list; labels need a model folder, an authors' "
                           ".pyth or CLIP weights")


@dataclass
class ServedModel:
    """The model a server answers with: ``model`` has the interface of the prediction functions
    (callable on B x 3 x T x H x W -> logits, ``class_names``, ``num_classes``, ``config``)."""

    model: object
    preprocess: dict
    name: str
    runtime: str
    device: str
    method: str | None = None
    extra: dict = field(default_factory=dict)
    label_heads: LabelHeads | None = None   # per-request labels; None: not accepted ...
    labels_refusal: str | None = None         # ... for this reason


def load_served_model(model_path: str, *, clip: str | None = None, classes: str | None = None,
                      labels: str | None = None, vocab: str | None = None, prompt: str | None = None,
                      device: str = "auto", clip_dtype: str = "auto", max_label_sets: int = 16,
                      num_frames: int = 8, trust_checkpoint: bool = False, compile: bool = False) -> ServedModel:
    """Any path :func:`dist_video.load_model` opens: an exported folder (onnxruntime) or a model
    folder / ``.pyth`` / CLIP weights (its fused inference form; the unfused model is dropped once
    fused, so one copy of the weights stays in memory). A model with a class-text head keeps its
    CLIP text tower (not its unfused image tower) for per-request labels (:class:`LabelHeads`,
    keeping ``max_label_sets`` heads); otherwise ``labels_refusal`` says why requests cannot name
    labels. A request's labels use its own ``prompt``, else ``prompt`` (the server's), else the
    prompt ensemble. ``num_frames``: frames per clip for plain CLIP weights. ``compile``: the
    inference form in ``torch.compile`` (:meth:`dist_video.loading.LoadedModel.compile`; refused
    for an exported model)."""
    from ..loading import load_model

    loaded = load_model(model_path, clip=clip, classes=classes, labels=labels, vocab=vocab, prompt=prompt,
                        device=device, clip_dtype=clip_dtype, num_frames=num_frames,
                        trust_checkpoint=trust_checkpoint).require_head()
    if compile and loaded.runtime == "onnxruntime":
        loaded.compile()  # refused with the reason
    if loaded.runtime == "onnxruntime":
        return ServedModel(loaded.model, dict(loaded.preprocess), loaded.name, "onnxruntime", "cpu", loaded.method,
                           labels_refusal=EXPORTED_LABELS_REFUSAL)
    refusal = loaded.labels_refusal(option="labels")
    tokenizer = None
    if refusal is None:
        try:
            tokenizer = loaded.tokenizer
        except ValueError as e:
            refusal = f"no tokenizer for the model's text tower: {e}"
    text_tower = loaded.network.clip
    fused = loaded.take_inference_form()
    served_form = loaded.compile().model if compile else fused
    heads = None
    if refusal is None:
        text_tower.visual = None  # the image tower lives on, fused: only the text tower stays beside it
        logit_scale = float(text_tower.logit_scale)

        def encode_text(tokens: torch.Tensor) -> torch.Tensor:  # as VideoClassifier.encode_text
            return text_tower.encode_text(tokens).float()

        heads = LabelHeads(encode_text, tokenizer, lambda embeddings: fused.text_head(embeddings, logit_scale),
                           max_sets=max_label_sets, default_prompt=prompt)
    else:
        logger.info("per-request labels are not accepted: %s", refusal)
    device_name = str(next(fused.buffers()).device)
    return ServedModel(served_form, loaded.preprocess, loaded.name, "pytorch", device_name,
                       getattr(fused, "method", None), label_heads=heads, labels_refusal=refusal)
