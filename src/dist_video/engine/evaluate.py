"""Multi-view evaluation: views x crops per video, class probabilities averaged, gathered
across processes without double counting."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ..storage import write_text_atomic
from .data import clips_on_device
from .distributed import DistEnv, all_gather_objects
from .metrics import classification_metrics, plot_confusion_matrix, write_predictions_csv

__all__ = ["ShardSampler", "predict_dataset", "evaluate", "fuse_for_inference"]


class ShardSampler(Sampler[int]):
    """This process's share of ``length`` items, dealt out by video: videos ``rank, rank +
    world, ...`` with all their ``items_per_video`` consecutive items (views x crops), so
    every item is on exactly one process, no padding, and each video is decoded by one
    process only."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, items_per_video: int = 1):
        n = max(1, items_per_video)
        videos = range(rank, -(-length // n), world_size)
        self.indices = [i for v in videos for i in range(v * n, min((v + 1) * n, length))]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def fuse_for_inference(model, amp_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model's inference form (``model.fuse``) in the run's precision: the autocast dtype of
    training (bf16/fp16), else the frozen CLIP's dtype. A model without ``fuse`` is an inference
    form already (e.g. an exported folder's onnxruntime runner) and is used as it is."""
    if not hasattr(model, "fuse"):
        return model
    return model.fuse(amp_dtype if amp_dtype is not None else model.clip_dtype)


@torch.no_grad()
def predict_dataset(model, dataset, env: DistEnv, *, batch_size: int, workers: int,
                    amp_dtype: torch.dtype | None = None, progress: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Average class probabilities over each video's views and crops.

    ``dataset`` items are dicts with ``video`` (uint8 3 x T x S x S, made float on the device by
    ``dataset.transform.normalize``, see :func:`~dist_video.engine.data.clips_on_device`),
    ``label`` and ``index`` (the video's record index). Returns (scores V x C, labels V, record indices V) on every
    process, sorted by record index. The model runs in its inference form
    (:func:`fuse_for_inference`), made once here. Each process takes whole videos
    (:class:`ShardSampler`), and each batch whole videos when ``batch_size`` allows (rounded
    down to a multiple of the items per video), so every video is decoded once. The
    probabilities stay on the device until the last batch (N x C floats there) and come to the
    host in one transfer: the loop never waits for the device."""
    fused = fuse_for_inference(model, amp_dtype)
    per_video = getattr(dataset, "items_per_video", 1)
    sampler = ShardSampler(len(dataset), env.rank, env.world_size, per_video)
    if batch_size >= per_video:  # whole videos per batch: a video's views are decoded by one DataLoader worker
        batch_size -= batch_size % per_video
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=env.device.type == "cuda")
    iterator = loader
    if progress and env.is_main:
        from tqdm import tqdm
        iterator = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True, leave=False)
    batch_probs: list[torch.Tensor] = []   # on the device: one transfer at the end, no sync per batch
    indices: list[int] = []
    batch_labels: list[int] = []
    for batch in iterator:
        video = clips_on_device(batch, dataset.transform, env.device)
        batch_probs.append(fused(video).float().softmax(dim=1))
        indices.extend(batch["index"].tolist())
        batch_labels.extend(batch["label"].tolist())
    del fused
    probs = torch.cat(batch_probs).cpu() if batch_probs else torch.empty(0)
    merged_sums, merged_counts, merged_labels = _merged(*_sums_by_video(probs, indices, batch_labels))
    order = sorted(merged_sums)
    if not order:
        raise ValueError("evaluation got no videos")
    scores = torch.stack([merged_sums[i] / merged_counts[i] for i in order])
    return scores, torch.tensor([merged_labels[i] for i in order]), order


def _sums_by_video(probs: torch.Tensor, indices: Sequence[int], labels: Sequence[int]
                   ) -> tuple[dict[int, torch.Tensor], dict[int, int], dict[int, int]]:
    """This process's items (``probs`` N x C, record index and label of each) summed per video:
    (probabilities summed, items counted, label) by record index."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    by_video: dict[int, int] = {}
    for p, idx, y in zip(probs, indices, labels):
        sums[idx] = sums[idx] + p if idx in sums else p.clone()
        counts[idx] = counts.get(idx, 0) + 1
        by_video[idx] = y
    return sums, counts, by_video


def _merged(sums: dict[int, torch.Tensor], counts: dict[int, int], labels: dict[int, int]
            ) -> tuple[dict[int, torch.Tensor], dict[int, int], dict[int, int]]:
    """Every process's :func:`_sums_by_video` merged (on every process)."""
    merged_sums: dict[int, torch.Tensor] = {}
    merged_counts: dict[int, int] = {}
    merged_labels: dict[int, int] = {}
    for part_sums, part_counts, part_labels in all_gather_objects((sums, counts, labels)):
        for idx, s in part_sums.items():
            merged_sums[idx] = merged_sums[idx] + s if idx in merged_sums else s
            merged_counts[idx] = merged_counts.get(idx, 0) + part_counts[idx]
            merged_labels[idx] = part_labels[idx]
    return merged_sums, merged_counts, merged_labels


def evaluate(model, dataset, env: DistEnv, *, class_names: Sequence[str], batch_size: int, workers: int,
             amp_dtype: torch.dtype | None = None, out_dir: str | os.PathLike | None = None,
             video_paths: Sequence[str] | None = None, progress: bool = False, extra: dict | None = None
             ) -> dict:
    """Evaluate and (on the main process, if ``out_dir``) write ``metrics.json``,
    ``predictions.csv`` and ``confusion_matrix.png``. Returns the metrics."""
    scores, labels, order = predict_dataset(model, dataset, env, batch_size=batch_size, workers=workers,
                                            amp_dtype=amp_dtype, progress=progress)
    metrics = classification_metrics(scores, labels, len(class_names))
    metrics["views_per_video"] = len(dataset) // max(1, len(order)) if hasattr(dataset, "__len__") else None
    metrics.update(extra or {})
    if out_dir is not None and env.is_main:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
        summary["per_class_accuracy"] = {name: acc for name, acc in zip(class_names, metrics["per_class_accuracy"])}
        write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        (out / "confusion_matrix.json").write_text(json.dumps(metrics["confusion_matrix"]) + "\n")
        paths = [video_paths[i] for i in order] if video_paths is not None else [str(i) for i in order]
        write_predictions_csv(out / "predictions.csv", paths, labels, scores, class_names)
        plot_confusion_matrix(metrics["confusion_matrix"], class_names, out / "confusion_matrix.png",
                              title=f"top-1 {100 * metrics['top1']:.1f}%  ({metrics['num_videos']} videos)")
    return metrics
