"""Video embeddings for retrieval: files (or their windows) -> ``encode_video`` vectors, and
text -> the nearest embedded videos.

A file's embedding is the model's ``encode_video`` of its test views (views x crops),
averaged over them (E floats; unit length with ``normalize``). With a window, every window's
clip gives one row (see :mod:`dist_video.engine.timeline`): windows on the shared frame grid,
each grid frame through CLIP once, when the model's CLIP work is per frame.

An output folder holds ``embeddings.safetensors`` (tensor ``embeddings``, N x E float32) and
``index.csv`` (row i: ``row, video, start, end``; start/end empty for whole files). While it
runs, rows are appended to ``.partial/embeddings.f32`` (raw float32) and
``.partial/index.csv`` after each file, so a run that is killed loses nothing already
computed: a re-run with the same folder embeds only the files not in it yet.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..storage import atomic_path, read_safetensors
from .inference import FILE_ERRORS, TestClips, check_finite, error_message, model_device, read_ahead, read_test_clips

__all__ = ["EmbeddingIndex", "embed_file", "embed_files", "read_embeddings", "search_embeddings", "INDEX_FIELDS"]

logger = logging.getLogger(__name__)

INDEX_FIELDS = ("row", "video", "start", "end")
_PARTIAL = ".partial"


@dataclass
class EmbeddingIndex:
    """Embeddings ``N x E`` and, for each row, its ``(video, start, end)`` (start/end None for a
    whole file); ``errors``: ``{"video", "error"}`` for the files that could not be embedded;
    ``computed``: how many files this call embedded (the others were in the folder already)."""

    embeddings: torch.Tensor
    rows: list[tuple[str, float | None, float | None]]
    errors: list[dict] = field(default_factory=list)
    computed: int = 0


@torch.no_grad()
def embed_file(model, path: str | os.PathLike, preprocess: dict, *, views: int | None = None,
               normalize: bool = False) -> torch.Tensor:
    """E: ``model.encode_video`` of the file's test clips, averaged over them (then unit length
    with ``normalize``). Raises :class:`~dist_video.data.decoding.VideoDecodeError` for a bad file."""
    return _embed_clips(model, read_test_clips(path, preprocess, num_frames=model.config.num_frames, views=views),
                        normalize)


def _embed_clips(model, clips: TestClips, normalize: bool) -> torch.Tensor:
    """The result of :func:`embed_file` from the file's decoded clips."""
    z = check_finite(model.encode_video(clips.on(model_device(model))).float().mean(dim=0).cpu(), "embeddings")
    return F.normalize(z, dim=0) if normalize else z


def _embed_windows(model, path: str, preprocess: dict, *, window: float, stride: float | None,
                   normalize: bool) -> tuple[torch.Tensor, list[tuple[str, float, float]]]:
    from .timeline import window_outputs

    bounds, z, _, _ = window_outputs(model.encode_video, path, preprocess, num_frames=model.config.num_frames,
                                     window=window, stride=stride, device=model_device(model), model=model)
    check_finite(z, "embeddings")
    if normalize:
        z = F.normalize(z, dim=1)
    return z, [(path, round(a, 3), round(b, 3)) for a, b in bounds]


