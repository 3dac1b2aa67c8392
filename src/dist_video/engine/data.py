"""From a :class:`~dist_video.config.Config` to datasets and loaders.

The training loader is resumable and distributed at once: epoch ``e`` visits the clips in one
global permutation seeded by ``(seed, e)``; global batch ``k`` is the slice
``P[k * G:(k + 1) * G]`` (``G`` = per-process batch x processes) and process ``r`` takes its
``r``-th part. A run resumed at batch ``k`` of epoch ``e`` therefore sees exactly the clips an
uninterrupted run would have seen, whatever the number of DataLoader workers.

With ``data.clips_per_video = N`` the permutation is over videos: a batch of ``batch_size``
clips holds ``batch_size / N`` videos, N clips each (decoded once, augmented independently),
flattened by :func:`collate_clips` so the training step sees ``batch_size`` clips as before;
an epoch visits every video once.

Loader workers ship uint8 clips and each clip's colour map (the transforms' ``geometry`` step), a
quarter of the bytes of float32 clips in shared and pinned memory; :func:`clips_on_device` moves
a batch to the device and makes the float clips there (colour jitter, grayscale, normalisation).
One :class:`TrainLoader` serves every epoch of a run, so its workers (and their open decoders,
imports, thread pools) start once, not once per epoch.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..config import Config
from ..data.datasets import (VideoClipDataset, load_annotations, load_test_clips, read_class_list,
                             write_bad_videos)
from ..data.sampling import build_sampler
from ..data.transforms import TestTransform, TrainTransform, flip_label_map
from .distributed import DistEnv, local_world_size

__all__ = ["Datasets", "build_datasets", "train_loader", "TrainLoader", "ResumableBatchSampler", "write_bad_files",
           "test_clips_of_file", "test_transform", "train_transform", "videos_per_batch", "train_batches_per_epoch",
           "collate_clips", "clips_on_device"]

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    """The splits a run needs (``None`` where not asked for) and their class names."""

    class_names: list[str]
    train: VideoClipDataset | None = None
    val: VideoClipDataset | None = None

    @property
    def val_paths(self) -> list[str] | None:
        return [r.path for r in self.val.records] if self.val is not None else None


def _annotations(cfg: Config, split: str, known_classes: Sequence[str] | None):
    d = cfg.data
    source = d.train if split == "train" else d.val
    if not source:
        raise ValueError(f"data.{split} is not set: give the {split} annotation file "
                         f"(--set data.{split}=PATH)")
    official_split = "train" if split == "train" else "test"
    root = d.root or None
    if d.format == "folder" and d.root and not os.path.isabs(source):
        source = os.path.join(d.root, source)
    return load_annotations(d.format, source, root=root, split=official_split, classes=d.classes or known_classes,
                            fold=d.split, on_missing="skip" if d.on_error == "skip" else "error")


def train_transform(cfg: Config, class_names: Sequence[str]) -> TrainTransform:
    a, d = cfg.augment, cfg.data
    return TrainTransform(crop_size=d.crop_size, scale=tuple(a.scale), ratio=tuple(a.ratio), flip=a.flip,
                          flip_labels=flip_label_map(class_names) if a.flip else None,
                          brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue,
                          color_jitter_p=a.color_jitter_p, grayscale_p=a.grayscale_p,
                          mean=tuple(d.mean), std=tuple(d.std))


def test_transform(crop_size: int, short_side: int, num_crops: int, mean, std) -> TestTransform:
    return TestTransform(crop_size=crop_size, short_side=short_side, num_crops=num_crops,
                         mean=tuple(mean), std=tuple(std))


def build_datasets(cfg: Config, splits: Sequence[str] = ("train", "val"),
                   bad_files_dir: str | os.PathLike | None = None, progress: bool = False,
                   verbose: bool = True) -> Datasets:
    """Read the annotations of ``splits`` and build their clip datasets (decoded into memory
    first with ``data.preload``; ``verbose``: log how much was preloaded).

    Both splits must name the same classes (the training split's list is authoritative when
    ``data.classes`` is not given)."""
    d = cfg.data
    num_frames = cfg.model.dist.num_frames
    sampler = build_sampler(d.sampling, num_frames, d.interval)
    out: dict[str, VideoClipDataset] = {}
    class_names: list[str] | None = read_class_list(d.classes) if d.classes else None
    bad_dir = Path(bad_files_dir) if bad_files_dir else Path(cfg.output_dir) / ".bad-videos"
    for split in splits:
        ann = _annotations(cfg, split, class_names)
        if class_names is None:
            class_names = list(ann.class_names)
        elif list(ann.class_names) != class_names:
            raise ValueError(f"data.{split} ({cfg.data.train if split == 'train' else cfg.data.val}) has "
                             f"{len(ann.class_names)} classes that differ from the other split's "
                             f"{len(class_names)}: give one class list with data.classes")
        if split == "train":
            transform = train_transform(cfg, class_names)
            out[split] = VideoClipDataset(ann.records, sampler=sampler, transform=transform, training=True,
                                          class_names=class_names, seed=cfg.train.seed, on_error=d.on_error,
                                          bad_files_dir=bad_dir / "train", clips_per_video=d.clips_per_video,
                                          clip_frames=d.clip_frames)
        else:
            transform = test_transform(d.crop_size, d.test_scale, d.num_crops, d.mean, d.std)
            out[split] = VideoClipDataset(ann.records, sampler=sampler, transform=transform, training=False,
                                          num_views=d.num_views, num_crops=d.num_crops, class_names=class_names,
                                          seed=cfg.train.seed, on_error=d.on_error, bad_files_dir=bad_dir / split)
    if d.preload:
        # Every process of this machine keeps its own copy of the frames: together they may take half the memory.
        share = 0.5 / local_world_size()
        for split, dataset in out.items():
            kept = dataset.preload(progress=progress, max_fraction=share)
            if verbose:
                logger.info("preloaded the %s split: %d videos, %.0f MiB of frames", split, len(dataset.records),
                            kept / 2**20)
    return Datasets(class_names=class_names or [], train=out.get("train"), val=out.get("val"))


class ResumableBatchSampler(Sampler[list[int]]):
    """This process's batches of one epoch, from global batch ``start_batch`` on.

    Global permutation of ``length`` items seeded by ``(seed, epoch)``; global batch ``k`` =
    ``P[k * B * W:(k + 1) * B * W]``; process ``rank`` takes ``[rank * B:(rank + 1) * B]`` of
    it. Incomplete global batches at the end are dropped (every process runs the same number
    of steps)."""

    def __init__(self, length: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        self.length, self.batch_size = length, batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch

    @property
    def num_batches(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & 0x7FFFFFFFFFFFFFFF)
        perm = torch.randperm(self.length, generator=gen).tolist()
        g = self.batch_size * self.world_size
        for k in range(self.start_batch, self.num_batches):
            chunk = perm[k * g:(k + 1) * g]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


def videos_per_batch(cfg: Config) -> int:
    """Videos in one process's training batch: ``train.batch_size / data.clips_per_video``."""
    n, b = cfg.data.clips_per_video, cfg.train.batch_size
    if n < 1:
        raise ValueError(f"data.clips_per_video must be >= 1, got {n}")
    if b % n:
        raise ValueError(f"train.batch_size={b} is not a multiple of data.clips_per_video={n} "
                         f"(a batch holds whole videos, {n} clips each)")
    return b // n


