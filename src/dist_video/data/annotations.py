"""Annotation parsers for the usual video classification datasets.

Every parser returns :class:`Annotations` ``(records, class_names)``: records are
``VideoRecord(path, label)`` with absolute-or-root-joined paths and 0-based labels; class
names are human-readable (underscores and CamelCase turned into spaces) for CLIP prompts.

Errors are meant to be read by a person: an unknown label names the file, the line, the
label and the closest known label; missing videos are all reported at once with a count
(``on_missing="skip"`` drops them with a warning instead); an empty split is an error.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

__all__ = [
    "VIDEO_EXTENSIONS", "VideoRecord", "Annotations", "AnnotationError", "MissingVideosError",
    "readable_class_name", "camel_case_words", "read_class_list", "parse_kinetics", "parse_ssv2",
    "parse_ucf101", "parse_hmdb51", "parse_csv", "parse_folder", "load_annotations",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts",
                    ".wmv", ".3gp", ".ogv", ".gif")
_MAX_LISTED = 1000


@dataclass(frozen=True)
class VideoRecord:
    """One video: its file and its 0-based class index."""

    path: str
    label: int


class Annotations(NamedTuple):
    records: list[VideoRecord]
    class_names: list[str]


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is (unknown label, bad line, empty split)."""


class MissingVideosError(FileNotFoundError):
    """Videos listed in annotations but absent on disk; ``missing`` holds all their paths."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:
        return self.args[0]


# ----------------------------------------------------------------------------- names

def camel_case_words(name: str) -> str:
    """``"ApplyEyeMakeup"`` -> ``"Apply Eye Makeup"``; ``"YoYo"`` -> ``"Yo Yo"``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)


def readable_class_name(name: str) -> str:
    """A class name for text prompts: underscores -> spaces, ``[`` ``]`` removed, whitespace
    collapsed."""
    name = name.replace("_", " ").replace("[", "").replace("]", "")
    return " ".join(name.split())


def _key(name: str) -> str:
    """Comparison key for label names: case, underscores and spacing do not matter."""
    return " ".join(name.replace("_", " ").replace("[", "").replace("]", "").lower().split())


def _closest(label: str, known: Sequence[str]) -> str:
    if not known:
        return "(no classes)"
    keys = {_key(k): k for k in known}
    match = difflib.get_close_matches(_key(label), list(keys), n=1, cutoff=0.0)
    return repr(keys[match[0]]) if match else repr(known[0])


def _unknown_label(source: str, line: int | str, label: str, known: Sequence[str]) -> AnnotationError:
    where = f"line {line}" if isinstance(line, int) else line
    return AnnotationError(f"{source}, {where}: unknown label {label!r}; closest known label: "
                           f"{_closest(label, known)} ({len(known)} classes)")