class _Store:
    """The output folder: finished rows (from a previous complete run and the partial files) and
    appending new ones, one file's rows at a time."""

    def __init__(self, out: Path):
        self.out = out
        self.partial = out / _PARTIAL
        self.blocks: list[torch.Tensor] = []
        self.rows: list[tuple[str, float | None, float | None]] = []
        self.dim: int | None = None
        self._started = False
        # The partial files, when there are any, start with every row known when they were begun.
        if not self._read_partial() and (out / "embeddings.safetensors").is_file() and (out / "index.csv").is_file():
            done = read_embeddings(out)
            self.blocks.append(done.embeddings)
            self.rows.extend(done.rows)
            self.dim = done.embeddings.shape[1]

    def _read_partial(self) -> bool:
        """Rows of a killed run: those of the files listed in ``files.txt`` (written after a
        file's embeddings and index rows), as far as both the index and the data hold them.
        False when there is no partial run."""
        index, data, files = (self.partial / n for n in ("index.csv", "embeddings.f32", "files.txt"))
        if not (index.is_file() and data.is_file() and files.is_file() and (self.partial / "meta.json").is_file()):
            return False
        finished = set(files.read_text().splitlines())
        rows = _read_index(index)
        dim = int(json.loads((self.partial / "meta.json").read_text())["dim"])
        values = np.fromfile(data, dtype=np.float32)
        n = min(len(rows), values.size // dim)
        keep = [i for i in range(n) if rows[i][0] in finished]
        if keep:
            self.blocks.append(torch.from_numpy(values[:n * dim].reshape(n, dim)[keep].copy()))
            self.rows.extend(rows[i] for i in keep)
            self.dim = dim
        return True

    @property
    def done(self) -> set[str]:
        return {v for v, *_ in self.rows}

    def _start_partial(self, dim: int) -> None:
        """Rewrite the partial files to hold exactly the rows known so far."""
        self.partial.mkdir(parents=True, exist_ok=True)
        (self.partial / "meta.json").write_text(json.dumps({"dim": dim}) + "\n")
        existing = torch.cat(self.blocks) if self.blocks else torch.empty(0, dim)
        existing.numpy().astype(np.float32).tofile(self.partial / "embeddings.f32")
        _write_index(self.partial / "index.csv", self.rows)
        (self.partial / "files.txt").write_text("".join(f"{v}\n" for v in dict.fromkeys(v for v, *_ in self.rows)))
        self.dim = dim

    def append(self, z: torch.Tensor, rows: list[tuple[str, float | None, float | None]]) -> None:
        if self.dim is not None and z.shape[1] != self.dim:
            raise ValueError(f"{self.out}: holds {self.dim}-dimensional embeddings but the model gives "
                             f"{z.shape[1]}: use another --out folder for another model")
        if not self._started:  # the partial files restart from the rows kept, whatever a killed run left
            self._start_partial(z.shape[1])
            self._started = True
        with open(self.partial / "embeddings.f32", "ab") as f:
            z.numpy().astype(np.float32).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        with open(self.partial / "index.csv", "a", newline="") as f:
            w = csv.writer(f)
            for r in rows:
                w.writerow([len(self.rows)] + _row_cells(r))
                self.rows.append(r)
        with open(self.partial / "files.txt", "a") as f:
            f.write(rows[0][0] + "\n")
        self.blocks.append(z)

    def finish(self, order: Sequence[str]) -> EmbeddingIndex:
        """Write ``embeddings.safetensors`` + ``index.csv`` (files in the order of ``order``, then
        any other files from earlier runs) and remove the partial files."""
        from safetensors.torch import save_file

        rank = {v: i for i, v in enumerate(order)}
        emb = torch.cat(self.blocks) if self.blocks else torch.empty(0, self.dim or 0)
        perm = sorted(range(len(self.rows)), key=lambda i: (rank.get(self.rows[i][0], len(rank)), i))
        emb, rows = emb[perm].contiguous(), [self.rows[i] for i in perm]
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "embeddings.safetensors") as tmp:
            save_file({"embeddings": emb}, str(tmp), metadata={"rows": str(len(rows))})
        with atomic_path(self.out / "index.csv") as tmp:
            _write_index(tmp, rows)
        shutil.rmtree(self.partial, ignore_errors=True)
        return EmbeddingIndex(emb, rows)


def _row_cells(r: tuple[str, float | None, float | None]) -> list:
    return [r[0], "" if r[1] is None else r[1], "" if r[2] is None else r[2]]