def train_batches_per_epoch(dataset: VideoClipDataset, cfg: Config, world_size: int) -> int:
    """Complete global batches in one epoch of ``dataset`` (every video once)."""
    return len(dataset) // (videos_per_batch(cfg) * world_size)


def collate_clips(items: list[dict]) -> dict:
    """Batch items of N clips each (``"video"`` N x ..., ``"colour"`` N x 3 x 4) into a batch of
    clips: ``"video"`` (B * N) x ..., ``"colour"`` (B * N) x 3 x 4, ``"label"`` (B * N,), and
    ``"index"``/``"view"``/``"crop"`` repeated per clip. Clips of one video are consecutive."""
    batch = default_collate(items)
    n = batch["video"].shape[1]
    batch["video"] = batch["video"].flatten(0, 1)
    if "colour" in batch:
        batch["colour"] = batch["colour"].flatten(0, 1)
    batch["label"] = batch["label"].flatten()
    for key in ("index", "view", "crop"):
        batch[key] = batch[key].repeat_interleave(n)
    return batch


def clips_on_device(batch: dict, transform, device: torch.device) -> torch.Tensor:
    """The float clips (B x 3 x T x S x S float32) of a loader batch on ``device``: its uint8
    ``"video"`` and, for training batches, ``"colour"`` (B x 3 x 4) are copied there without
    waiting (``non_blocking``; pinned on CUDA), then ``transform.normalize`` applies each clip's
    colour map, the clamp and ``(x - mean) / std`` on the device. ``transform``: the dataset's."""
    video = batch["video"].to(device, non_blocking=True)
    colour = batch.get("colour")
    if colour is not None:
        colour = colour.to(device, non_blocking=True)
    return transform.normalize(video, colour)


