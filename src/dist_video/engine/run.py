"""Stand-alone evaluation of a saved model on a configured dataset."""

from __future__ import annotations

import logging
from pathlib import Path

from ..classifier import VideoClassifier, resolve_clip_dtype
from ..config import Config
from .builder import attach_head
from .data import build_datasets
from .distributed import cleanup_distributed, setup_distributed
from .evaluate import evaluate
from .train import resolve_precision

__all__ = ["evaluate_model"]

logger = logging.getLogger(__name__)


def evaluate_model(model_path: str, cfg: Config, *, clip: str | None = None, classes: str | None = None,
                   output: str | None = None, progress: bool = True, labels: str | None = None,
                   prompt: str | None = None, vocab: str | None = None) -> dict | None:
    """Evaluate a dist-video model folder or an authors' ``.pyth`` on ``cfg.data``'s validation
    split (multi-view). Writes ``metrics.json``, ``predictions.csv`` and a confusion matrix to
    ``output`` (default: ``<output_dir>/eval``). Returns the metrics (on every process).

    ``labels``: zero-shot evaluation (the cross-dataset protocol): the model's head is replaced
    by the text embeddings of the dataset's class names (``""``) or of the given names (a file
    or comma-separated list, one per dataset class, in its order), under ``prompt`` (None: CLIP's
    Kinetics prompt ensemble); see :func:`dist_video.engine.predict.use_labels`."""
    env = setup_distributed(cfg.train.device)
    try:
        datasets = build_datasets(cfg, splits=("val",), progress=progress and env.is_main,
                                  verbose=env.is_main)
        names = datasets.class_names
        path = Path(model_path)
        clip_dtype = resolve_clip_dtype(cfg.model.clip_dtype, env.device)  # for the device, not the host CPU
        if labels is not None:
            from ..prompts import parse_labels
            from .predict import use_labels
            if labels:
                given = parse_labels(labels)
                if len(given) != len(names):
                    raise ValueError(f"--labels has {len(given)} names but the dataset has {len(names)} classes")
                names = given
        if path.is_dir():
            model = VideoClassifier.from_pretrained(path, clip_dtype=clip_dtype)
            if labels is not None:
                use_labels(model, names, prompt=prompt, vocab=vocab or cfg.model.vocab, checkpoint=path)
            elif model.head_type is None:
                model = attach_head(model, cfg.model, names)
        elif path.is_file():
            from ..checkpoints import load_official_checkpoint
            from .predict import read_class_names
            model = load_official_checkpoint(path, clip=clip or None, clip_dtype=clip_dtype)
            if labels is not None:
                classes = None
                use_labels(model, names, prompt=prompt, vocab=vocab or cfg.model.vocab, checkpoint=path)
            if classes:
                given = read_class_names(classes)
                if len(given) != len(names):
                    raise ValueError(f"--classes has {len(given)} names but the dataset has {len(names)} classes")
                names = given
            if labels is None:
                if cfg.model.vocab is None and model.clip.tokenizer is None and cfg.model.head == "text":
                    from ..prompts import text_tokenizer
                    model.clip.tokenizer = text_tokenizer(model.clip, checkpoint=path)
                model = attach_head(model, cfg.model, names)
        else:
            raise FileNotFoundError(f"no model at {model_path}")
        if model.num_classes != len(names):
            raise ValueError(f"{model_path}: the model has {model.num_classes} classes but the dataset has "
                             f"{len(names)}")
        if model.config.num_frames != cfg.model.dist.num_frames:
            raise ValueError(f"{model_path}: the model takes {model.config.num_frames} frames but the config "
                             f"samples {cfg.model.dist.num_frames} (set --set model.dist.num_frames=...)")
        model = model.to(env.device).eval()
        out = Path(output) if output else Path(cfg.output_dir) / "eval"
        metrics = evaluate(model, datasets.val, env, class_names=names, batch_size=cfg.eval.batch_size,
                           workers=cfg.data.workers, amp_dtype=resolve_precision(cfg.train.precision, env.device),
                           out_dir=out, video_paths=datasets.val_paths, progress=progress,
                           extra={"model": str(model_path)})
        if env.is_main:
            logger.info("metrics written to %s", out / "metrics.json")
        return metrics
    finally:
        cleanup_distributed()
