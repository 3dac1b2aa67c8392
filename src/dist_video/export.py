"""Export a video classifier to ONNX, with the preprocessing that must travel with it.

An exported folder holds everything a runtime needs to classify a video file without this
package's model code:

- ``model.onnx``: the fused inference form (:mod:`dist_video.fused`) in float32. Input
  ``video``: B x 3 x T x H x W, normalised dense frames, B dynamic. Outputs ``logits``: B x C
  and ``embeddings``: B x E (the video embedding before the head). Weights of 2 GB or more go to
  ``model.onnx.data`` beside it (ONNX's external data; the protobuf cannot hold them).
- ``preprocess.json``: the model's test protocol (frame sampling and views, short-side resize,
  crops, mean and std, frame order) under ``"preprocess"`` in the form
  :func:`dist_video.engine.data.test_clips_of_file` reads, plus the input and output
  contract, the model's name and this package's version, and under ``"files"`` the size and
  SHA-256 of ``model.onnx`` (``model.onnx.data``) and ``labels.txt``, checked when the folder
  is loaded (:func:`dist_video.onnx_runner.check_export_files`).
- ``labels.txt``: the class names in output order, one per line.

The export is verified before the files are put in place: onnxruntime's outputs on a random
clip batch are compared with PyTorch's (the same fused module), and an export whose largest
absolute difference exceeds the tolerance fails. The folder is written whole beside ``out_dir``
and replaces it in one step (:func:`dist_video.storage.replace_folder`): a process killed at
any moment leaves the previous export or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .onnx_runner import EXPORT_FORMAT, RECORDED_FILES, open_session
from .storage import file_record, new_folder_beside, replace_folder

__all__ = ["ExportError", "ExportReport", "LogitsAndEmbeddings", "export_onnx", "export_fused_onnx",
           "preprocess_record", "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "EXTERNAL_DATA_BYTES"]

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
#: ONNX's protobuf limit: weights at least this large are written as external data.
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3
#: The files an export writes (others in an existing export folder are kept).
EXPORT_FILES = frozenset({"model.onnx", "model.onnx.data", "preprocess.json", "labels.txt"})
#: Default largest absolute difference allowed between onnxruntime and PyTorch (float32).
DEFAULT_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that could not be made or did not verify."""


@dataclass
class ExportReport:
    """What an export wrote and how closely onnxruntime reproduced PyTorch."""

    out_dir: str
    model: str
    opset: int
    external_data: bool
    num_classes: int
    embedding_dim: int
    verify_batch: int
    max_abs_diff_logits: float
    max_abs_diff_embeddings: float
    tolerance: float

    def summary(self) -> str:
        return (f"verified with onnxruntime on a random batch of {self.verify_batch} clips: logits max |diff| "
                f"{self.max_abs_diff_logits:.2e}, embeddings max |diff| {self.max_abs_diff_embeddings:.2e} "
                f"(tolerance {self.tolerance:.0e})")


class LogitsAndEmbeddings(nn.Module):
    """A fused classifier seen as one graph with both outputs:
    video B x 3 x T x H x W -> (logits B x C, embeddings B x E)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.fused.encode_video(video)
        return self.fused.head(embeddings), embeddings


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dist-video")
    except PackageNotFoundError:
        return "unknown"


def preprocess_record(fused: nn.Module, preprocess: dict, *, name: str, source: str, opset: int,
                      embedding_dim: int) -> dict:
    """The ``preprocess.json`` of an export: the test protocol (``"preprocess"``, the dict
    :func:`~dist_video.engine.data.test_clips_of_file` takes) and the model's input/output contract."""
    config = fused.config
    size = preprocess["crop_size"]
    p = {k: preprocess[k] for k in ("sampling", "interval", "num_views", "num_crops", "test_scale", "crop_size")}
    p.update(num_frames=int(config.num_frames), mean=[float(m) for m in preprocess["mean"]],
             std=[float(s) for s in preprocess["std"]])
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "dist_video_version": _package_version(),
        "model": {"name": name, "method": fused.method, "source": source, "head": fused.head.kind,
                  "num_frames": int(config.num_frames), "alpha": int(config.alpha)},
        "preprocess": p,
        "protocol": {
            "sampling": ("segment: the video's N frames cut into T equal segments, view v of V takes position "
                         "start + (end - start) * (v + 1) / V in each (V = 1: the centre); interval: T frames "
                         "'interval' apart, views evenly placed"),
            "decode": "RGB frames, in time order, as uint8",
            "resize": "short side to test_scale, bilinear, antialiased when downscaling (only the crop is resampled)",
            "crops": "num_crops squares of crop_size: 1 = centre; 3 = start, centre, end along the long side",
            "normalise": "x / 255, minus mean, divided by std, per RGB channel",
            "clips": "num_views x num_crops clips per file (views major, crops minor); probabilities "
                     "(softmax of logits) averaged over them",
        },
        "input": {"name": "video", "dtype": "float32", "shape": ["batch", 3, int(config.num_frames), size, size],
                  "layout": "B x 3 x T x H x W (RGB channels, dense frames in time order)"},
        "outputs": {"logits": ["batch", fused.num_classes], "embeddings": ["batch", embedding_dim]},
        "opset": opset,
        "labels": "labels.txt",
    }


def _random_video(fused: nn.Module, preprocess: dict, batch: int, seed: int = 0) -> torch.Tensor:
    size = preprocess["crop_size"]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, fused.config.num_frames, size, size, generator=g)


def _external_data_needed(module: nn.Module) -> bool:
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return size >= EXTERNAL_DATA_BYTES


