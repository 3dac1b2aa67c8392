"""Find the broken files of a dataset before a run.

:func:`scan_video` checks one file the way training will read it: it opens it, counts its
decodable frames (:func:`~dist_video.data.decoding.probe`), then decodes the first and the
last frame a clip can ask for (0 and N - 1). A file is

* ``missing``: listed by the annotations but absent;
* ``unreadable``: it cannot be opened, has no video stream, or its frames do not decode;
* ``truncated``: it decodes, but fewer frames than its container declares (as a frame count,
  or as a duration for a file holding only the video stream): a cut download; or its last
  frame is not where its index said;
* ``short``: fewer than ``min_frames`` decodable frames (usable: clips repeat frames);
* ``ok``.

:func:`scan_dataset` runs the checks in parallel processes; :func:`summarize` gives counts
and the resolution and duration histograms; :func:`write_clean_annotations` writes an
annotation file without the missing, unreadable and truncated videos.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import av

from .annotations import Annotations, MissingVideosError, VideoRecord, load_annotations, parse_folder
from .decoding import VideoDecodeError, probe, read_frames

__all__ = ["ScanResult", "scan_video", "scan_dataset", "summarize", "load_for_scan", "write_clean_annotations",
           "write_scan_report", "BAD_STATUSES", "SHORT_SIDE_BINS", "DURATION_BINS"]

#: Statuses left out of a clean annotation file.
BAD_STATUSES = ("missing", "unreadable", "truncated")
#: Histogram bin edges: short side in pixels, duration in seconds (lower edges).
SHORT_SIDE_BINS = (0, 240, 320, 480, 720, 1080)
DURATION_BINS = (0.0, 2.0, 5.0, 10.0, 20.0, 60.0)


@dataclass
class ScanResult:
    """One file's check: ``status`` (see the module docstring), ``cause`` for bad files."""

    path: str
    label: int
    status: str
    cause: str = ""
    frames: int = 0
    declared_frames: int = 0
    width: int = 0
    height: int = 0
    fps: float = 0.0
    duration: float = 0.0


def _declared(path: str) -> tuple[int, float]:
    """(frames, seconds) the container states for the video (0 where it states none); the
    container's duration counts only for a file with no other stream."""
    try:
        with av.open(path, metadata_errors="ignore") as c:
            if not c.streams.video:
                return 0, 0.0
            s = c.streams.video[0]
            seconds = float(s.duration * s.time_base) if s.duration and s.time_base else 0.0
            if not seconds and len(c.streams) == 1 and c.duration:
                seconds = c.duration / 1_000_000
            return int(s.frames or 0), seconds
    except (av.FFmpegError, OSError, ValueError):
        return 0, 0.0


def scan_video(path: str, label: int = -1, *, min_frames: int = 16) -> ScanResult:
    """Check one file (see the module docstring); never raises for a bad file."""
    if not os.path.exists(path):
        return ScanResult(path, label, "missing", "file not found")
    try:
        info = probe(path)
    except VideoDecodeError as e:
        return ScanResult(path, label, "unreadable", e.cause)
    declared_frames, declared_seconds = _declared(path)
    result = ScanResult(path, label, "ok", frames=info.num_frames, width=info.width, height=info.height,
                        fps=info.fps, duration=info.duration, declared_frames=declared_frames)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            read_frames(path, [0, info.num_frames - 1], threads=1)
        except VideoDecodeError as e:
            result.status, result.cause = "unreadable", e.cause
            return result
    recounted = [w for w in caught if issubclass(w.category, RuntimeWarning) and "recounted" in str(w.message)]
    if recounted:
        now = probe(path).num_frames
        result.status = "truncated"
        result.cause = f"indexed as {info.num_frames} frames but only {now} decode"
        result.frames = now
    elif declared_frames > info.num_frames:
        result.status = "truncated"
        result.cause = f"the container declares {declared_frames} frames but only {info.num_frames} decode"
    elif info.fps > 0 and declared_seconds * info.fps > 1.02 * info.num_frames + 2:
        result.status = "truncated"
        result.cause = (f"the container declares {declared_seconds:.2f} s but only {info.num_frames} frames "
                        f"({info.num_frames / info.fps:.2f} s) decode")
    elif info.num_frames < min_frames:
        result.status = "short"
        result.cause = f"{info.num_frames} frames, fewer than {min_frames}"
    return result


def _scan_job(args: tuple[str, int, int]) -> ScanResult:
    path, label, min_frames = args
    return scan_video(path, label, min_frames=min_frames)


