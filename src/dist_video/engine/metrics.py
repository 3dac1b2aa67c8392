"""Classification metrics, metric logs and plots."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..storage import write_text_atomic

__all__ = ["classification_metrics", "MetricLog", "plot_training_curves", "plot_confusion_matrix",
           "write_predictions_csv", "topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores. scores V x C, labels V."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1, top-5, mean class accuracy, per-class accuracy and the confusion matrix.

    scores: V x C (one row per video, views already averaged); labels: V. Accuracies are
    fractions in [0, 1]; mean class accuracy averages over classes that have videos."""
    labels = labels.long()
    pred = scores.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    correct = confusion.diag()
    per_class = [(correct[c] / support[c]).item() if support[c] > 0 else None for c in range(num_classes)]
    present = [a for a in per_class if a is not None]
    return {
        "top1": topk_accuracy(scores, labels, 1) if len(labels) else 0.0,
        "top5": topk_accuracy(scores, labels, 5) if len(labels) else 0.0,
        "mean_class_accuracy": float(np.mean(present)) if present else 0.0,
        "num_videos": int(len(labels)),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


class MetricLog:
    """Appends JSON lines to ``metrics.jsonl`` (and TensorBoard scalars when it is installed).

    ``truncate_after(step)`` drops lines logged after a checkpoint's step, so a resumed run's log
    equals an uninterrupted run's."""

    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard is optional
                self.writer = None

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch") and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
            self.writer.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss and learning rate against optimizer steps, and evaluation top-1 against steps."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(13 if evals else 9, 3.4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], color="tab:blue")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[1].plot(steps, [r["lr"] for r in train], color="tab:orange")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate (branch)")
    if evals:
        eval_steps, top1 = [r["step"] for r in evals], [100 * r["top1"] for r in evals]
        axes[2].plot(eval_steps, top1, "o-", color="tab:green", clip_on=False)
        # Accuracy lives in [0, 100] and its steps in the training's: fixed axes, so that one
        # evaluation reads as a value and not as the centre of an autoscaled range.
        axes[2].set_ylim(0, 100)
        axes[2].set_xlim(0, max(steps + eval_steps) * 1.05)
        axes[2].annotate(f"{top1[-1]:.1f}%", (eval_steps[-1], top1[-1]), textcoords="offset points",
                         xytext=(0, -14), ha="center", va="top", color="tab:green")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("eval top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class); names shown up to 40 classes."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    size = min(16, max(5, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_predictions_csv(path: str | os.PathLike, videos: Sequence[str], labels: torch.Tensor,
                          scores: torch.Tensor, class_names: Sequence[str], topk: int = 5) -> None:
    """One row per video: path, true class, predicted class, its probability, top-k classes."""
    probs = scores.float()
    k = min(topk, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "label", "prediction", "probability", "correct", f"top{k}"])
        for v, y, ps, idx in zip(videos, labels.tolist(), top_p.tolist(), top_i.tolist()):
            w.writerow([v, class_names[y], class_names[idx[0]], f"{ps[0]:.4f}", int(idx[0] == y),
                        "|".join(class_names[i] for i in idx)])
