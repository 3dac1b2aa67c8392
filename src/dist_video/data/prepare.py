"""Prepare a dataset once: every video re-encoded to a small short side with short GOPs.

Training decodes every video again in every epoch; Kinetics as downloaded is mostly 720p or
larger, with long GOPs. Re-encoding it once to the resolution training actually uses (short
side 320 or 256, then cropped to 224) and to keyframes every ``gop`` frames makes every later
decode cheaper: fewer pixels per frame, and a seek lands at most ``gop - 1`` frames before
the frame asked for. The encoder is tuned for decoding (x264's ``fastdecode``: CAVLC instead of
CABAC, no deblocking filter, no weighted prediction), which makes every later decode cheaper
again for a slightly larger file; ``tune=None`` keeps x264's default tools.

What :func:`prepare_video` keeps: every decodable frame, in the same order, at the same
(average) frame rate: frame ``i`` of the output is frame ``i`` of the source (as
:func:`~dist_video.data.decoding.read_frames` numbers them) resized so that its short side
is ``short_side`` (never enlarged; both sides even, as yuv420p needs), encoded as H.264 in
MP4. Audio and other streams are dropped. The output's frame count is checked against the
frames decoded from the source before the file gets its final name.

:func:`prepare_dataset` runs the jobs in parallel processes. Every output is written under a
temporary name in its folder and renamed when complete, so an interrupted run leaves only
finished files with final names, and a new run skips them (and removes stale temporary
files). A video that cannot be read is reported with its cause; the others go on.
"""

from __future__ import annotations

import csv
import difflib
import glob
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import av
from av.video.frame import PictureType

from ..storage import atomic_write, replace_file, write_text_atomic
from .annotations import VIDEO_EXTENSIONS, Annotations, VideoRecord, load_annotations
from .decoding import VideoDecodeError, decoded_frames, probe, video_stream

__all__ = ["PrepareJob", "PrepareResult", "PrepareReport", "output_size", "prepare_video", "plan_prepare",
           "prepare_dataset", "write_annotations", "write_report", "REPORT_NAME", "TEMP_MARK", "X264_TUNES",
           "check_tune"]

logger = logging.getLogger(__name__)

REPORT_NAME = "prepare_report.json"
#: Temporary outputs are ``.<name>.<TEMP_MARK><pid>.mp4`` beside the final file.
TEMP_MARK = "partial-"
#: x264's tunings (``--tune``); several may be combined with commas.
X264_TUNES = frozenset({"film", "animation", "grain", "stillimage", "psnr", "ssim", "fastdecode", "zerolatency"})


@dataclass(frozen=True)
class PrepareJob:
    """One video to re-encode: ``source`` -> ``output`` (an .mp4 path); ``label`` for the
    annotation file (-1 for a folder tree)."""

    source: str
    output: str
    label: int = -1


@dataclass
class PrepareResult:
    """What happened to one job: ``status`` is ``done``, ``skipped`` (output already there) or
    ``failed`` (``cause`` says why)."""

    source: str
    output: str
    status: str
    cause: str = ""
    frames: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0


@dataclass
class PrepareReport:
    """The summary written to ``DST/prepare_report.json``."""

    source: str
    destination: str
    short_side: int
    gop: int
    workers: int
    crf: int = 23
    preset: str = "veryfast"
    tune: str | None = "fastdecode"
    done: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    frames: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    annotation_files: list[str] = field(default_factory=list)

    def add(self, r: PrepareResult) -> None:
        if r.status == "failed":
            self.failed += 1
            self.failures.append({"source": r.source, "cause": r.cause})
            return
        self.done += r.status == "done"
        self.skipped += r.status == "skipped"
        self.bytes_before += r.bytes_before
        self.bytes_after += r.bytes_after
        self.frames += r.frames


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side`` (never enlarged), aspect
    kept, both rounded to even numbers (at least 2)."""
    short = min(width, height)
    scale = min(1.0, short_side / short) if short > 0 else 1.0

    def even(x: float) -> int:
        return max(2, int(round(x / 2)) * 2)

    return even(width * scale), even(height * scale)


def _frame_rate(stream, fps: float) -> Fraction:
    """The output's constant rate: the source's average rate as the decoding module measures
    it (``fps``: the container's rate, or frames / duration for irregular timestamps)."""
    rate = stream.average_rate
    if rate and abs(float(rate) - fps) <= 1e-6 * fps:
        return Fraction(rate)
    return Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)


