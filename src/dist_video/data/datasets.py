"""The clip dataset: videos listed by annotations (see :mod:`.annotations`) as training clips
or test views, with bad videos skipped or reported.

The annotation names (``VideoRecord``, ``load_annotations``, the parsers, ...) live in
:mod:`dist_video.data.annotations`; they are re-exported here for code that imports them from
this module.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..storage import write_text_atomic
from .annotations import (VIDEO_EXTENSIONS, AnnotationError, Annotations, MissingVideosError, VideoRecord,
                          camel_case_words, load_annotations, parse_csv, parse_folder, parse_hmdb51,
                          parse_kinetics, parse_ssv2, parse_ucf101, read_class_list, readable_class_name)
from .decoding import DEFAULT_LIMITS, DecodeLimits, VideoDecodeError, probe, read_frame_list, read_frames, scaled_size
from .frame_index import check_cancel
from .sampling import IntervalSampler, SegmentSampler
from .transforms import TestTransform

__all__ = [
    "VideoClipDataset", "write_bad_videos", "average_views", "load_test_clips",
    # re-exported from .annotations
    "VIDEO_EXTENSIONS", "VideoRecord", "Annotations", "AnnotationError", "MissingVideosError",
    "readable_class_name", "camel_case_words", "read_class_list", "parse_kinetics", "parse_ssv2",
    "parse_ucf101", "parse_hmdb51", "parse_csv", "parse_folder", "load_annotations",
]

def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class VideoClipDataset(Dataset):
    """Clips of videos for training or testing.

    Training (``training=True``): one item per record; each item is a random clip (frame
    sampling and augmentation drawn from a generator seeded by ``(seed, epoch, index)``, so
    an epoch is reproducible: call :meth:`set_epoch` at the start of each epoch).
    Testing: one item per (record, temporal view, spatial crop), ``num_views * num_crops``
    items per video, so a DataLoader batches them; average their scores per ``index`` (see
    :func:`average_views`).

    ``__getitem__`` returns ``{"video": uint8 3 x T x S x S, "label": int, "index": record
    index, "view": temporal view, "crop": spatial crop}``, and in training ``"colour"``: the
    clip's colour map (3 x 4 float32). Items carry the transform's uint8 step only
    (``transform.geometry``), a quarter of the bytes of float32 clips through the loader's
    shared memory; ``transform.normalize(batch["video"], batch.get("colour"))`` makes the float
    clips of a batch on the device (the engine does it after moving the batch there).
    ``transform``: a :class:`~dist_video.data.transforms.TrainTransform` or
    :class:`~dist_video.data.transforms.TestTransform` (anything with ``geometry`` and ``normalize``).

    Several clips per decoded video (training, ``clips_per_video=N > 1``): an item samples N
    clips independently, decodes the union of their frames in one pass and augments each clip
    on its own; ``"video"`` is then N x 3 x T x S x S, ``"colour"`` N x 3 x 4 and ``"label"`` an
    int64 tensor (N,) (a flip can change a clip's label). Clip 0 is the clip ``clips_per_video=1`` gives; clip
    ``c > 0`` draws from a generator seeded by ``(seed, epoch, index, attempt, c)``. With
    ``clip_frames="shared"`` the N clips take clip 0's frames and differ in their augmentation
    only (VideoMAE's ``num_sample``, MAE-ST's repeated augmentation): one clip's decoding for N
    clips.

    Bad videos (``VideoDecodeError``): ``on_error="error"`` raises it (its message names the
    file and the cause); ``on_error="skip"`` replaces the item by another record drawn
    deterministically from ``(seed, epoch, index, attempt)`` (same view and crop in testing),
    and records the bad file in ``bad_files_dir`` (one file per process, so it works from
    DataLoader workers); :func:`write_bad_videos` writes the list into a run's folder.

    :meth:`preload` decodes every video once and keeps its frames in memory (uint8, at the
    stored resolution); clips are then cut from memory with the same frames and the same
    random draws as from the files. For small datasets whose decoding would cost more than
    the model's step (the demo's videos, low-resolution sets). DataLoader workers started by
    fork share the frames without copying them.
    """

    def __init__(self, records: Sequence[VideoRecord], *, sampler: SegmentSampler | IntervalSampler | Callable,
                 transform: Callable, training: bool, num_views: int = 1, num_crops: int = 1,
                 class_names: Sequence[str] | None = None, seed: int = 0, on_error: str = "error",
                 bad_files_dir: str | os.PathLike | None = None, backend: str | None = None,
                 decode_threads: int | None = None, max_replacements: int = 20, clips_per_video: int = 1,
                 clip_frames: str = "independent", limits: DecodeLimits | None = DEFAULT_LIMITS):
        if on_error not in ("error", "skip"):
            raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
        if not records:
            raise ValueError("VideoClipDataset needs at least one record")
        if num_views < 1 or num_crops < 1:
            raise ValueError("num_views and num_crops must be >= 1")
        if int(clips_per_video) < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
        if clip_frames not in ("independent", "shared"):
            raise ValueError(f"clip_frames must be 'independent' or 'shared', got {clip_frames!r}")
        self.records = list(records)
        self.sampler = sampler
        self.transform = transform
        self.training = bool(training)
        self.num_views = 1 if training else int(num_views)
        self.num_crops = 1 if training else int(num_crops)
        self.clips_per_video = int(clips_per_video) if training else 1
        self.clip_frames = clip_frames
        self.class_names = list(class_names) if class_names is not None else None
        self.seed = int(seed)
        self.epoch = 0
        self.on_error = on_error
        self.backend = backend
        self.decode_threads = decode_threads
        self.limits = limits
        self.max_replacements = int(max_replacements)
        if bad_files_dir is None:  # created on the first bad file; shared with worker processes
            bad_files_dir = os.path.join(tempfile.gettempdir(), f"dist-video-bad-files-{os.getpid()}-{id(self):x}")
        self.bad_files_dir = os.fspath(bad_files_dir)
        self._known_bad: set[int] = set()
        self._frames: dict[int, torch.Tensor] = {}  # record index -> all frames (preload)

    # -- indexing
    @property
    def items_per_video(self) -> int:
        return self.num_views * self.num_crops

    def __len__(self) -> int:
        return len(self.records) * self.items_per_video

    def locate(self, item: int) -> tuple[int, int, int]:
        """Item number -> (record index, temporal view, spatial crop)."""
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} items")
        record, rest = divmod(item, self.items_per_video)
        view, crop = divmod(rest, self.num_crops)
        return record, view, crop

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def decode_short_side(self) -> int | None:
        """Testing with a :class:`TestTransform`: frames are decoded with their short side at
        most :func:`decoding_short_side` of the transform's; else None."""
        if not self.training and isinstance(self.transform, TestTransform):
            return decoding_short_side(self.transform.short_side)
        return None

    def set_epoch(self, epoch: int) -> None:
        """Make the random clips a function of (seed, epoch, index)."""
        self.epoch = int(epoch)

    # -- loading
    def preload(self, *, progress: bool = False, max_fraction: float = 0.5) -> int:
        """Decode every record's frames into memory; returns the bytes kept.

        Refuses (``MemoryError`` naming the sizes) when the decoded frames would take more
        than ``max_fraction`` of the memory available now. Unreadable videos raise (``on_error
        ="error"``) or are left out (``"skip"``): never drawn as replacements, and listed and
        counted as bad when their own item is replaced, as without preloading."""
        need, infos = 0, []
        for i, rec in enumerate(self.records):
            try:
                info = probe(rec.path, limits=self.limits)
            except VideoDecodeError:
                if self.on_error == "error":
                    raise
                self._known_bad.add(i)
                continue
            infos.append((i, info.num_frames))
            width, height = scaled_size(info.width, info.height, self.decode_short_side)
            need += info.num_frames * width * height * 3
        available = _available_memory()
        if available is not None and need > max_fraction * available:
            raise MemoryError(f"data.preload: the {len(self.records)} videos need {need / 2**30:.2f} GiB decoded, "
                              f"more than {max_fraction:.0%} of the {available / 2**30:.2f} GiB of memory "
                              f"available; set data.preload=false")
        # the memory check above stands for the per-read byte limit
        whole_videos = replace(self.limits, max_decoded_bytes=None) if self.limits is not None else None
        items = infos
        if progress:
            from tqdm import tqdm
            items = tqdm(infos, desc="preload", unit="video", leave=False)
        kept = 0
        for i, n in items:
            try:
                frames = read_frames(self.records[i].path, range(n), self.backend, threads=self.decode_threads,
                                     max_short_side=self.decode_short_side, limits=whole_videos)
            except VideoDecodeError:
                if self.on_error == "error":
                    raise
                self._known_bad.add(i)
                continue
            self._frames[i] = frames
            kept += frames.numel()
        return kept

    def _read(self, record_index: int, indices: Sequence[int]) -> list[torch.Tensor]:
        """The frames ``indices`` of a record, ``H x W x 3`` uint8 each, not copied into one
        tensor: the transforms copy only their crops."""
        frames = self._frames.get(record_index)
        if frames is not None:
            return [frames[min(int(j), len(frames) - 1)] for j in indices]
        return read_frame_list(self.records[record_index].path, indices, self.backend, threads=self.decode_threads,
                               max_short_side=self.decode_short_side, limits=self.limits)

    def _num_frames(self, record_index: int) -> int:
        preloaded = self._frames.get(record_index)
        if preloaded is not None:
            return len(preloaded)
        return probe(self.records[record_index].path, limits=self.limits).num_frames

    def load(self, record_index: int, view: int, crop: int, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Decode, sample and geometrically transform one clip: (uint8 3 x T x S x S, colour map
        3 x 4 or None, label), see ``transform.geometry``; raises VideoDecodeError for a bad file."""
        rec = self.records[record_index]
        if self.training:
            return self.load_clips(record_index, [generator])[0]
        frames = self._test_frames(record_index, self._num_frames(record_index))[view]
        return self.transform.geometry(frames, label=rec.label, generator=generator, crop=crop)

    def load_clips(self, record_index: int, generators: Sequence[torch.Generator]
                   ) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """Training clips of one record, one per generator: each clip's frames are sampled with
        its generator (with ``clip_frames="shared"``: every clip takes the first generator's
        frames), the union of all clips' frames is decoded in one pass, then each clip is
        augmented with its generator. Returns [(uint8 3 x T x S x S clip, colour map, label)] in
        generator order; raises VideoDecodeError for a bad file."""
        rec = self.records[record_index]
        n = self._num_frames(record_index)
        if self.clip_frames == "shared":
            frames = self._read(record_index, self.sampler(n, view=None, rng=generators[0]))
            return [self.transform.geometry(frames, label=rec.label, generator=g) for g in generators]
        picks = [self.sampler(n, view=None, rng=g) for g in generators]
        frames = self._read(record_index, [i for p in picks for i in p])
        return [self.transform.geometry(f, label=rec.label, generator=g)
                for f, g in zip(_split(frames, picks), generators)]

    def _test_frames(self, record_index: int, num_video_frames: int) -> list[list[torch.Tensor]]:
        """uint8 frames of every test view of a record, decoded in one pass and kept for the
        record's next items (its views and crops are consecutive items)."""
        cached = getattr(self, "_view_cache", None)
        if cached is not None and cached[0] == record_index:
            return cached[1]
        views = [self.sampler(num_video_frames, view=v, num_views=self.num_views) for v in range(self.num_views)]
        flat = [i for v in views for i in v]
        split = _split(self._read(record_index, flat), views)
        self._view_cache = (record_index, split)
        return split

    def __getitem__(self, item: int) -> dict:
        record, view, crop = self.locate(item)
        candidate = record
        for attempt in range(self.max_replacements + 1):
            gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, record, attempt))
            if attempt > 0:
                candidate = int(torch.randint(len(self.records), (1,), generator=gen).item())
                if candidate in self._known_bad:
                    continue
            try:
                if self.clips_per_video > 1:
                    gens = [gen] + [torch.Generator().manual_seed(_seed(self.seed, self.epoch, record, attempt, c))
                                    for c in range(1, self.clips_per_video)]
                    clips = self.load_clips(candidate, gens)
                else:
                    video, colour, label = self.load(candidate, view, crop, gen)
            except VideoDecodeError as e:
                if self.on_error == "error":
                    raise
                self._note_bad(candidate, e)
                continue
            if self.clips_per_video > 1:
                return {"video": torch.stack([v for v, _, _ in clips]),
                        "colour": torch.stack([c for _, c, _ in clips]),
                        "label": torch.tensor([int(y) for _, _, y in clips], dtype=torch.long),
                        "index": candidate, "view": view, "crop": crop}
            item = {"video": video, "label": int(label), "index": candidate, "view": view, "crop": crop}
            if colour is not None:
                item["colour"] = colour
            return item
        raise VideoDecodeError(self.records[record].path,
                               f"unreadable, and so were {self.max_replacements} replacement videos "
                               f"(see {self.bad_files_dir})")

    def _note_bad(self, record_index: int, error: VideoDecodeError) -> None:
        self._known_bad.add(record_index)
        line = f"{self.records[record_index].path}\t{error.cause}".replace("\n", " ") + "\n"
        os.makedirs(self.bad_files_dir, exist_ok=True)
        with open(os.path.join(self.bad_files_dir, f"bad-{os.getpid()}.tsv"), "a", encoding="utf-8") as f:
            f.write(line)

    def bad_videos(self) -> dict[str, tuple[str, int]]:
        """Every bad video met so far by any process: path -> (cause, times skipped)."""
        found: dict[str, tuple[str, int]] = {}
        if not os.path.isdir(self.bad_files_dir):
            return found
        for name in sorted(os.listdir(self.bad_files_dir)):
            if not name.startswith("bad-"):
                continue
            with open(os.path.join(self.bad_files_dir, name), encoding="utf-8") as f:
                for line in f:
                    if "\t" not in line:
                        continue
                    path, cause = line.rstrip("\n").split("\t", 1)
                    count = found.get(path, (cause, 0))[1]
                    found[path] = (cause, count + 1)
        return found

    @property
    def num_skipped(self) -> int:
        """How many items were replaced because their video was bad (all processes)."""
        return sum(count for _, count in self.bad_videos().values())