def _write_index(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(INDEX_FIELDS)
        for i, r in enumerate(rows):
            w.writerow([i] + _row_cells(r))


def _read_index(path: Path) -> list[tuple[str, float | None, float | None]]:
    with open(path, newline="") as f:
        return [(d["video"], float(d["start"]) if d["start"] else None, float(d["end"]) if d["end"] else None)
                for d in csv.DictReader(f) if None not in (d.get("video"), d.get("start"), d.get("end"))]


@torch.no_grad()
def embed_files(model, paths: Sequence[str | os.PathLike], preprocess: dict, *, out: str | os.PathLike | None = None,
                views: int | None = None, window: float | None = None, stride: float | None = None,
                normalize: bool = False, progress: Callable[[str], None] | None = None) -> EmbeddingIndex:
    """Embed video files (whole, or per window with ``window``/``stride`` seconds) with an
    inference-form model (``model.fuse()``, made here for a :class:`~dist_video.VideoClassifier`).

    ``out``: a folder to write (see the module docstring); files already in it are not
    recomputed. A file that cannot be read is reported in ``errors`` and the others are still
    embedded. ``progress``: called with each file's path once it is done (or failed)."""
    from ..classifier import VideoClassifier

    fused = model.fuse() if isinstance(model, VideoClassifier) else model
    paths = [os.fspath(p) for p in paths]
    store = _Store(Path(out)) if out is not None else None
    done = store.done if store is not None else set()
    blocks, all_rows, errors, computed = [], [], [], 0
    with closing(read_ahead(paths, _clip_reader(fused, preprocess, views, set(done) if window is None else None))
                 ) as reads:
        for path, clips in reads:
            if path in done:
                if progress:
                    progress(path)
                continue
            try:
                if window is None:
                    z, rows = _embed_clips(fused, clips.result(), normalize).unsqueeze(0), [(path, None, None)]
                else:
                    z, rows = _embed_windows(fused, path, preprocess, window=window, stride=stride,
                                             normalize=normalize)
            except FILE_ERRORS as e:
                logger.warning("%s: %s", path, error_message(e))
                errors.append({"video": path, "error": error_message(e)})
            else:
                if store is not None:
                    store.append(z, rows)
                else:
                    blocks.append(z)
                    all_rows.extend(rows)
                done.add(path)
                computed += 1
            if progress:
                progress(path)
    if store is not None:
        result = store.finish(paths)
        result.errors, result.computed = errors, computed
        return result
    emb = torch.cat(blocks) if blocks else torch.empty(0, 0)
    return EmbeddingIndex(emb, all_rows, errors, computed)


def _clip_reader(model, preprocess: dict, views: int | None, skip: set[str] | None
                 ) -> Callable[[str], TestClips | None]:
    """What :func:`embed_files` reads ahead for a file: its uint8 test clips, or nothing for the
    files in ``skip`` (already embedded) and for every file when ``skip`` is None (windows are
    decoded as they are embedded)."""
    pin = model_device(model).type == "cuda"

    def read(path: str) -> TestClips | None:
        if skip is None or path in skip:
            return None
        return read_test_clips(path, preprocess, num_frames=model.config.num_frames, views=views, pin=pin)

    return read


def read_embeddings(folder: str | os.PathLike) -> EmbeddingIndex:
    """An output folder of :func:`embed_files` (``embeddings.safetensors`` + ``index.csv``)."""
    folder = Path(folder)
    tensors = read_safetensors(folder / "embeddings.safetensors")
    if "embeddings" not in tensors:
        raise ValueError(f"{folder / 'embeddings.safetensors'}: no tensor named 'embeddings'")
    if not (folder / "index.csv").is_file():
        raise FileNotFoundError(f"{folder / 'index.csv'}: missing")
    rows = _read_index(folder / "index.csv")
    if len(rows) != tensors["embeddings"].shape[0]:
        raise ValueError(f"{folder}: index.csv has {len(rows)} rows but embeddings.safetensors "
                         f"{tensors['embeddings'].shape[0]}")
    return EmbeddingIndex(tensors["embeddings"].float(), rows)


def search_embeddings(index: EmbeddingIndex, query: torch.Tensor, topk: int = 10) -> list[dict]:
    """The ``topk`` rows most similar to ``query`` (E, e.g. a text embedding, on any device) by
    cosine similarity: ``[{"rank", "score", "video", "start", "end"}, ...]``, best first."""
    if index.embeddings.shape[0] == 0:
        return []
    if query.numel() != index.embeddings.shape[1]:
        raise ValueError(f"the query has {query.numel()} dimensions but the embeddings have "
                         f"{index.embeddings.shape[1]}: search with the model that embedded the videos")
    query = query.detach().to(index.embeddings.device, torch.float32).flatten()  # a model on a GPU gives a GPU query
    scores = F.normalize(index.embeddings.float(), dim=1) @ F.normalize(query, dim=0)
    s, idx = scores.topk(min(topk, scores.numel()))
    out = []
    for rank, (v, i) in enumerate(zip(s.tolist(), idx.tolist()), 1):
        video, start, end = index.rows[i]
        out.append({"rank": rank, "score": round(float(v), 6), "video": video, "start": start, "end": end})
    return out