def _remove_stale(output: Path) -> None:
    for old in output.parent.glob(f".{glob.escape(output.name)}.{TEMP_MARK}*.mp4"):
        try:
            old.unlink()
        except OSError:
            pass


def prepare_video(source: str | os.PathLike, output: str | os.PathLike, *, short_side: int = 320, gop: int = 16,
                  crf: int = 23, preset: str = "veryfast", tune: str | None = "fastdecode",
                  threads: int = 0) -> PrepareResult:
    """Re-encode one video (see the module docstring); never raises for a bad source: the
    result's ``status`` is then ``failed`` with the cause. An existing ``output`` is kept
    (``skipped``). ``tune``: x264 tuning(s), comma-separated, or None. ``threads``: encoder
    and decoder threads (0: FFmpeg's choice)."""
    source, output = os.fspath(source), Path(output)
    t0 = time.perf_counter()
    size_in = os.path.getsize(source) if os.path.isfile(source) else 0
    if output.is_file():
        return PrepareResult(source, str(output), "skipped", bytes_before=size_in,
                             bytes_after=output.stat().st_size, frames=0)
    tmp = output.parent / f".{output.name}.{TEMP_MARK}{os.getpid()}.mp4"
    try:
        # No frame-size limit: frames are shrunk one at a time from the decoded YUV, never made
        # into full-size RGB, so a large source costs one decoded frame (shrinking them is the point).
        info = probe(source, limits=None)
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(output)
        options = {"crf": str(crf), "preset": preset, "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        written = _encode(source, tmp, info, output_size(info.width, info.height, short_side), gop,
                          {**options, "tune": tune} if tune else options, threads)
        if written == 0:
            raise VideoDecodeError(source, "no decodable video frames")
        if written != info.num_frames:  # decoding from the start is the definition of the frames
            logger.warning("%s: indexed as %d frames, %d decode; all %d kept", source, info.num_frames, written,
                           written)
        got = _count_frames(tmp)
        if got != written:
            raise VideoDecodeError(source, f"the re-encoded file holds {got} frames instead of {written}")
        replace_file(tmp, output)
    except VideoDecodeError as e:
        _unlink(tmp)
        return PrepareResult(source, str(output), "failed", cause=e.cause, bytes_before=size_in,
                             seconds=time.perf_counter() - t0)
    except (av.FFmpegError, OSError, ValueError, RuntimeError, MemoryError) as e:
        _unlink(tmp)
        cause = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return PrepareResult(source, str(output), "failed", cause=f"{type(e).__name__}: {cause}",
                             bytes_before=size_in, seconds=time.perf_counter() - t0)
    return PrepareResult(source, str(output), "done", frames=written, bytes_before=size_in,
                         bytes_after=output.stat().st_size, seconds=time.perf_counter() - t0)


def _encode(source: str, tmp: Path, info, size: tuple[int, int], gop: int, options: dict, threads: int) -> int:
    """Decode ``source`` from the start and encode every frame, resized to ``size``, as H.264
    into ``tmp`` at the source's average rate; returns the frames written."""
    width, height = size
    written = 0
    with av.open(source, metadata_errors="ignore") as src, av.open(str(tmp), "w", format="mp4") as dst:
        stream = video_stream(src, source)
        stream.codec_context.thread_count = threads
        stream.codec_context.thread_type = "AUTO" if threads != 1 else "SLICE"
        rate = _frame_rate(stream, info.fps)
        out = dst.add_stream("libx264", rate=rate)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        out.codec_context.gop_size = gop
        out.codec_context.thread_count = threads
        out.options = options
        time_base = 1 / rate
        for frame in decoded_frames(src, stream):
            small = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            small.pts, small.time_base = written, time_base
            small.pict_type = PictureType.NONE  # the source's keyframes must not force ours
            for packet in out.encode(small):
                dst.mux(packet)
            written += 1
        for packet in out.encode():
            dst.mux(packet)
    return written