def _worker_init(_: int) -> None:
    # Ctrl-C goes to the whole process group: let the main process save a checkpoint and stop
    # the workers itself instead of every worker dying with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


class _EpochItems(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: the epoch travels with each index, so loader
    workers that outlive an epoch draw the clips of the epoch asked for (their copy of the
    dataset never sees the main process's :meth:`~VideoClipDataset.set_epoch`)."""

    def __init__(self, dataset: VideoClipDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _EpochBatches(Sampler[list[tuple[int, int]]]):
    """``sampler``'s batches with its current epoch attached to each index."""

    def __init__(self, sampler: ResumableBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]


class TrainLoader:
    """This process's training batches, epoch after epoch, from one DataLoader whose workers
    live for the whole run (``persistent_workers`` when ``data.workers > 0``). Each batch holds
    ``train.batch_size`` clips (``batch_size / clips_per_video`` videos)."""

    def __init__(self, dataset: VideoClipDataset, cfg: Config, env: DistEnv):
        self.dataset = dataset
        self.sampler = ResumableBatchSampler(len(dataset), videos_per_batch(cfg), seed=cfg.train.seed, epoch=0,
                                             rank=env.rank, world_size=env.world_size)
        workers = cfg.data.workers
        collate = collate_clips if dataset.clips_per_video > 1 else None
        self.loader = DataLoader(_EpochItems(dataset), batch_sampler=_EpochBatches(self.sampler), num_workers=workers,
                                 collate_fn=collate, pin_memory=env.device.type == "cuda",
                                 worker_init_fn=_worker_init if workers else None, persistent_workers=workers > 0,
                                 prefetch_factor=2 if workers else None)

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """The loader of ``epoch`` from global batch ``start_batch`` (iterate it once)."""
        self.dataset.set_epoch(epoch)
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        return self.loader


def train_loader(dataset: VideoClipDataset, cfg: Config, env: DistEnv, *, epoch: int,
                 start_batch: int = 0) -> DataLoader:
    """The training DataLoader of ``epoch`` for this process, from batch ``start_batch`` (one
    epoch; a run keeps one :class:`TrainLoader` for all its epochs)."""
    return TrainLoader(dataset, cfg, env).epoch(epoch, start_batch)


def write_bad_files(dataset: VideoClipDataset, out_dir: str | os.PathLike, epoch: int | None = None) -> Path | None:
    """Write the list of skipped bad videos into the run folder (``bad_videos.txt``)."""
    path = write_bad_videos(dataset, out_dir, epoch=epoch)
    if path is not None:
        logger.warning("%d clips were replaced because their video could not be read; list in %s",
                       dataset.num_skipped, path)
    return path


def test_clips_of_file(path: str | os.PathLike, preprocess: dict, *, num_frames: int,
                       views: int | None = None) -> torch.Tensor:
    """The test clips of one video file under a model's recorded preprocessing:
    (views x crops) x 3 x T x S x S."""
    p = preprocess
    sampler = build_sampler(p["sampling"], num_frames, p.get("interval", 4))
    transform = test_transform(p["crop_size"], p["test_scale"], p["num_crops"], p["mean"], p["std"])
    return load_test_clips(path, sampler=sampler, transform=transform, num_views=views or p["num_views"],
                           num_crops=p["num_crops"])
