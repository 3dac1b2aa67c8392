"""Kinetics-710: the union of Kinetics-400, -600 and -700 (UniFormerV2's recipe), built from
the releases' official annotation files.

:func:`build_kinetics710` reads each release's CSV files (``train`` / ``validate`` / ``test``;
with or without a header, the test files without a ``label`` column, any extra columns such as
``is_cc``), maps every label to its Kinetics-710 name (:data:`dist_video.label_maps.KINETICS_RENAMES`)
and writes, into ``out``:

* ``train.csv`` / ``val.csv``: ``label,youtube_id,time_start,time_end,split`` (the Kinetics
  format :func:`dist_video.data.datasets.parse_kinetics` reads), rows sorted by class index,
  then YouTube id and segment;
* ``classes.txt``: the 710 names in UniFormerV2's order (``assets/classnames/kinetics710.txt``);
* ``label_map.json``: for each release, its class index -> Kinetics-710 index, and its renamed
  names (see ``docs/kinetics710.md`` for the format);
* ``report.json``: rows read per file, duplicates removed, training clips removed because a
  release has them in its validation or test split, missing videos, class counts;
* ``videos/``: one symbolic link per written clip, ``<youtube_id>_<start:06d>_<end:06d>.<ext>``,
  to the file found (``data.root=OUT/videos``), and ``missing.csv`` (the clips not found).

A clip is identified by its YouTube id (``match_by="youtube_id"``, UniFormerV2's rule) or by its
id and segment (``match_by="segment"``). Training = the releases' training clips, each once (the
first release, in the order 400, 600, 700, gives its label), minus every clip that any release
lists for validation or test. Validation = the releases' validation clips, each once.

Videos are searched by file name (``<id>_<start:06d>_<end:06d>.*`` or ``<id>.*``, anywhere
below) in the Kinetics-400 folder, then the -600, then the -700 one; the first found wins. A
missing video is counted and its row left out, never an error. Re-running on the same inputs
writes byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..label_maps import KINETICS_RENAMES, builtin_class_names, class_key, kinetics710_name
from .datasets import VIDEO_EXTENSIONS

__all__ = ["RELEASES", "KineticsClip", "read_release_annotations", "build_kinetics710", "label_map", "format_report",
           "LABEL_MAP_FORMAT"]

logger = logging.getLogger(__name__)

RELEASES = ("kinetics400", "kinetics600", "kinetics700")
LABEL_MAP_FORMAT = "dist-video label map 1"
HEADER = ["label", "youtube_id", "time_start", "time_end", "split"]
_SPLITS = {"train": "train", "training": "train", "val": "val", "validate": "val", "validation": "val",
           "test": "test", "testing": "test", "holdout": "test"}


@dataclass(frozen=True)
class KineticsClip:
    """One annotation row: ``label`` is the Kinetics-710 name (None for unlabelled test rows)."""

    release: str
    label: str | None
    youtube_id: str
    start: int
    end: int
    split: str

    @property
    def stem(self) -> str:
        return f"{self.youtube_id}_{self.start:06d}_{self.end:06d}"


def _split_of(text: str) -> str | None:
    return _SPLITS.get(text.strip().lower())


def _file_split(path: Path) -> str | None:
    """The split a file name says (``kinetics700_2020_validate.csv`` -> ``val``), if any."""
    words = path.stem.lower().replace("-", "_").split("_")
    found = {_split_of(w) for w in words} - {None}
    return found.pop() if len(found) == 1 else None


def _columns(first: list[str]) -> dict[str, int] | None:
    """Column indices from a header row, or None when the first row is data."""
    names = [c.strip().lower() for c in first]
    if "youtube_id" not in names:
        return None
    return {n: names.index(n) for n in ("label", "youtube_id", "time_start", "time_end", "split") if n in names}


def _positional(row: list[str]) -> dict[str, int]:
    """Headerless rows: ``label,youtube_id,time_start,time_end[,split...]``, or the test files'
    ``youtube_id,time_start,time_end[,split]``."""
    def number(i):
        try:
            float(row[i])
            return True
        except (IndexError, ValueError):
            return False
    if number(1) and number(2):
        return {"youtube_id": 0, "time_start": 1, "time_end": 2, "split": 3}
    return {"label": 0, "youtube_id": 1, "time_start": 2, "time_end": 3, "split": 4}


def _clip(row: list[str], cols: dict[str, int], release: str, default_split: str | None) -> KineticsClip | str:
    """A row as a clip, or the reason it cannot be one."""
    def cell(name):
        i = cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""
    yid = cell("youtube_id")
    if not yid:
        return "no youtube_id"
    try:
        start, end = int(float(cell("time_start"))), int(float(cell("time_end")))
    except ValueError:
        return f"time_start/time_end are not numbers: {cell('time_start')!r}, {cell('time_end')!r}"
    split = _split_of(cell("split")) if cell("split") else default_split
    if split is None:
        return f"unknown split {cell('split')!r}"
    label = cell("label")
    return KineticsClip(release, kinetics710_name(label) if label else None, yid, start, end, split)


def read_release_annotations(path: str | os.PathLike, release: str) -> tuple[list[KineticsClip], dict]:
    """The clips of one official annotation CSV and its counts (``rows``, ``bad_rows``, rows per
    split). A bad row is logged with its line and skipped; it never stops the build."""
    path = Path(path)
    clips, bad, cols = [], 0, None
    default_split = _file_split(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if cols is None:
                cols = _columns(row)
                if cols is not None:
                    continue
                cols = _positional(row)
            clip = _clip(row, cols, release, default_split)
            if isinstance(clip, str):
                bad += 1
                logger.warning("%s, line %d: %s; row skipped", path, line_no, clip)
                continue
            clips.append(clip)
    splits = Counter(c.split for c in clips)
    stats = {"release": release, "rows": len(clips) + bad, "bad_rows": bad,
             **{s: splits.get(s, 0) for s in ("train", "val", "test")}}
    return clips, stats


def _annotation_files(folder: Path, out: Path) -> list[Path]:
    """The CSV files of a release folder: ``folder/*.csv`` and ``folder/annotations/*.csv``."""
    found = [p for d in (folder, folder / "annotations") if d.is_dir() for p in sorted(d.glob("*.csv"))]
    return [p for p in found if out.resolve() not in p.resolve().parents]


def _index_videos(folder: Path, out: Path) -> dict[str, str]:
    """File stem -> absolute path of every video below ``folder`` (sorted walk; first wins;
    the output folder is not searched)."""
    exts = tuple(e.lower() for e in VIDEO_EXTENSIONS)
    skip = out.resolve()
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if Path(dirpath, d).resolve() != skip)
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts:
                found.setdefault(stem, str(Path(dirpath, name).resolve()))
    return found


def _identity(clip: KineticsClip, match_by: str) -> tuple:
    return (clip.youtube_id,) if match_by == "youtube_id" else (clip.youtube_id, clip.start, clip.end)


def _unique(clips: Sequence[KineticsClip], match_by: str) -> tuple[list[KineticsClip], int, int]:
    """Each clip once (the first one listed wins); also the duplicates and the label conflicts
    among them (the same clip under different Kinetics-710 labels)."""
    first: dict[tuple, KineticsClip] = {}
    conflicts = 0
    for clip in clips:
        key = _identity(clip, match_by)
        if key in first:
            conflicts += class_key(first[key].label) != class_key(clip.label)
        else:
            first[key] = clip
    return list(first.values()), len(clips) - len(first), conflicts


def _labelled(clips: Sequence[KineticsClip], index: dict[str, int]) -> tuple[list[KineticsClip], int]:
    """The clips whose label is a known class (and how many were not)."""
    kept = [c for c in clips if c.label is not None and class_key(c.label) in index]
    return kept, len(clips) - len(kept)


def _locate(clips: Sequence[KineticsClip], videos: dict[str, dict[str, str]] | None
            ) -> tuple[list[tuple[KineticsClip, str | None]], list[KineticsClip], Counter]:
    """Each clip with the video file found for it (search order: the folders of ``videos``);
    the clips with none; how many were found in each release's folder."""
    if videos is None:
        return [(c, None) for c in clips], [], Counter()
    found, missing, where = [], [], Counter()
    for clip in clips:
        hit = next(((rel, files[k]) for rel, files in videos.items()
                    for k in (clip.stem, clip.youtube_id) if k in files), None)
        if hit is None:
            missing.append(clip)
        else:
            found.append((clip, hit[1]))
            where[hit[0]] += 1
    return found, missing, where


def _csv_text(rows: Sequence[KineticsClip], split: str, index: dict[str, int], names: Sequence[str]) -> str:
    ordered = sorted(rows, key=lambda c: (index[class_key(c.label)], c.youtube_id, c.start, c.end))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for c in ordered:
        writer.writerow([names[index[class_key(c.label)]], c.youtube_id, c.start, c.end, split])
    return buf.getvalue()


def _missing_text(rows: Sequence[KineticsClip]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for c in sorted(rows, key=lambda c: (c.split, c.youtube_id, c.start, c.end)):
        writer.writerow([c.label, c.youtube_id, c.start, c.end, c.split])
    return buf.getvalue()


def label_map(names: Sequence[str]) -> dict:
    """``label_map.json``: each release's class index -> Kinetics-710 index, and its renames."""
    index = {class_key(n): i for i, n in enumerate(names)}
    releases = {}
    for release in RELEASES:
        own = builtin_class_names(release)
        releases[release] = {"num_classes": len(own),
                             "to_kinetics710": [index.get(class_key(kinetics710_name(n))) for n in own],
                             "renamed": dict(KINETICS_RENAMES[release])}
    return {"format": LABEL_MAP_FORMAT, "classes": "classes.txt", "num_classes": len(names),
            "renames_source": "VideoMAE V2 misc/k710_identical_label_merge.json (OpenGVLab/VideoMAEv2)",
            "releases": releases}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _link_videos(folder: Path, located: Sequence[tuple[KineticsClip, str | None]]) -> None:
    """``folder/<stem><ext>`` -> the video found, for every located clip; stale links go."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {c.stem + os.path.splitext(p)[1]: p for c, p in located if p is not None}
    for entry in sorted(os.listdir(folder)):
        link = folder / entry
        if link.is_symlink() and os.readlink(link) != wanted.get(entry):
            link.unlink()
    for name, target in sorted(wanted.items()):
        if not (folder / name).is_symlink():
            os.symlink(target, folder / name)


def _read_releases(folders: dict[str, Path], out: Path) -> tuple[list[KineticsClip], dict]:
    clips, files = [], {}
    for release, folder in folders.items():
        paths = _annotation_files(folder, out)
        if not paths:
            logger.warning("%s: no annotation CSV in it or in its annotations/ folder", folder)
        for path in paths:
            rows, stats = read_release_annotations(path, release)
            clips.extend(rows)
            files[str(path)] = stats
    return clips, files


def _split_sets(clips: Sequence[KineticsClip], index: dict[str, int], match_by: str) -> tuple[dict, dict, list, list]:
    """Training and validation clips (each once; training without any evaluation clip) and
    their counts."""
    held_out = {_identity(c, match_by) for c in clips if c.split in ("val", "test")}
    train, train_unknown = _labelled([c for c in clips if c.split == "train"], index)
    val, val_unknown = _labelled([c for c in clips if c.split == "val"], index)
    train_unique, train_dups, train_conflicts = _unique(train, match_by)
    val_unique, val_dups, val_conflicts = _unique(val, match_by)
    train_kept = [c for c in train_unique if _identity(c, match_by) not in held_out]
    train_counts = {"rows": len(train) + train_unknown, "unknown_label": train_unknown,
                    "duplicates_removed": train_dups, "label_conflicts": train_conflicts,
                    "in_validation_or_test_removed": len(train_unique) - len(train_kept)}
    val_counts = {"rows": len(val) + val_unknown, "unknown_label": val_unknown,
                  "duplicates_removed": val_dups, "label_conflicts": val_conflicts}
    return train_counts, val_counts, train_kept, val_unique


def build_kinetics710(*, k400: str | os.PathLike | None, k600: str | os.PathLike | None,
                      k700: str | os.PathLike | None, out: str | os.PathLike, classes: Sequence[str] | None = None,
                      match_by: str = "youtube_id", find_videos: bool = True, link_videos: bool = True) -> dict:
    """Build Kinetics-710 from the release folders (each holding its annotation CSVs, directly
    or in ``annotations/``, and its videos anywhere below) into ``out``; returns the report
    (also written to ``out/report.json``). ``classes``: the class list (default: the shipped
    ``kinetics710``). ``find_videos=False`` keeps every row and searches no video."""
    if match_by not in ("youtube_id", "segment"):
        raise ValueError(f"match_by must be 'youtube_id' or 'segment', got {match_by!r}")
    out = Path(out)
    folders = {r: Path(f) for r, f in zip(RELEASES, (k400, k600, k700)) if f is not None}
    for release, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: the {release} folder does not exist")
    names = list(classes) if classes is not None else builtin_class_names("kinetics710")
    index = {class_key(n): i for i, n in enumerate(names)}
    out.mkdir(parents=True, exist_ok=True)
    clips, files = _read_releases(folders, out)
    train_counts, val_counts, train, val = _split_sets(clips, index, match_by)
    videos = {r: _index_videos(f, out) for r, f in folders.items()} if find_videos else None
    train_found, train_missing, train_where = _locate(train, videos)
    val_found, val_missing, val_where = _locate(val, videos)
    train_counts.update(missing_video=len(train_missing), written=len(train_found))
    val_counts.update(missing_video=len(val_missing), written=len(val_found))
    report = {"classes": len(names), "match_by": match_by, "files": files,
              "rows_read": sum(f["rows"] for f in files.values()), "train": train_counts, "val": val_counts,
              "videos_found_in": {r: train_where[r] + val_where[r] for r in folders} if find_videos else None,
              "class_counts": {split: _class_counts([c for c, _ in found], names, index)
                               for split, found in (("train", train_found), ("val", val_found))}}
    _write_outputs(out, names, index, report, train_found, val_found, train_missing + val_missing)
    if find_videos and link_videos:
        _link_videos(out / "videos", train_found + val_found)
    logger.info("Kinetics-710: %d classes, %d training and %d validation clips (%d missing videos)",
                len(names), len(train_found), len(val_found), len(train_missing) + len(val_missing))
    return report


def _class_counts(clips: Sequence[KineticsClip], names: Sequence[str], index: dict[str, int]) -> dict[str, int]:
    counts = Counter(index[class_key(c.label)] for c in clips)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def _write_outputs(out: Path, names: Sequence[str], index: dict[str, int], report: dict,
                   train: Sequence[tuple[KineticsClip, str | None]], val: Sequence[tuple[KineticsClip, str | None]],
                   missing: Sequence[KineticsClip]) -> None:
    _write_if_changed(out / "classes.txt", "".join(f"{n}\n" for n in names))
    _write_if_changed(out / "train.csv", _csv_text([c for c, _ in train], "train", index, names))
    _write_if_changed(out / "val.csv", _csv_text([c for c, _ in val], "val", index, names))
    _write_if_changed(out / "missing.csv", _missing_text(missing))
    _write_if_changed(out / "label_map.json", json.dumps(label_map(names), indent=1) + "\n")
    _write_if_changed(out / "report.json", json.dumps(report, indent=1) + "\n")


def format_report(report: dict) -> str:
    """The build's summary for the command line, one line per split."""
    lines = [f"{report['classes']} classes, {report['rows_read']} rows read from {len(report['files'])} files "
             f"(clips matched by {report['match_by']})"]
    for split in ("train", "val"):
        c = report[split]
        removed = f", {c['in_validation_or_test_removed']} in a validation/test split" if split == "train" else ""
        lines.append(f"{split}: {c['written']} clips written ({c['rows']} rows, {c['duplicates_removed']} duplicates"
                     f"{removed}, {c['unknown_label']} unknown labels, {c['missing_video']} missing videos)")
    return "\n".join(lines)
