"""One loader for every kind of model path: :func:`load_model`.

A path is one of four things, tried in this order:

1. an exported folder (``model.onnx`` + ``preprocess.json``, :mod:`dist_video.export`): run by
   onnxruntime (:class:`~dist_video.onnx_runner.OnnxVideoClassifier`), with the preprocessing
   recorded at export;
2. a dist-video model folder (``config.json``, :meth:`VideoClassifier.save_pretrained`): its
   recorded test preprocessing, else the paper's protocol at the CLIP's native input size;
3. an authors' ``.pyth`` checkpoint (:func:`~dist_video.checkpoints.load_official_checkpoint`),
   with class names from ``classes`` (a class-text head) or ``labels``;
4. plain CLIP weights (any file :func:`~dist_video.load_clip` reads): the frozen frame-averaged
   CLIP over ``num_frames`` frames, classifying into ``labels`` (zero-shot).

Whatever it was, the result is a :class:`LoadedModel`: one object that predicts files, long
videos (timelines) and embeddings with its own test preprocessing, and holds the tokenizer of
its text tower (found once, never written onto the CLIP).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .classifier import VideoClassifier, read_model_config, resolve_clip_dtype
from .engine.distributed import resolve_device
from .onnx_runner import OnnxVideoClassifier, is_exported_folder

# The prediction functions (engine.predict, engine.timeline, engine.embed) are imported where
# they are used, so that ``import dist_video`` does not load the video decoders.

__all__ = ["LoadedModel", "load_model", "convert_official", "native_preprocess", "EXPORTED_LABELS_REFUSAL"]

logger = logging.getLogger(__name__)

EXPORTED_LABELS_REFUSAL = ("an exported model has a fixed class list; labels need a model folder, an authors' "
                           ".pyth or CLIP weights")


def native_preprocess(image_size: int, num_frames: int) -> dict:
    """The paper's test protocol (:data:`~dist_video.engine.predict.DEFAULT_PREPROCESS`) at a CLIP's
    native input size: short side resized to ``image_size``, centre crop ``image_size``."""
    from .engine.predict import DEFAULT_PREPROCESS

    return {**DEFAULT_PREPROCESS, "crop_size": int(image_size), "test_scale": int(image_size),
            "num_frames": int(num_frames)}


class LoadedModel:
    """A model ready to classify or embed video files, and everything it needs to do so.

    ``model``: the classifier (a :class:`VideoClassifier` in its training form, or the
    onnxruntime runner of an exported folder); ``preprocess``: its test protocol (the dict
    :func:`~dist_video.engine.data.test_clips_of_file` takes); ``kind``: ``"folder"``,
    ``"official"``, ``"clip"`` or ``"exported"``; ``source``: the path it came from.
    Called on clips B x 3 x T x H x W it returns logits B x C (through its inference form,
    :meth:`inference`, made once)."""

    def __init__(self, model: VideoClassifier | OnnxVideoClassifier, preprocess: dict, *, kind: str,
                 source: str | os.PathLike, vocab: str | os.PathLike | None = None):
        self.model = model
        self.preprocess = dict(preprocess)
        self.kind = kind
        self.source = Path(source)
        self.vocab = vocab
        self._tokenizer = None
        self._inference = model if kind == "exported" else None

    # ------------------------------------------------------------------ what it is
    def _current(self):
        return self._inference if self._inference is not None else self.model

    @property
    def name(self) -> str:
        return self.source.name if self.source.is_dir() else self.source.stem

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.kind == "exported" else "pytorch"

    @property
    def network(self) -> VideoClassifier | None:
        """The training form (None for an exported folder, or once :meth:`take_inference_form` took it)."""
        return self.model if isinstance(self.model, VideoClassifier) else None

    @property
    def class_names(self) -> list[str] | None:
        return self._current().class_names

    @property
    def num_classes(self) -> int | None:
        return self._current().num_classes

    @property
    def config(self):
        return self._current().config

    @property
    def method(self) -> str | None:
        return getattr(self._current(), "method", None)

    @property
    def tokenizer(self):
        """The tokenizer of the text tower (``vocab`` if given, else the CLIP's own, else one
        found beside the checkpoint or shipped); ``ValueError`` when there is none."""
        if self._tokenizer is None:
            if self.network is None:
                raise ValueError(f"{self.source}: {EXPORTED_LABELS_REFUSAL}")
            from .prompts import text_tokenizer
            self._tokenizer = text_tokenizer(self.network.clip, vocab=self.vocab, checkpoint=self.source)
        return self._tokenizer

    def labels_refusal(self, option: str = "--labels") -> str | None:
        """Why this model cannot score label names it was not trained on (None: it can)."""
        from .engine.predict import labels_refusal

        if self.network is None:
            return EXPORTED_LABELS_REFUSAL
        return labels_refusal(self.network, option=option)

    def require_head(self) -> LoadedModel:
        """Raise ``ValueError`` (saying what to pass) when the model has no classes."""
        if self.num_classes is not None:
            return self
        hint = {"official": "the authors' checkpoints do not store class names: pass --labels or --classes "
                            "(a file, or kinetics400 / ssv2)",
                "clip": "plain CLIP weights have no classes: pass --labels"}
        raise ValueError(f"{self.source}: {hint.get(self.kind, 'the model has no classifier head (pass --labels)')}")

    # ------------------------------------------------------------------ heads
    def use_labels(self, labels: str | Sequence[str], prompt: str | Sequence[str] | None = None) -> LoadedModel:
        """Classify into ``labels`` by their text embeddings (see
        :func:`dist_video.engine.predict.use_labels`); ``prompt``: None for CLIP's Kinetics ensemble."""
        from .engine.predict import use_labels

        refusal = self.labels_refusal()
        if refusal is not None:
            raise ValueError(f"{self.source}: {refusal}" if self.network is None else refusal)
        use_labels(self.network, labels, prompt=prompt, tokenizer=self.tokenizer)
        self._inference = None
        return self

    def use_classes(self, classes: str, prompt: str = "") -> LoadedModel:
        """A class-text head for the class names of ``classes`` (a file or a built-in list),
        each embedded as ``prompt + name``."""
        from .engine.predict import read_class_names

        with torch.no_grad():
            self.network.set_class_names(read_class_names(classes), self.tokenizer, prompt=prompt)
        self._inference = None
        return self

    def restrict_classes(self, classes: str | Sequence[str]) -> LoadedModel:
        """Keep only ``classes`` (a file, a built-in list name, or the names) of the model's head,
        in that order (:func:`dist_video.label_maps.restrict_classes`): e.g. a Kinetics-710
        model asked for ``kinetics400``. Nothing changes when the head has exactly these classes;
        a name the head lacks (after the Kinetics rename table) is a ``ValueError`` naming it."""
        from .engine.predict import read_class_names
        from .label_maps import restrict_classes

        names = read_class_names(classes) if isinstance(classes, str) else list(classes)
        if self.network is None:
            if list(self.class_names or ()) != names:
                raise ValueError(f"{self.source}: an exported model has a fixed class list; restricting it to "
                                 "other classes needs the model folder it came from")
            return self
        if list(self.network.class_names or ()) != names:
            try:
                restrict_classes(self.network, names)
            except ValueError as e:
                raise ValueError(f"{self.source}: {e}") from None
            self._inference = None
        return self

    # ------------------------------------------------------------------ running it
    def inference(self):
        """The inference form: the network fused (:meth:`VideoClassifier.fuse`), or the runner."""
        if self._inference is None:
            self._inference = self.model.fuse()
        return self._inference

    def take_inference_form(self, dtype: torch.dtype | None = None):
        """The inference form (fused in ``dtype``), dropping the training form so that one copy
        of the weights stays in memory; the object keeps working through the inference form."""
        if self._inference is None or dtype is not None and self.network is not None:
            self._inference = self.model.fuse(dtype)
        self.model = self._inference
        return self._inference

    def compile(self) -> LoadedModel:
        """Wrap the inference form in ``torch.compile`` (its ``forward`` and ``encode_video``: the
        first call per input shape compiles). Call it last: choosing another head re-fuses the
        model uncompiled. An exported folder runs in onnxruntime: ``ValueError``."""
        if self.kind == "exported":
            raise ValueError(f"{self.source}: an exported model runs in onnxruntime; torch.compile needs a model "
                             "folder, an authors' .pyth or CLIP weights")
        fused = self.inference()
        fused.encode_video = torch.compile(fused.encode_video)
        self._inference = torch.compile(fused)
        if self.model is fused:  # the training form was dropped (take_inference_form)
            self.model = self._inference
        return self

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.inference()(video)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.inference().encode_video(video)

    def predict(self, videos: Sequence[str | os.PathLike], *, topk: int = 5, views: int | None = None) -> list[dict]:
        """Top classes of each file (:func:`~dist_video.engine.predict.predict_files`: a file that
        fails is an ``{"video", "error"}`` entry). Non-finite probabilities are the model's fault,
        not a file's: :class:`~dist_video.engine.inference.NonFiniteOutputError`."""
        from .engine.inference import check_finite
        from .engine.predict import predict_files

        results = predict_files(self.inference(), [os.fspath(v) for v in videos], self.preprocess, topk=topk,
                                views=views)
        check_finite(torch.tensor([t["probability"] for r in results for t in r.get("top", ())]),
                     "class probabilities")
        return results

    def timeline(self, path: str | os.PathLike, *, window: float, stride: float | None = None,
                 batch_size: int = 8):
        """The :class:`~dist_video.engine.timeline.Timeline` of a long video's windows."""
        from .engine.inference import check_finite
        from .engine.timeline import video_timeline

        timeline = video_timeline(self.inference(), path, self.preprocess, window=window, stride=stride,
                                  batch_size=batch_size)
        check_finite(timeline.probabilities, "class probabilities")
        return timeline

    def embed(self, videos: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
              views: int | None = None, window: float | None = None, stride: float | None = None,
              normalize: bool = False, progress: Callable[[str], None] | None = None):
        """Embeddings of files or their windows (:func:`~dist_video.engine.embed.embed_files`)."""
        from .engine.embed import embed_files

        return embed_files(self.inference(), videos, self.preprocess, out=out, views=views, window=window,
                           stride=stride, normalize=normalize, progress=progress)

    def text_embedding(self, text: str, prompt: str | None = None) -> torch.Tensor:
        """E: the text tower's L2-normalised embedding of ``text`` (for search)."""
        from .engine.predict import text_query

        if self.network is None:
            raise ValueError(f"{self.source}: an exported model has no text tower; search needs a model folder, "
                             "an authors' .pyth or CLIP weights")
        return text_query(self.network, text, prompt=prompt, tokenizer=self.tokenizer)

    def __repr__(self) -> str:
        return f"LoadedModel({str(self.source)!r}, kind={self.kind!r}, classes={self.num_classes})"