class _LabelMap:
    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.index = {}
        for i, n in enumerate(self.names):
            self.index.setdefault(_key(n), i)

    def lookup(self, label: str) -> int | None:
        return self.index.get(_key(label))


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names from a file: one name per line, or ``<index> <name>`` lines (UCF101's
    classInd.txt; 0- or 1-based), or JSON (a list, or a mapping name -> index as in
    SSv2's labels file). Names are returned as written (see :func:`readable_class_name`)."""
    path = os.fspath(path)
    text = Path(path).read_text(encoding="utf-8-sig")
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        data = json.loads(stripped)
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
        return [str(x) for x in data]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise AnnotationError(f"{path}: no class names")
    pairs = [ln.split(None, 1) for ln in lines]
    if all(len(p) == 2 and p[0].isdigit() for p in pairs):
        ordered = sorted(pairs, key=lambda p: int(p[0]))
        first = int(ordered[0][0])
        if [int(p[0]) for p in ordered] != list(range(first, first + len(ordered))):
            raise AnnotationError(f"{path}: class indices are not consecutive")
        return [p[1].strip() for p in ordered]
    return lines


# ----------------------------------------------------------------------------- files

def _index_videos(root: str, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> dict[str, str]:
    """File stem -> path for every video file under ``root`` (first one found wins)."""
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts:
                found.setdefault(stem, os.path.join(dirpath, name))
    return found


def _resolve_missing(records: list[VideoRecord], missing: list[str], source: str, root: str,
                     on_missing: str) -> list[VideoRecord]:
    if not missing:
        return records
    if on_missing == "ignore":
        return records
    total = len(records) + len(missing)
    if on_missing == "skip":
        warnings.warn(f"{source}: {len(missing)} of {total} listed videos are missing under {root} "
                      f"and were skipped", RuntimeWarning, stacklevel=3)
        return records
    shown = missing[:_MAX_LISTED]
    more = f"\n  ... and {len(missing) - len(shown)} more (all in the exception's .missing)" \
        if len(missing) > len(shown) else ""
    raise MissingVideosError(
        f"{source}: {len(missing)} of {total} listed videos are missing under {root}:\n  "
        + "\n  ".join(shown) + more
        + "\n(use on_missing='skip' to train on the videos that exist)", missing)


def _check_on_missing(on_missing: str) -> None:
    if on_missing not in ("error", "skip", "ignore"):
        raise ValueError(f"on_missing must be 'error', 'skip' or 'ignore', got {on_missing!r}")


def _non_empty(ann: Annotations, source: str, split: str | None = None) -> Annotations:
    if not ann.records:
        what = f"split {split!r} of " if split else ""
        raise AnnotationError(f"no videos in {what}{source}")
    return ann


# ----------------------------------------------------------------------------- Kinetics

def parse_kinetics(csv_file: str | os.PathLike, root: str | os.PathLike, *, split: str | None = None,
                   class_names: Sequence[str] | None = None, on_missing: str = "error") -> Annotations:
    """Kinetics-400/600/700 official CSV (``label,youtube_id,time_start,time_end,split[,is_cc]``).

    Videos are found anywhere under ``root`` by file name: the usual
    ``root/<split>/<class>/<youtube_id>_<start:06d>_<end:06d>.mp4`` as well as flat layouts
    (``root/<id>_<start>_<end>.mp4``, ``root/<id>.mp4``, any video extension).
    ``split`` keeps only rows of that split (``"val"`` also matches ``"validate"``).
    ``class_names`` defaults to the CSV's labels, sorted (the standard class order)."""
    _check_on_missing(on_missing)
    source = os.fspath(csv_file)
    rows: list[tuple[int, str, str, int, int]] = []
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for line_no, row in enumerate(reader, start=1):
            if not row or row[0].startswith("#"):
                continue
            if line_no == 1 and row[0].strip().lower() == "label":
                continue
            if len(row) < 4:
                raise AnnotationError(f"{source}, line {line_no}: expected label,youtube_id,time_start,"
                                      f"time_end,split; got {row!r}")
            if split is not None and len(row) >= 5:
                row_split = row[4].strip().lower()
                wanted = split.lower()
                if row_split != wanted and {row_split, wanted} != {"val", "validate"}:
                    continue
            try:
                start, end = int(float(row[2])), int(float(row[3]))
            except ValueError:
                raise AnnotationError(f"{source}, line {line_no}: time_start/time_end are not numbers: "
                                      f"{row[2]!r}, {row[3]!r}") from None
            rows.append((line_no, row[0].strip(), row[1].strip(), start, end))
    if class_names is not None:
        names = list(class_names)
    else:
        first: dict[str, str] = {}
        for r in rows:
            first.setdefault(_key(r[1]), r[1])
        names = sorted(first.values())  # plain string order: the standard Kinetics class indices
    labels = _LabelMap(names)
    files = _index_videos(os.fspath(root))
    records, missing = [], []
    for line_no, label, yid, start, end in rows:
        y = labels.lookup(label)
        if y is None:
            raise _unknown_label(source, line_no, label, names)
        path = files.get(f"{yid}_{start:06d}_{end:06d}") or files.get(yid)
        if path is None:
            missing.append(os.path.join(os.fspath(root), f"{yid}_{start:06d}_{end:06d}.mp4"))
            continue
        records.append(VideoRecord(path, y))
    records = _resolve_missing(records, missing, source, os.fspath(root), on_missing)
    return _non_empty(Annotations(records, [readable_class_name(n) for n in names]), source, split)


# ----------------------------------------------------------------------------- SSv2

def parse_ssv2(labels_json: str | os.PathLike, split_json: str | os.PathLike, root: str | os.PathLike, *,
               on_missing: str = "error") -> Annotations:
    """Something-Something v2: ``something-something-v2-labels.json`` (template -> index
    string) and a split list (``something-something-v2-train.json`` / ``-validation.json``:
    entries with ``id`` and ``template``, whose ``[something]`` brackets are stripped).
    Videos are ``<id>.webm`` (any video extension) anywhere under ``root``."""
    _check_on_missing(on_missing)
    source = os.fspath(split_json)
    with open(labels_json, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict):
        raise AnnotationError(f"{os.fspath(labels_json)}: expected a JSON object template -> index")
    names = [name for name, _ in sorted(mapping.items(), key=lambda kv: int(kv[1]))]
    if [int(v) for _, v in sorted(mapping.items(), key=lambda kv: int(kv[1]))] != list(range(len(names))):
        raise AnnotationError(f"{os.fspath(labels_json)}: class indices are not 0..{len(names) - 1}")
    labels = _LabelMap(names)
    with open(source, encoding="utf-8") as f:
        entries = json.load(f)
    files = _index_videos(os.fspath(root))
    records, missing = [], []
    for n, entry in enumerate(entries):
        if "template" not in entry:
            raise AnnotationError(f"{source}, entry {n} (id {entry.get('id')}): no 'template' "
                                  f"(the test list has no labels)")
        template = entry["template"].replace("[", "").replace("]", "")
        y = labels.lookup(template)
        if y is None:
            raise _unknown_label(source, f"entry {n} (id {entry.get('id')})", template, names)
        vid = str(entry["id"])
        path = files.get(vid)
        if path is None:
            missing.append(os.path.join(os.fspath(root), f"{vid}.webm"))
            continue
        records.append(VideoRecord(path, y))
    records = _resolve_missing(records, missing, source, os.fspath(root), on_missing)
    return _non_empty(Annotations(records, [readable_class_name(n) for n in names]), source)


# ----------------------------------------------------------------------------- UCF101 / HMDB51

def parse_ucf101(splits_dir: str | os.PathLike, root: str | os.PathLike, *, split: str = "train",
                 fold: int = 1, on_missing: str = "error") -> Annotations:
    """UCF101 official splits: ``classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist0F.txt``
    (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``) and ``testlist0F.txt`` (path only,
    the class is the folder). Class names: CamelCase split into words."""
    _check_on_missing(on_missing)
    if split not in ("train", "test"):
        raise ValueError(f"UCF101 split must be 'train' or 'test', got {split!r}")
    splits_dir = os.fspath(splits_dir)
    names = read_class_list(os.path.join(splits_dir, "classInd.txt"))
    labels = _LabelMap(names)
    source = os.path.join(splits_dir, f"{split}list{fold:02d}.txt")
    records, missing = [], []
    with open(source, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            rel = parts[0]
            folder = rel.replace("\\", "/").split("/")[0]
            y = labels.lookup(folder)
            if len(parts) > 1:
                if not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(names):
                    raise AnnotationError(f"{source}, line {line_no}: class index {parts[1]!r} is not in "
                                          f"1..{len(names)} of classInd.txt")
                listed = int(parts[1]) - 1
                if y is not None and y != listed:
                    raise AnnotationError(f"{source}, line {line_no}: folder {folder!r} is class {y + 1} in "
                                          f"classInd.txt but the line says {listed + 1}")
                y = listed
            elif y is None:
                raise _unknown_label(source, line_no, folder, names)
            path = os.path.join(os.fspath(root), rel)
            if os.path.isfile(path):
                records.append(VideoRecord(path, y))
            else:
                missing.append(path)
    records = _resolve_missing(records, missing, source, os.fspath(root), on_missing)
    return _non_empty(Annotations(records, [camel_case_words(n) for n in names]), source, split)


def parse_hmdb51(splits_dir: str | os.PathLike, root: str | os.PathLike, *, split: str = "train",
                 fold: int = 1, on_missing: str = "error") -> Annotations:
    """HMDB51 official splits: one ``<class>_test_split<fold>.txt`` per class, lines
    ``<video>.avi <id>`` with id 1 = train, 2 = test, 0 = unused. Videos are
    ``root/<class>/<video>``. Classes are sorted by name."""
    _check_on_missing(on_missing)
    if split not in ("train", "test"):
        raise ValueError(f"HMDB51 split must be 'train' or 'test', got {split!r}")
    splits_dir = os.fspath(splits_dir)
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in os.listdir(splits_dir) if f.endswith(suffix))
    if not files:
        raise AnnotationError(f"{splits_dir}: no HMDB51 split files *{suffix}")
    names = [f[: -len(suffix)] for f in files]
    code = "1" if split == "train" else "2"
    records, missing = [], []
    for y, (name, file) in enumerate(zip(names, files)):
        source = os.path.join(splits_dir, file)
        with open(source, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise AnnotationError(f"{source}, line {line_no}: expected '<video> <0|1|2>', got {line.strip()!r}")
                if parts[1] != code:
                    continue
                path = os.path.join(os.fspath(root), name, parts[0])
                if os.path.isfile(path):
                    records.append(VideoRecord(path, y))
                else:
                    missing.append(path)
    records = _resolve_missing(records, missing, splits_dir, os.fspath(root), on_missing)
    return _non_empty(Annotations(records, [readable_class_name(n) for n in names]), splits_dir, split)


# ----------------------------------------------------------------------------- generic

def _csv_rows(path: str) -> list[tuple[int, list[str]]]:
    text = Path(path).read_text(encoding="utf-8-sig")
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    sample = lines[0][1]
    if "\t" in sample:
        delimiter = "\t"
    elif "," in sample:
        delimiter = ","
    else:
        return [(i, ln.rsplit(None, 1)) for i, ln in lines]
    out = []
    for i, ln in lines:
        row = next(csv.reader(io.StringIO(ln), delimiter=delimiter))
        out.append((i, [c.strip() for c in row]))
    return out


def parse_csv(csv_file: str | os.PathLike, root: str | os.PathLike | None = None, *,
              classes: str | os.PathLike | Sequence[str] | None = None, on_missing: str = "error") -> Annotations:
    """A CSV/TSV (or whitespace-separated) list of ``path,label``; an optional header
    (``path,label``), ``#`` comments. Labels are class names or 0-based indices. ``classes``:
    a class-list file (see :func:`read_class_list`) or a list of names; without it the class
    names are the sorted distinct label names (or ``"0"``, ``"1"``, ... for index labels).
    Relative paths are under ``root`` (default: the CSV's folder)."""
    _check_on_missing(on_missing)
    source = os.fspath(csv_file)
    root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(source))
    rows = _csv_rows(source)
    if rows and rows[0][1][0].strip().lower() in ("path", "video", "filename", "file", "video_path"):
        rows = rows[1:]
    for line_no, row in rows:
        if len(row) < 2 or not row[0]:
            raise AnnotationError(f"{source}, line {line_no}: expected 'path,label', got {row!r}")
    if classes is None:
        given = None
    elif isinstance(classes, (str, os.PathLike)):
        given = read_class_list(classes)
    else:
        given = list(classes)
    raw_labels = [row[1] for _, row in rows]
    if given is None:
        if raw_labels and all(re.fullmatch(r"\d+", lab) for lab in raw_labels):
            given = [str(i) for i in range(max(int(lab) for lab in raw_labels) + 1)]
        else:
            first: dict[str, str] = {}  # spelling of each name's first occurrence
            for lab in raw_labels:
                first.setdefault(_key(lab), lab)
            given = sorted(first.values())
    labels = _LabelMap(given)
    records, missing = [], []
    for line_no, row in rows:
        rel, lab = row[0], row[1]
        y = labels.lookup(lab)
        if y is None and re.fullmatch(r"\d+", lab):
            y = int(lab)
            if y >= len(given):
                raise AnnotationError(f"{source}, line {line_no}: class index {y} is out of range for "
                                      f"{len(given)} classes")
        if y is None:
            raise _unknown_label(source, line_no, lab, given)
        path = rel if os.path.isabs(rel) else os.path.join(root, rel)
        if on_missing == "ignore" or os.path.isfile(path):
            records.append(VideoRecord(path, y))
        else:
            missing.append(path)
    records = _resolve_missing(records, missing, source, root, on_missing)
    return _non_empty(Annotations(records, [readable_class_name(n) for n in given]), source)


def parse_folder(root: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                 extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Annotations:
    """One folder per class: ``root/<class>/**/<video>``. Classes are the sorted folder
    names (or ``class_names``, matched to folder names ignoring case and underscores)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise AnnotationError(f"{root}: not a folder")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    names = list(class_names) if class_names is not None else folders
    labels = _LabelMap(names)
    records = []
    for folder in folders:
        y = labels.lookup(folder)
        if y is None:
            raise _unknown_label(root, f"folder {folder!r}", folder, names)
        for path in sorted(_index_videos(os.path.join(root, folder), extensions).values()):
            records.append(VideoRecord(path, y))
    return _non_empty(Annotations(records, [readable_class_name(n) for n in names]), root)


def load_annotations(fmt: str, source: str | os.PathLike, *, root: str | os.PathLike | None = None,
                     split: str = "train", classes: str | os.PathLike | Sequence[str] | None = None,
                     fold: int = 1, on_missing: str = "error") -> Annotations:
    """Dispatch on ``fmt``:

    * ``"csv"``: ``source`` = the CSV; ``classes`` = optional class list; ``root`` = base of
      relative paths.
    * ``"folder"``: ``source`` = the folder with one sub-folder per class.
    * ``"kinetics"``: ``source`` = the official CSV; ``root`` = where the videos are;
      ``classes`` = optional class list (default: the CSV's labels).
    * ``"ssv2"``: ``source`` = the split JSON; ``classes`` = the labels JSON (required).
    * ``"ucf101"`` / ``"hmdb51"``: ``source`` = the folder of split files; ``split`` =
      ``"train"`` or ``"test"``; ``fold`` = 1, 2 or 3."""
    fmt = fmt.lower()
    if fmt == "csv":
        return parse_csv(source, root, classes=classes, on_missing=on_missing)
    if fmt == "folder":
        names = read_class_list(classes) if isinstance(classes, (str, os.PathLike)) else classes
        return parse_folder(source, class_names=names)
    if root is None:
        raise ValueError(f"format {fmt!r} needs the video root folder")
    if fmt in ("kinetics", "k400", "k600", "k700", "kinetics400", "kinetics600", "kinetics700"):
        names = read_class_list(classes) if isinstance(classes, (str, os.PathLike)) else classes
        return parse_kinetics(source, root, class_names=names, on_missing=on_missing)
    if fmt in ("ssv2", "something-something-v2"):
        if classes is None or not isinstance(classes, (str, os.PathLike)):
            raise ValueError("format 'ssv2' needs classes = the something-something-v2-labels.json file")
        return parse_ssv2(classes, source, root, on_missing=on_missing)
    if fmt == "ucf101":
        return parse_ucf101(source, root, split=split, fold=fold, on_missing=on_missing)
    if fmt == "hmdb51":
        return parse_hmdb51(source, root, split=split, fold=fold, on_missing=on_missing)
    raise ValueError(f"unknown annotation format {fmt!r}; choose csv, folder, kinetics, ssv2, ucf101 or hmdb51")