def _torch_onnx_export(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int | None,
                       external: bool) -> int:
    """Write ``path`` with PyTorch's ``torch.export``-based ONNX exporter (a dynamic batch
    dimension named ``batch``); returns the opset written. (The older TorchScript exporter
    cannot: the fused modules take normalisation shapes from their input tensors.)"""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's ONNX builder)
    except ImportError as e:
        raise ExportError(f"export needs the export extra ({e.name} is missing): "
                          "pip install 'dist-video[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["video"],
                                    output_names=["logits", "embeddings"], dynamic_shapes={"video": {0: batch}},
                                    opset_version=opset, optimize=True, verify=False, report=False, verbose=False)
    except Exception as e:  # the exporter's own errors are many types; report them as an export failure
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from e
    program.save(str(path), external_data=external)
    return onnx.load(str(path), load_external_data=False).opset_import[0].version


def _verify(wrapper: nn.Module, path: Path, video: torch.Tensor) -> tuple[float, float]:
    """Largest absolute differences (logits, embeddings) between onnxruntime and PyTorch."""
    session = open_session(path)
    logits, embeddings = session.run(["logits", "embeddings"], {"video": video.numpy()})
    with torch.no_grad():
        ref_logits, ref_embeddings = wrapper(video)
    d_logits = float((torch.from_numpy(logits) - ref_logits).abs().max())
    d_embeddings = float((torch.from_numpy(embeddings) - ref_embeddings).abs().max())
    return d_logits, d_embeddings


def export_fused_onnx(fused: nn.Module, preprocess: dict, out_dir: str | os.PathLike, *, name: str,
                      source: str = "", opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                      verify_batch: int = 2) -> ExportReport:
    """Export a fused float32 classifier (``model.fuse(torch.float32)``, on the CPU) and its
    test-time ``preprocess`` dict into ``out_dir`` (see the module docstring). The files are
    written to a temporary folder beside ``out_dir`` and moved in only once verified."""
    if fused.num_classes is None:
        raise ExportError(f"{name}: the model has no classifier head to export")
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise ExportError(f"{out}: holds a dist-video model folder; export into another folder")
    if out.is_dir() and not (out / "preprocess.json").is_file() and any(
            entry.name not in EXPORT_FILES for entry in out.iterdir()):
        raise ExportError(f"{out}: a folder that is neither empty nor an export; export into a new folder")
    wrapper = LogitsAndEmbeddings(fused).eval()
    example = _random_video(fused, preprocess, verify_batch)
    with torch.no_grad():
        embedding_dim = int(wrapper(example[:1])[1].shape[1])
    external = _external_data_needed(fused)
    work = new_folder_beside(out)
    try:
        written_opset = _torch_onnx_export(wrapper, example, work / "model.onnx", opset, external)
        d_logits, d_embeddings = _verify(wrapper, work / "model.onnx", _random_video(fused, preprocess,
                                                                                   verify_batch, seed=1))
        report = ExportReport(out_dir=str(out), model=name, opset=written_opset,
                              external_data=external, num_classes=int(fused.num_classes),
                              embedding_dim=embedding_dim, verify_batch=verify_batch,
                              max_abs_diff_logits=d_logits, max_abs_diff_embeddings=d_embeddings,
                              tolerance=tolerance)
        if not (d_logits <= tolerance and d_embeddings <= tolerance):
            raise ExportError(f"{name}: onnxruntime does not reproduce PyTorch: logits max |diff| {d_logits:.2e}, "
                              f"embeddings max |diff| {d_embeddings:.2e} > tolerance {tolerance:.0e}")
        record = preprocess_record(fused, preprocess, name=name, source=source, opset=written_opset,
                                   embedding_dim=embedding_dim)
        record["verification"] = {k: v for k, v in asdict(report).items()
                                  if k in ("verify_batch", "max_abs_diff_logits",
                                           "max_abs_diff_embeddings", "tolerance")}
        names = fused.class_names or [str(i) for i in range(fused.num_classes)]
        (work / "labels.txt").write_text("".join(f"{n}\n" for n in names))
        record["files"] = {n: file_record(work / n) for n in RECORDED_FILES if (work / n).exists()}
        (work / "preprocess.json").write_text(json.dumps(record, indent=2) + "\n")
        replace_folder(work, out, owned=EXPORT_FILES)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("exported %s to %s (opset %d)", name, out, written_opset)
    return report


def export_onnx(model_path: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int | None = None,
                clip: str | None = None, classes: str | None = None, labels: str | None = None,
                vocab: str | None = None, prompt: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                num_frames: int = 8, trust_checkpoint: bool = False) -> ExportReport:
    """Export a model that :func:`dist_video.load_model` opens (a dist-video model folder, an
    authors' ``.pyth`` with ``classes``, or any of them, plain CLIP weights included, with
    zero-shot ``labels``) to an ONNX folder ``out_dir``, with its test preprocessing; see
    :func:`export_fused_onnx`."""
    from .loading import load_model

    loaded = load_model(model_path, clip=clip, classes=classes, labels=labels, vocab=vocab, prompt=prompt,
                        device="cpu", clip_dtype="fp32", num_frames=num_frames, trust_checkpoint=trust_checkpoint)
    if loaded.network is None:
        raise ExportError(f"{model_path}: already an exported model")
    loaded.require_head()
    fused = loaded.take_inference_form(torch.float32)  # one copy of the weights from here on
    return export_fused_onnx(fused, loaded.preprocess, out_dir, name=loaded.name,
                             source=os.path.abspath(model_path), opset=opset, tolerance=tolerance)