def scan_dataset(records: Sequence[VideoRecord], *, workers: int = 1, min_frames: int = 16,
                 on_result: Callable[[ScanResult], None] | None = None) -> list[ScanResult]:
    """Check every record in ``workers`` processes (1: in this process); ``on_result`` is
    called in this process as each check ends. Returns the results in record order."""
    jobs = [(r.path, r.label, min_frames) for r in records]
    if workers <= 1:
        it = map(_scan_job, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        it = pool.imap(_scan_job, jobs, chunksize=4)
    out = []
    try:
        for r in it:
            out.append(r)
            if on_result is not None:
                on_result(r)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return out


def _histogram(values: Sequence[float], edges: Sequence[float], unit: str) -> dict[str, int]:
    counts = Counter()
    for v in values:
        i = max(k for k, e in enumerate(edges) if v >= e)
        counts[i] += 1
    names = {}
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        names[i] = f"{lo:g}-{hi:g} {unit}" if hi is not None else f">= {lo:g} {unit}"
    return {names[i]: counts[i] for i in range(len(edges))}


def summarize(results: Sequence[ScanResult]) -> dict:
    """Counts per status, and histograms of short side (px) and duration (s) of the files
    that decode."""
    readable = [r for r in results if r.status in ("ok", "short", "truncated")]
    return {
        "videos": len(results),
        "status": {s: sum(r.status == s for r in results) for s in ("ok", "short", *BAD_STATUSES)},
        "short_side": _histogram([min(r.width, r.height) for r in readable], SHORT_SIDE_BINS, "px"),
        "duration": _histogram([r.duration for r in readable], DURATION_BINS, "s"),
        "frames": sum(r.frames for r in readable),
    }


def load_for_scan(source: str | os.PathLike, *, fmt: str | None = None, root: str | os.PathLike | None = None,
                  classes: str | os.PathLike | None = None, split: str = "train", fold: int = 1
                  ) -> tuple[list[VideoRecord], list[str], Annotations]:
    """The records of a dataset argument (a folder with one sub-folder per class, or an
    annotation file of ``fmt``), and the paths it lists that are missing."""
    src = Path(source)
    if src.is_dir() and fmt in (None, "folder"):
        ann = parse_folder(src)
        return ann.records, [], ann
    if fmt is None:
        raise ValueError(f"{src}: give --format (csv, kinetics, ssv2, ucf101, hmdb51) for an annotation file")
    missing: list[str] = []
    try:
        ann = load_annotations(fmt, src, root=root, split=split, classes=classes, fold=fold, on_missing="error")
    except MissingVideosError as e:
        missing = list(e.missing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ann = load_annotations(fmt, src, root=root, split=split, classes=classes, fold=fold, on_missing="skip")
    return ann.records, missing, ann


def write_clean_annotations(results: Sequence[ScanResult], class_names: Sequence[str],
                            out: str | os.PathLike) -> tuple[Path, Path]:
    """``out`` (CSV ``path,label``: absolute paths, 0-based class indices) without the missing,
    unreadable and truncated videos, and its class list ``<out stem>.classes.txt`` beside it
    (train with ``data.format=csv``, ``data.train=out``, ``data.classes=`` that file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in results:
            if r.status not in BAD_STATUSES:
                w.writerow([os.path.abspath(r.path), r.label])
    classes = out.with_name(out.stem + ".classes.txt")
    classes.write_text("".join(n + "\n" for n in class_names), encoding="utf-8")
    return out, classes


def write_scan_report(results: Sequence[ScanResult], out: str | os.PathLike, **extra) -> Path:
    """The summary and every file's result as JSON."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**extra, "summary": summarize(results), "files": [asdict(r) for r in results]}
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out


@dataclass
class ScanOutcome:
    """What ``dist-video scan`` found: every file's result, their summary, the report written,
    and (with ``write_clean``) the clean annotation file and its class list."""

    results: list[ScanResult]
    summary: dict
    report: Path
    clean: tuple[Path, Path] | None = None

    @property
    def bad(self) -> list[ScanResult]:
        return [r for r in self.results if r.status in BAD_STATUSES]


def scan_with_report(sources: Sequence[str | os.PathLike], report: str | os.PathLike, *, fmt: str | None = None,
                     root: str | os.PathLike | None = None, classes: str | os.PathLike | None = None,
                     split: str = "train", fold: int = 1, workers: int = 1, min_frames: int = 16,
                     write_clean: str | os.PathLike | None = None,
                     on_dataset: Callable[[int], None] | None = None,
                     on_result: Callable[[ScanResult], None] | None = None) -> ScanOutcome:
    """Scan every dataset of ``sources`` (see :func:`load_for_scan`; missing files are results
    too), write the JSON ``report`` and, with ``write_clean`` (one dataset only), the clean
    annotation file (:func:`write_clean_annotations`). ``on_dataset(n)``: a dataset of ``n``
    files starts; ``on_result``: after each file."""
    if write_clean and len(sources) != 1:
        raise ValueError("--write-clean takes one dataset at a time")
    results: list[ScanResult] = []
    names: list[str] = []
    for source in sources:
        records, missing, ann = load_for_scan(source, fmt=fmt, root=root, classes=classes, split=split, fold=fold)
        names = ann.class_names
        if on_dataset is not None:
            on_dataset(len(records) + len(missing))
        for path in missing:
            results.append(ScanResult(path, -1, "missing", "file not found"))
            if on_result is not None:
                on_result(results[-1])
        results += scan_dataset(records, workers=workers, min_frames=min_frames, on_result=on_result)
    path = write_scan_report(results, report, datasets=[os.path.abspath(d) for d in sources])
    clean = write_clean_annotations(results, names, write_clean) if write_clean else None
    return ScanOutcome(results, summarize(results), path, clean)


__all__ += ["ScanOutcome", "scan_with_report"]