# ---------------------------------------------------------------------------- the loader
def _open_folder(path: Path, clip_dtype: torch.dtype, trust: bool) -> tuple[VideoClassifier, dict]:
    model = VideoClassifier.from_pretrained(path, clip_dtype=clip_dtype, trust_checkpoint=trust)
    recorded = read_model_config(path).get("preprocess", {})
    return model, {**native_preprocess(model.clip.config.image_size, model.config.num_frames), **recorded}


def _open_official(path: Path, clip: str | None, clip_dtype: torch.dtype, trust: bool,
                   overrides: dict) -> tuple[VideoClassifier, dict]:
    from .checkpoints import load_official_checkpoint

    model = load_official_checkpoint(path, clip=clip or None, clip_dtype=clip_dtype, trust_checkpoint=trust,
                                     **overrides)
    return model, native_preprocess(model.clip.config.image_size, model.config.num_frames)


def _open_clip(path: Path, vocab: str | None, clip_dtype: torch.dtype, trust: bool,
               num_frames: int) -> tuple[VideoClassifier, dict]:
    """Plain CLIP weights as the frozen frame-averaged model (every frame of the clip through CLIP)."""
    from .baselines import BaselineConfig, FrozenMeanClassifier
    from .clip_loaders import load_clip

    clip = load_clip(path, vocab=vocab, trust_checkpoint=trust)
    model = FrozenMeanClassifier(clip, BaselineConfig(num_frames=num_frames, alpha=1), clip_dtype=clip_dtype)
    return model, native_preprocess(clip.config.image_size, num_frames)