def _split(frames: list[torch.Tensor], parts: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
    """``frames`` read for the concatenation of ``parts`` (lists of frame indices), cut back
    into one list per part."""
    out, start = [], 0
    for part in parts:
        out.append(frames[start:start + len(part)])
        start += len(part)
    return out


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def write_bad_videos(dataset: VideoClipDataset, out_dir: str | os.PathLike, epoch: int | None = None,
                     filename: str = "bad_videos.txt") -> Path | None:
    """Write the bad videos ``dataset`` met (in any DataLoader worker) to
    ``out_dir/filename``: a header, then ``<path>\\t<times skipped>\\t<cause>`` lines sorted by
    path. Returns the file, or None (and writes nothing) when there were none."""
    found = dataset.bad_videos()
    if not found:
        return None
    out = Path(out_dir) / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    when = f" up to the end of epoch {epoch}" if epoch is not None else ""
    lines = [f"# {len(found)} unreadable videos were skipped{when} "
             f"({sum(c for _, c in found.values())} items replaced); path, times skipped, cause"]
    lines += [f"{path}\t{count}\t{cause}" for path, (cause, count) in sorted(found.items())]
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out


def average_views(scores: torch.Tensor, indices: torch.Tensor | Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average per-item scores (N x C) over items of the same video (``indices``, N):
    returns (sorted distinct video indices V, mean scores V x C)."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    videos, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    sums = torch.zeros(len(videos), scores.shape[1], dtype=scores.dtype).index_add_(0, inverse, scores)
    counts = torch.bincount(inverse, minlength=len(videos)).to(scores.dtype)
    return videos, sums / counts[:, None]


def decoding_short_side(test_short_side: int) -> int:
    """The short side frames are decoded at, at most, for a test transform that resizes to
    ``test_short_side``: twice that. Frames up to it (the benchmarks' copies, 256-340 px for a
    224 test scale) are decoded as they are, so the evaluation protocol is untouched; larger
    frames are shrunk by the decoder first, so a full-size RGB frame of a 4K video is never made."""
    return 2 * test_short_side


def load_test_clips(path: str | os.PathLike, *, sampler: SegmentSampler | IntervalSampler | Callable,
                    transform: Callable, num_views: int, num_crops: int = 1, backend: str | None = None,
                    limits: DecodeLimits | None = DEFAULT_LIMITS, cancel: threading.Event | None = None
                    ) -> torch.Tensor:
    """All test clips of one video file: (num_views * num_crops) x 3 x T x S x S, views
    major, crops minor; the frames of every view are decoded in one pass, each distinct frame
    once. With a :class:`TestTransform`, frames larger than :func:`decoding_short_side` allows are
    shrunk while decoding (see :func:`~dist_video.data.decoding.read_frames`), then resized by the
    transform as usual. ``limits``: see
    :class:`~dist_video.data.decoding.DecodeLimits` (None: none), checked before decoding.
    ``cancel``: checked while decoding and before each view's transform (see
    :func:`~dist_video.data.decoding.read_frames`)."""
    n = probe(path, limits=limits).num_frames
    views = [sampler(n, view=v, num_views=num_views) for v in range(num_views)]
    flat = [i for v in views for i in v]
    short_side = decoding_short_side(transform.short_side) if isinstance(transform, TestTransform) else None
    frames = read_frame_list(path, flat, backend, max_short_side=short_side, limits=limits, cancel=cancel)
    clips = []
    for view in _split(frames, views):
        check_cancel(cancel, os.fspath(path))
        view = view if short_side is not None else torch.stack(view)  # a TestTransform takes frames as they are
        for c in range(num_crops):
            clips.append(transform(view, crop=c)[0])
    return torch.stack(clips)
