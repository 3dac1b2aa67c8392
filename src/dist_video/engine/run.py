"""Stand-alone evaluation of a saved model on a configured dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..config import Config
from ..loading import LoadedModel, load_model
from .builder import attach_head
from .data import build_datasets
from .distributed import cleanup_distributed, setup_distributed
from .evaluate import evaluate, fuse_for_inference
from .train import resolve_precision

__all__ = ["evaluate_model"]

logger = logging.getLogger(__name__)


def _class_names(dataset_names: Sequence[str], given: str | None, option: str, read) -> list[str]:
    """The dataset's class names, or ``given`` (read by ``read``) if it names as many."""
    names = list(dataset_names)
    if given:
        names_given = read(given)
        if len(names_given) != len(names):
            raise ValueError(f"{option} has {len(names_given)} names but the dataset has {len(names)} classes")
        names = names_given
    return names


def _model_for(model_path: str, cfg: Config, names: list[str], device, *, clip: str | None, classes: str | None,
               labels: str | None, prompt: str | None, vocab: str | None, trust_checkpoint: bool
               ) -> tuple[LoadedModel, list[str]]:
    """The model to evaluate, with a head for the dataset's classes, and the class names it scores
    (``classes``: the dataset's class names, one per class; a head that knows more classes keeps
    the rows of these, :func:`dist_video.label_maps.restrict_classes`)."""
    from ..label_maps import knows_classes
    from ..prompts import parse_labels
    from .predict import read_class_names

    if labels is not None:  # zero-shot: the head is the text of the names
        names = _class_names(names, labels, "--labels", parse_labels)
        return load_model(model_path, clip=clip, labels=names, prompt=prompt, vocab=vocab or cfg.model.vocab,
                          device=device, clip_dtype=cfg.model.clip_dtype, trust_checkpoint=trust_checkpoint), names
    loaded = load_model(model_path, clip=clip, vocab=vocab or cfg.model.vocab, device=device,
                        clip_dtype=cfg.model.clip_dtype, trust_checkpoint=trust_checkpoint)
    names = _class_names(names, classes, "--classes", read_class_names)
    network = loaded.network
    if network is not None and network.class_names and list(network.class_names) != names \
            and knows_classes(network, names):  # e.g. a Kinetics-710 model on Kinetics-400
        loaded.restrict_classes(names)
    if network is not None and network.head_type is None:
        needs_text = cfg.model.head == "text" and network.clip.has_text
        attach_head(network, cfg.model, names, tokenizer=loaded.tokenizer if needs_text else None)
        network.to(device)
    return loaded, names


def evaluate_model(model_path: str, cfg: Config, *, clip: str | None = None, classes: str | None = None,
                   output: str | None = None, progress: bool = True, labels: str | None = None,
                   prompt: str | None = None, vocab: str | None = None, trust_checkpoint: bool = False,
                   compile: bool = False) -> dict | None:
    """Evaluate a model (any path :func:`dist_video.load_model` opens) on ``cfg.data``'s
    validation split (multi-view). Writes ``metrics.json``, ``predictions.csv`` and a confusion
    matrix to ``output`` (default: ``<output_dir>/eval``). Returns the metrics (on every process).

    ``labels``: zero-shot evaluation (the cross-dataset protocol): the model's head is replaced
    by the text embeddings of the dataset's class names (``""``) or of the given names (a file
    or comma-separated list, one per dataset class, in its order), under ``prompt`` (None: CLIP's
    Kinetics prompt ensemble); see :func:`dist_video.engine.predict.use_labels`. ``trust_checkpoint``:
    see :func:`dist_video.load_model`. ``compile``: the inference form wrapped in ``torch.compile``
    (the first batch per shape compiles)."""
    env = setup_distributed(cfg.train.device)
    try:
        datasets = build_datasets(cfg, splits=("val",), progress=progress and env.is_main, verbose=env.is_main)
        loaded, names = _model_for(model_path, cfg, datasets.class_names, env.device, clip=clip, classes=classes,
                                   labels=labels, prompt=prompt, vocab=vocab, trust_checkpoint=trust_checkpoint)
        if loaded.num_classes != len(names):
            raise ValueError(f"{model_path}: the model has {loaded.num_classes} classes but the dataset has "
                             f"{len(names)}")
        if loaded.config.num_frames != cfg.model.dist.num_frames:
            raise ValueError(f"{model_path}: the model takes {loaded.config.num_frames} frames but the config "
                             f"samples {cfg.model.dist.num_frames} (set --set model.dist.num_frames=...)")
        out = Path(output) if output else Path(cfg.output_dir) / "eval"
        model = loaded.network if loaded.network is not None else loaded.inference()
        amp_dtype = resolve_precision(cfg.train.precision, env.device)
        if compile:
            model = torch.compile(fuse_for_inference(model, amp_dtype))
        metrics = evaluate(model, datasets.val, env, class_names=names, batch_size=cfg.eval.batch_size,
                           workers=cfg.data.workers, amp_dtype=amp_dtype,
                           out_dir=out, video_paths=datasets.val_paths, progress=progress,
                           extra={"model": str(model_path)})
        if env.is_main:
            logger.info("metrics written to %s", out / "metrics.json")
        return metrics
    finally:
        cleanup_distributed()