def load_model(path: str | os.PathLike, *, clip: str | os.PathLike | None = None, classes: str | None = None,
               labels: str | Sequence[str] | None = None, prompt: str | Sequence[str] | None = None,
               vocab: str | os.PathLike | None = None, device: str | torch.device = "auto",
               clip_dtype: str | torch.dtype = "auto", trust_checkpoint: bool = False, num_frames: int = 8,
               selected_layers: Sequence[int] | None = None) -> LoadedModel:
    """Open a model path of any kind (see the module docstring) as a :class:`LoadedModel` on
    ``device`` (``auto``: a GPU if there is one), its frozen CLIP in ``clip_dtype`` (``auto``:
    what the device computes natively).

    ``clip``: CLIP weights for an authors' checkpoint that lacks them. ``classes`` (a file or a
    built-in list name): for a ``.pyth`` or a model without classes, the names of a class-text
    head, embedded as ``prompt + name`` (default prompt: none); for a model with a head, the
    classes its head is restricted to (:meth:`LoadedModel.restrict_classes`).
    ``labels``: zero-shot, the head replaced by these names' text embeddings under ``prompt``
    (None: CLIP's Kinetics prompt ensemble). ``vocab``: the BPE vocabulary of the text tower.
    ``trust_checkpoint``: let the checkpoint readers unpickle files that need more than tensors
    (only for files you made). ``num_frames``: frames per clip for plain CLIP weights.
    ``selected_layers``: the CLIP blocks an authors' checkpoint's branch reads, if not all.
    A model without classes loads (for embeddings): :meth:`LoadedModel.require_head` checks."""
    p = Path(path)
    if is_exported_folder(p):
        if labels is not None:
            raise ValueError(f"{path}: {EXPORTED_LABELS_REFUSAL}")
        runner = OnnxVideoClassifier(p)
        exported = LoadedModel(runner, runner.preprocess, kind="exported", source=p)
        return exported.restrict_classes(classes) if classes else exported
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_clip_dtype(clip_dtype, dev)  # "auto" is decided for the device the model runs on
    trust = bool(trust_checkpoint)
    if p.is_dir():
        kind, (model, preprocess) = "folder", _open_folder(p, dtype, trust)
    elif p.is_file() and p.suffix == ".pyth":
        layers = {"selected_layers": list(selected_layers)} if selected_layers else {}
        kind, (model, preprocess) = "official", _open_official(p, clip, dtype, trust, layers)
    elif p.is_file():
        kind, (model, preprocess) = "clip", _open_clip(p, vocab, dtype, trust, num_frames)
    else:
        raise FileNotFoundError(f"no model at {path}")
    loaded = LoadedModel(model, preprocess, kind=kind, source=p, vocab=vocab)
    if labels is not None:
        loaded.use_labels(labels, prompt=prompt)
    elif classes and (kind == "official" or not model.class_names):
        loaded.use_classes(classes, prompt=prompt if isinstance(prompt, str) else "")
    elif classes:  # a head that knows more classes (a Kinetics-710 model asked for kinetics400)
        loaded.restrict_classes(classes)
    model.to(dev).eval()
    return loaded


def convert_official(checkpoint: str | os.PathLike, output: str | os.PathLike, *, clip: str | None = None,
                     classes: str | None = None, vocab: str | None = None, prompt: str = "",
                     selected_layers: list[int] | None = None, copy_clip: bool = False,
                     trust_checkpoint: bool = False) -> Path:
    """An authors' ``.pyth`` -> a dist-video model folder (with a class-text head if ``classes``),
    recording the test protocol at the CLIP's native input size."""
    from .clip_loaders import resolve_clip_path

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    clip_path = resolve_clip_path(clip) if clip else None
    loaded = load_model(checkpoint, clip=clip_path, classes=classes, vocab=vocab, prompt=prompt, device="cpu",
                        clip_dtype="fp32", trust_checkpoint=trust_checkpoint, selected_layers=selected_layers)
    if loaded.kind != "official":
        raise ValueError(f"{checkpoint}: not an authors' .pyth checkpoint")
    ref = clip_path if (clip_path and not copy_clip) else None
    return loaded.network.save_pretrained(output, clip_path=ref, metadata={
        "preprocess": dict(loaded.preprocess), "converted_from": os.path.abspath(checkpoint)})
