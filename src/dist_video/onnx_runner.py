"""An exported folder (:mod:`dist_video.export`) run by onnxruntime.

:class:`OnnxVideoClassifier` has the interface the prediction functions of
:mod:`dist_video.engine.predict` take from a model: called on a float32 video batch
B x 3 x T x H x W it returns logits B x C; ``class_names``, ``num_classes`` and
``config.num_frames`` describe it; ``preprocess`` is the test protocol recorded at export. No
model code of this package runs here: files are decoded and preprocessed by
:mod:`dist_video.data` as ``preprocess.json`` says, and the network is the ONNX graph.

Before onnxruntime reads the graph, the files that ``preprocess.json`` records under ``"files"``
(``model.onnx``, ``model.onnx.data`` when there is one, ``labels.txt``: their sizes and SHA-256)
are checked and a changed, truncated or missing one is refused naming it; exports written before
these records load without the check. Every file must be a regular file (a FIFO is refused).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .storage import check_file_record, check_regular_file

__all__ = ["OnnxVideoClassifier", "ExportedConfig", "is_exported_folder", "open_session", "read_export",
           "check_export_files", "EXPORT_FORMAT", "RECORDED_FILES"]

EXPORT_FORMAT = "dist-video-onnx"
#: The files of an export that ``preprocess.json`` records (``model.onnx.data`` only when written).
RECORDED_FILES = ("model.onnx", "model.onnx.data", "labels.txt")


def is_exported_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``dist-video export`` (``model.onnx`` + ``preprocess.json``;
    a ``model.onnx`` that is not a regular file counts, so that loading it is refused, not misread)."""
    p = Path(path)
    return p.is_dir() and (p / "model.onnx").exists() and (p / "preprocess.json").is_file()


def check_export_files(folder: str | os.PathLike, record: dict) -> None:
    """Refuse an export whose ``model.onnx``, ``model.onnx.data`` (if present or recorded) or
    ``labels.txt`` differs from what its ``preprocess.json`` ``record`` lists under ``"files"``
    (``ValueError`` naming the file; ``FileNotFoundError`` for a recorded file that is missing).
    An export without ``"files"`` (written before they were recorded) is not checked."""
    folder = Path(folder)
    records = record.get("files")
    for name in RECORDED_FILES:
        optional = name == "model.onnx.data"
        if optional and not (os.path.lexists(folder / name) or (isinstance(records, dict) and name in records)):
            continue
        check_file_record(folder, records, name, "preprocess.json", kind="export")


def read_export(folder: str | os.PathLike) -> tuple[dict, list[str]]:
    """The ``preprocess.json`` record and the class names (``labels.txt``) of an exported folder,
    its files checked against their records first (:func:`check_export_files`)."""
    folder = Path(folder)
    path = check_regular_file(folder / "preprocess.json", "export record")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a dist-video ONNX export (format={record.get('format')!r})"
                         if isinstance(record, dict) else f"{path}: not a dist-video ONNX export")
    labels = folder / "labels.txt"
    if not labels.exists():
        raise FileNotFoundError(f"{folder}: no labels.txt")
    check_regular_file(labels, "labels file")
    check_regular_file(folder / "model.onnx", "ONNX model")
    check_export_files(folder, record)
    names = [line.rstrip("\n") for line in labels.read_text().splitlines()]
    return record, names


def open_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on ``path`` (``threads``: intra-op threads; default onnxruntime's)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("running an exported model needs onnxruntime: pip install 'dist-video[export]' "
                           "(or [serve])") from None
    path = check_regular_file(path, "ONNX model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class ExportedConfig:
    """What the prediction functions read from a model's ``config``."""

    num_frames: int
    alpha: int


class OnnxVideoClassifier:
    """A classifier from an exported folder: ``model(video)`` -> logits, video float32
    B x 3 x T x H x W (torch or numpy) -> torch float32 B x C; :meth:`encode_video` -> B x E."""

    runtime = "onnxruntime"

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None):
        folder = Path(folder)
        if not is_exported_folder(folder):
            raise FileNotFoundError(f"{folder}: not an exported folder (needs model.onnx and preprocess.json)")
        self.folder = folder
        self.record, self.class_names = read_export(folder)
        model = self.record["model"]
        self.name = model.get("name", folder.name)
        self.method = model.get("method")
        self.config = ExportedConfig(num_frames=int(model["num_frames"]), alpha=int(model.get("alpha", 1)))
        self.preprocess = dict(self.record["preprocess"])
        self.session = open_session(folder / "model.onnx", threads)
        self.num_classes = int(self.record["outputs"]["logits"][1])
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{folder / 'labels.txt'}: {len(self.class_names)} names for {self.num_classes} classes")

    def run(self, video: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """video B x 3 x T x H x W -> (logits B x C, embeddings B x E) as numpy float32."""
        x = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(x.shape)}")
        logits, embeddings = self.session.run(["logits", "embeddings"], {"video": x})
        return logits, embeddings

    def __call__(self, video: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.run(video)[0])

    def encode_video(self, video: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.run(video)[1])

    def __repr__(self) -> str:
        return f"OnnxVideoClassifier({str(self.folder)!r}, classes={self.num_classes})"