def _count_frames(path: Path) -> int:
    """Frames the file decodes to (every frame, no RGB conversion)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        return sum(1 for _ in decoded_frames(c, stream))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- a dataset

def plan_prepare(source: str | os.PathLike, destination: str | os.PathLike, *, fmt: str | None = None,
                 root: str | os.PathLike | None = None, classes: str | os.PathLike | None = None,
                 split: str = "train", fold: int = 1) -> tuple[list[PrepareJob], Annotations | None]:
    """The jobs of a dataset: ``source`` is a folder (every video under it; outputs keep their
    relative paths) or an annotation file of ``fmt`` (see
    :func:`~dist_video.data.annotations.load_annotations`; outputs keep their paths relative to
    ``root``, or their file names when outside it). Outputs end in ``.mp4``. Returns (jobs,
    the annotations, or None for a folder). Two sources that would share an output name are
    an error naming both."""
    src, dst = Path(source), Path(destination)
    ann: Annotations | None = None
    if src.is_dir() and fmt in (None, "folder"):
        exts = tuple(VIDEO_EXTENSIONS)
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in exts
                       and not p.name.startswith("."))
        records = [VideoRecord(str(p), -1) for p in files]
        base = src
    else:
        if fmt is None:
            raise ValueError(f"{src}: give --format (csv, kinetics, ssv2, ucf101, hmdb51) for an annotation file")
        ann = load_annotations(fmt, src, root=root, split=split, classes=classes, fold=fold, on_missing="ignore")
        records = ann.records
        base = Path(root) if root else src.parent
    jobs, seen = [], {}
    for rec in records:
        p = Path(rec.path)
        rel = Path(os.path.relpath(os.path.abspath(p), os.path.abspath(base)))
        if rel.parts and rel.parts[0] == "..":
            rel = Path(p.name)
        out = (dst / rel).with_suffix(".mp4")
        if str(out) in seen and seen[str(out)] != rec.path:
            raise ValueError(f"{rec.path} and {seen[str(out)]} would both be written to {out}")
        seen[str(out)] = rec.path
        jobs.append(PrepareJob(rec.path, str(out), rec.label))
    if not jobs:
        raise ValueError(f"{src}: no videos found")
    return jobs, ann


def _run_job(args: tuple[PrepareJob, dict, int]) -> PrepareResult:
    job, options, parent = args
    if os.getppid() != parent:  # the parent died (killed): do not start new work
        return PrepareResult(job.source, job.output, "failed", cause="prepare was stopped")
    return prepare_video(job.source, job.output, **options)


def check_tune(tune: str | None) -> None:
    """Raise ValueError naming the nearest valid name when ``tune`` is not x264 tunings."""
    for name in tune.split(",") if tune else ():
        if name not in X264_TUNES:
            close = difflib.get_close_matches(name, sorted(X264_TUNES), n=1)
            raise ValueError(f"unknown x264 tune {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (one of {', '.join(sorted(X264_TUNES))}, comma-separated, or none)")


def prepare_dataset(jobs: Sequence[PrepareJob], *, short_side: int = 320, gop: int = 16, workers: int = 1,
                    crf: int = 23, preset: str = "veryfast", tune: str | None = "fastdecode",
                    on_result: Callable[[PrepareResult], None] | None = None) -> list[PrepareResult]:
    """Run ``jobs`` in ``workers`` processes (1: in this process); ``on_result`` is called in
    this process as each job ends (in completion order). Returns the results in job order."""
    if short_side < 2 or gop < 1 or workers < 1:
        raise ValueError(f"short_side must be >= 2, gop >= 1, workers >= 1; got {short_side}, {gop}, {workers}")
    check_tune(tune)
    options = {"short_side": short_side, "gop": gop, "crf": crf, "preset": preset, "tune": tune,
               "threads": 0 if workers == 1 else 1}
    by_output: dict[str, PrepareResult] = {}
    if workers == 1:
        results = (prepare_video(j.source, j.output, **options) for j in jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap_unordered(_run_job, [(j, options, os.getpid()) for j in jobs], chunksize=1)
    try:
        for r in results:
            by_output[r.output] = r
            if on_result is not None:
                on_result(r)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return [by_output[j.output] for j in jobs]


def write_annotations(jobs: Sequence[PrepareJob], results: Sequence[PrepareResult], ann: Annotations,
                      destination: str | os.PathLike, name: str) -> list[Path]:
    """``DST/<name>.csv`` (``path,label``: paths relative to DST, 0-based class indices) for
    every prepared video (done or skipped), and ``DST/classes.txt`` (one name per line).
    Train on it with ``data.format=csv``, ``data.root=DST``, ``data.classes=DST/classes.txt``."""
    dst = Path(destination)
    ok = {r.output for r in results if r.status in ("done", "skipped")}
    rows = [(os.path.relpath(j.output, dst), j.label) for j in jobs if j.output in ok]
    out = dst / f"{name}.csv"
    with atomic_write(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    classes = dst / "classes.txt"
    classes.write_text("".join(n + "\n" for n in ann.class_names), encoding="utf-8")
    return [out, classes]


def write_report(report: PrepareReport, destination: str | os.PathLike) -> Path:
    """``DST/prepare_report.json``."""
    out = Path(destination) / REPORT_NAME
    write_text_atomic(out, json.dumps(asdict(report), indent=2) + "\n")
    return out


def prepare_with_report(jobs: Sequence[PrepareJob], ann: Annotations | None, source: str | os.PathLike,
                        destination: str | os.PathLike, *, short_side: int = 320, gop: int = 16, workers: int = 1,
                        crf: int = 23, preset: str = "veryfast", tune: str | None = "fastdecode",
                        started: float | None = None,
                        on_result: Callable[[PrepareResult, PrepareReport], None] | None = None
                        ) -> tuple[PrepareReport, Path]:
    """``dist-video prepare`` after :func:`plan_prepare`: the ``jobs`` run (:func:`prepare_dataset`),
    their results counted into a :class:`PrepareReport` (``on_result(result, report)`` after
    each), the annotation files written for an annotation-file source (``ann``), and the report
    written to ``DST/prepare_report.json``. ``started``: when the work began (a
    ``time.perf_counter()`` value; default now). Returns the report and its path."""
    started = time.perf_counter() if started is None else started
    report = PrepareReport(source=os.path.abspath(source), destination=os.path.abspath(destination),
                           short_side=short_side, gop=gop, workers=workers, crf=crf, preset=preset, tune=tune)

    def count(r: PrepareResult) -> None:
        report.add(r)
        if on_result is not None:
            on_result(r, report)

    results = prepare_dataset(jobs, short_side=short_side, gop=gop, workers=workers, crf=crf, preset=preset,
                              tune=tune, on_result=count)
    if ann is not None:
        name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
        report.annotation_files = [str(p) for p in write_annotations(jobs, results, ann, destination, name)]
    report.seconds = time.perf_counter() - started
    return report, write_report(report, destination)


def report_summary(report: PrepareReport, path: str | os.PathLike) -> str:
    """The one-line summary ``dist-video prepare`` prints."""
    return (f"prepared {report.done} videos, skipped {report.skipped} already done, {report.failed} failed; "
            f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB in "
            f"{report.seconds:.1f} s; report: {path}")


__all__ += ["prepare_with_report", "report_summary"]
