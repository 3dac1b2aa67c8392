"""Corpus-scale embedding and classification on a Ray cluster (Ray Data).

The job is one streaming pipeline::

    inputs (files, folders, path lists, WebDataset .tar shards)
      -> CPU tasks: decode + the model's test sampling and crops, uint8 clips (views x 3 x T x S x S)
      -> an actor pool (one per GPU, else ``actors`` CPU actors), each holding the fused model it
         loaded itself from the model path: batches of videos -> normalise -> embed / classify
      -> the driver writes Parquet shards ``part-*.parquet`` under the output folder, each atomically

Every input gives exactly one row (``id``, ``path``, ``embedding`` or ``logits`` + ``top``,
``error``): a video that cannot be read gets a row with its error. A rerun into the same folder
skips the ids already written, so a job killed at any point (driver, worker, actor) ends, once
rerun, with every input exactly once; readers still keep the first row of an id (:func:`read_corpus`).

``manifest.json`` records the model, its preprocessing, the counts and the software versions.
Ray Data and pyarrow come with the extra ``dist-video[ray]``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tarfile
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.annotations import VIDEO_EXTENSIONS
from .data.datasets import load_test_clips
from .data.sampling import build_sampler
from .data.transforms import TestTransform, normalize_clips
from .engine.inference import FILE_ERRORS, error_message
from .storage import atomic_path, write_text_atomic

__all__ = ["ModelSpec", "CorpusSummary", "MissingExtraError", "RAY_EXTRA_MESSAGE", "open_model", "list_inputs",
           "run_corpus", "read_corpus", "read_corpus_embeddings", "is_corpus_folder", "corpus_uint8_clips"]

logger = logging.getLogger(__name__)

RAY_EXTRA_MESSAGE = ("corpus jobs (--ray) and their Parquet output need Ray Data and pyarrow: install the extra "
                     "with pip install 'dist-video[ray]'")
SHARD_GLOB = "part-*.parquet"
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
TASKS = ("embed", "predict")
#: Memory Ray reserves for one decode task's worker (Python and torch take about half of it; the
#: rest holds the decoder, a file's sampled frames and its clips). Declaring it also keeps Ray Data
#: from fusing the decode tasks into CPU actors, so decoding runs beside the model, not before it.
DECODE_TASK_MEMORY = 512 * 2**20


class MissingExtraError(RuntimeError):
    """Ray Data or pyarrow is not installed (the message names the extra to install)."""


@dataclass(frozen=True)
class ModelSpec:
    """How to open the model, small enough to send to every actor (each loads the weights
    itself from ``path``; the weights never go through the object store)."""

    path: str
    clip: str | None = None
    classes: str | None = None
    labels: str | None = None
    prompt: str | None = None
    vocab: str | None = None
    clip_dtype: str = "auto"
    num_frames: int = 8
    trust_checkpoint: bool = False


@dataclass
class CorpusSummary:
    """What a run did: ``videos`` rows written now (``errors`` of them failed) in ``seconds``;
    ``skipped``: inputs already in the folder; ``total``: rows in the folder afterwards."""

    videos: int
    errors: int
    skipped: int
    total: int
    seconds: float

    @property
    def videos_per_second(self) -> float:
        return self.videos / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.videos} videos ({self.errors} errors) in {self.seconds:.1f} s: "
                f"{self.videos_per_second:.2f} videos/s; {self.skipped} already done, {self.total} rows in all")


def open_model(spec: ModelSpec, task: str, device: str = "auto") -> tuple[torch.nn.Module, dict]:
    """The one place a model is loaded (:func:`dist_video.load_model`): (its inference form,
    its test preprocessing). ``task="predict"`` requires a classifier head."""
    from .loading import load_model

    loaded = load_model(spec.path, clip=spec.clip, classes=spec.classes, labels=spec.labels, prompt=spec.prompt,
                        vocab=spec.vocab, device=device, clip_dtype=spec.clip_dtype,
                        trust_checkpoint=spec.trust_checkpoint, num_frames=spec.num_frames)
    if task == "predict":
        loaded.require_head()
    return loaded.take_inference_form(), loaded.preprocess


# ---------------------------------------------------------------------------------------- inputs
def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def _webdataset_key(member: str) -> str:
    """WebDataset's sample key: the member name up to the first dot of its base name."""
    folder, _, base = member.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def _tar_rows(shard: Path) -> list[dict]:
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile() and _is_video(m.name)]
    return [{"id": _webdataset_key(n), "path": f"{shard}#{n}", "shard": str(shard), "member": n} for n in names]


def _list_rows(listing: Path) -> list[dict]:
    """Rows of a path list: ``.txt``/``.lst`` one path a line (``#`` comments); ``.csv`` and
    ``.parquet`` a ``path`` column (else the first one) and an optional ``id`` column."""
    if listing.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(listing)
        cols = table.column_names
        paths = [str(p) for p in table.column("path" if "path" in cols else cols[0]).to_pylist()]
        ids = [str(i) for i in table.column("id").to_pylist()] if "id" in cols else paths
    elif listing.suffix == ".csv":
        with open(listing, newline="") as f:
            records = list(csv.DictReader(f))
        if not records:
            return []
        key = "path" if "path" in records[0] else next(iter(records[0]))
        paths = [r[key] for r in records]
        ids = [r.get("id") or r[key] for r in records]
    else:
        paths = [s.strip() for s in listing.read_text().splitlines()]
        paths = [p for p in paths if p and not p.startswith("#")]
        ids = paths
    return [{"id": i, "path": p, "shard": "", "member": ""} for i, p in zip(ids, paths)]


def list_inputs(sources: Sequence[str | os.PathLike]) -> list[dict]:
    """Rows ``{"id", "path", "shard", "member"}`` of every input, each id once (the first wins).

    A source is a folder (its video files, recursively, sorted), a WebDataset ``.tar`` shard
    (its video members; id: the sample key), a list of paths (``.txt``, ``.lst``, ``.csv``,
    ``.parquet``), or anything else: one video path or URI (id: the path as given; a missing
    file gets its error row when the job runs)."""
    rows: list[dict] = []
    for source in sources:
        s = os.fspath(source)
        p = Path(s)
        if p.is_dir():
            rows += [{"id": str(f), "path": str(f), "shard": "", "member": ""}
                     for f in sorted(p.rglob("*")) if f.is_file() and _is_video(f.name)]
        elif p.suffix == ".tar" and p.is_file():
            rows += _tar_rows(p)
        elif p.suffix in LIST_SUFFIXES and p.is_file():
            rows += _list_rows(p)
        else:
            rows.append({"id": s, "path": s, "shard": "", "member": ""})
    unique = {}
    for r in rows:
        unique.setdefault(r["id"], r)
    return list(unique.values())


# ---------------------------------------------------------------------------------- CPU decoding
class _GeometryTestTransform(TestTransform):
    """The test transform without its float step: ``(uint8 3 x T x S x S, label)``; the
    normalisation happens on the model's side, on the batch."""

    def __call__(self, clip, *, label: int = -1, generator=None, crop: int = 0):
        frames, _, label = self.geometry(clip, label=label, crop=crop)
        return frames, label


def corpus_uint8_clips(path: str, preprocess: dict, *, num_frames: int, views: int | None = None) -> torch.Tensor:
    """The test clips of a file as :func:`~dist_video.engine.data.test_clips_of_file` makes
    them, before normalisation: uint8 (views x crops) x 3 x T x S x S."""
    p = preprocess
    sampler = build_sampler(p["sampling"], num_frames, p.get("interval", 4))
    transform = _GeometryTestTransform(crop_size=p["crop_size"], short_side=p["test_scale"],
                                       num_crops=p["num_crops"], mean=tuple(p["mean"]), std=tuple(p["std"]))
    return load_test_clips(path, sampler=sampler, transform=transform, num_views=views or p["num_views"],
                           num_crops=p["num_crops"])


def _member_clips(row: dict, preprocess: dict, num_frames: int, views: int | None) -> torch.Tensor:
    """Clips of a WebDataset member: extracted to a temporary file, decoded, removed."""
    with tarfile.open(row["shard"]) as tar:
        source = tar.extractfile(row["member"])
        if source is None:
            raise ValueError(f"{row['member']} is not a regular file in the shard")
        suffix = Path(row["member"]).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(source.read())
            tmp.flush()
            return corpus_uint8_clips(tmp.name, preprocess, num_frames=num_frames, views=views)


def decode_row(row: dict, *, preprocess: dict, num_frames: int, views: int | None) -> dict:
    """One input row -> ``{"id", "path", "clips" (uint8 bytes, or empty), "error"}``."""
    try:
        if row["member"]:
            clips = _member_clips(row, preprocess, num_frames, views)
        else:
            clips = corpus_uint8_clips(row["path"], preprocess, num_frames=num_frames, views=views)
        data, error = clips.contiguous().numpy().tobytes(), ""
    except (*FILE_ERRORS, tarfile.TarError, KeyError) as e:
        logger.warning("%s: %s", row["path"], error_message(e))
        data, error = b"", error_message(e) if not isinstance(e, KeyError) else f"no member {e}"
    return {"id": row["id"], "path": row["path"], "clips": data, "error": error}


# ------------------------------------------------------------------------------ the model actor
class CorpusModel:
    """The Ray Data actor: loads the model from its path once (:func:`open_model`), then turns
    batches of decoded rows (pyarrow: ``id, path, clips, error``) into output rows.

    ``embed``: ``embedding`` E (the mean of ``encode_video`` over the file's clips, unit length
    with ``normalize``), in ``embedding_dtype``; ``predict``: ``logits`` C (mean over the
    clips) and ``top`` (``[{"class", "probability"}]``, the probabilities averaged over clips)."""

    def __init__(self, spec: ModelSpec, task: str, *, views: int | None = None, topk: int = 5,
                 normalize: bool = False, embedding_dtype: str = "float32", device: str = "auto"):
        from .engine.inference import class_names_of, model_device

        self.model, self.preprocess = open_model(spec, task, device)
        self.task, self.topk, self.normalize = task, topk, normalize
        self.device = model_device(self.model)
        p = self.preprocess
        self.clip_shape = (3, self.model.config.num_frames, p["crop_size"], p["crop_size"])
        self.names = class_names_of(self.model) if task == "predict" else []
        self.width = self._forward(torch.zeros(1, *self.clip_shape, dtype=torch.uint8)).shape[1]
        self.schema = _output_schema(task, self.width, embedding_dtype)

    @torch.no_grad()
    def _forward(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x T x S x S -> float32 N x E (embed) or N x C logits (predict), on the CPU."""
        p = self.preprocess
        x = normalize_clips(clips.to(self.device), p["mean"], p["std"])
        out = self.model.encode_video(x) if self.task == "embed" else self.model(x)
        return out.float().cpu()

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        good = [r for r in rows if not r["error"]]
        outputs: dict[str, dict] = {}
        if good:
            arrays = [np.frombuffer(r["clips"], dtype=np.uint8).reshape(-1, *self.clip_shape) for r in good]
            per_clip = self._forward(torch.from_numpy(np.concatenate(arrays)))
            for r, out in zip(good, torch.split(per_clip, [a.shape[0] for a in arrays])):
                outputs[r["id"]] = self._row(out)
        empty = {"embedding": None} if self.task == "embed" else {"logits": None, "top": None}
        table = [{"id": r["id"], "path": r["path"], **outputs.get(r["id"], empty), "error": r["error"] or None}
                 for r in rows]
        return pa.Table.from_pylist(table, schema=self.schema)

    def _row(self, out: torch.Tensor) -> dict:
        """One file's clip outputs (clips x E or clips x C) -> its output columns."""
        if self.task == "embed":
            z = out.mean(dim=0)
            z = torch.nn.functional.normalize(z, dim=0) if self.normalize else z
            return {"embedding": z.tolist()}
        probs = out.softmax(dim=1).mean(dim=0)
        p, idx = probs.topk(min(self.topk, probs.numel()))
        return {"logits": out.mean(dim=0).tolist(),
                "top": [{"class": self.names[i], "probability": float(v)} for v, i in zip(p.tolist(), idx.tolist())]}


def _output_schema(task: str, width: int, embedding_dtype: str = "float32"):
    import pyarrow as pa

    if embedding_dtype not in ("float32", "float16"):
        raise ValueError(f"embedding dtype must be float32 or float16, got {embedding_dtype}")
    if task == "embed":
        value = pa.float16() if embedding_dtype == "float16" else pa.float32()
        outputs = [pa.field("embedding", pa.list_(value, width))]
    else:
        top = pa.list_(pa.struct([pa.field("class", pa.string()), pa.field("probability", pa.float64())]))
        outputs = [pa.field("logits", pa.list_(pa.float32(), width)), pa.field("top", top)]
    return pa.schema([pa.field("id", pa.string()), pa.field("path", pa.string()), *outputs,
                      pa.field("error", pa.string())])


# ------------------------------------------------------------------------------------ the job
@dataclass
class _Options:
    task: str = "embed"
    actors: int | None = None
    batch_size: int = 8
    views: int | None = None
    normalize: bool = False
    embedding_dtype: str = "float32"
    topk: int = 5
    shard_rows: int = 256
    rows_per_task: int = 4


def _import_ray():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"{RAY_EXTRA_MESSAGE} ({e})") from None
    return ray


def _import_parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingExtraError(f"{RAY_EXTRA_MESSAGE} ({e})") from None
    return pa, pq


def _connect(ray, address: str | None, num_cpus: int | None) -> bool:
    """Connect to Ray: keep a connection this process already has, start a local instance with
    the loopback node address 127.0.0.1 (``None``/``"local"``), or join the cluster at ``address``.
    True when this call connected (and so the job disconnects at the end)."""
    if ray.is_initialized():
        return False
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def _actor_resources(ray, actors: int | None) -> dict:
    """One actor per GPU (``num_gpus=1``) when the cluster has GPUs, else ``actors`` CPU actors
    (default 1) of one CPU each."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return {"compute": ray.data.ActorPoolStrategy(size=actors or gpus), "num_gpus": 1}
    return {"compute": ray.data.ActorPoolStrategy(size=actors or 1), "num_cpus": 1}


def _pipeline(ray, rows: list[dict], spec: ModelSpec, preprocess: dict, num_frames: int, opts: _Options):
    """The Ray Data dataset of output rows for ``rows`` (not yet executed)."""
    blocks = max(1, math.ceil(len(rows) / max(1, opts.rows_per_task)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    decoded = ds.map(decode_row, fn_kwargs={"preprocess": preprocess, "num_frames": num_frames,
                                            "views": opts.views}, num_cpus=1, memory=DECODE_TASK_MEMORY)
    return decoded.map_batches(CorpusModel, batch_size=opts.batch_size, batch_format="pyarrow",
                               fn_constructor_kwargs={"spec": spec, "task": opts.task, "views": opts.views,
                                                      "topk": opts.topk, "normalize": opts.normalize,
                                                      "embedding_dtype": opts.embedding_dtype},
                               **_actor_resources(ray, opts.actors))


def _write_shards(results, out: Path, shard_rows: int) -> tuple[int, int]:
    """Stream the output rows into Parquet shards of ``shard_rows`` rows, each written
    atomically; (rows written, error rows)."""
    import pyarrow.parquet as pq

    run = uuid.uuid4().hex[:12]
    videos = errors = 0
    for k, table in enumerate(results.iter_batches(batch_size=shard_rows, batch_format="pyarrow")):
        with atomic_path(out / f"part-{run}-{k:06d}.parquet") as tmp:
            pq.write_table(table, tmp)
        videos += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        logger.info("wrote %d rows (%d so far)", table.num_rows, videos)
    return videos, errors


def _software_versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("dist-video", "torch", "ray", "pyarrow", "av", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _check_folder(out: Path, spec: ModelSpec, task: str) -> None:
    """Refuse to mix the rows of another model or task into ``out``."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return
    before = json.loads(manifest.read_text())
    if before.get("task") != task or before.get("model", {}).get("path") != spec.path:
        raise ValueError(f"{out}: holds the {before.get('task')} output of {before.get('model', {}).get('path')}: "
                         f"use another --out folder for the {task} output of {spec.path}")


def _write_manifest(out: Path, spec: ModelSpec, preprocess: dict, opts: _Options, inputs: int) -> dict:
    table = read_corpus(out, columns=["error"])
    errors = table.num_rows - table.column("error").null_count if table.num_rows else 0
    manifest = {"format": "dist-video-corpus", "task": opts.task, "model": asdict(spec),
                "preprocess": preprocess, "views": opts.views, "normalize": opts.normalize,
                "embedding_dtype": opts.embedding_dtype, "topk": opts.topk,
                "counts": {"inputs": inputs, "rows": table.num_rows, "errors": errors,
                           "shards": len(list(out.glob(SHARD_GLOB)))},
                "software": _software_versions()}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def run_corpus(model: str | ModelSpec, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
               task: str = "embed", ray_address: str | None = "local", num_cpus: int | None = None,
               actors: int | None = None, batch_size: int = 8, views: int | None = None, normalize: bool = False,
               embedding_dtype: str = "float32", topk: int = 5, shard_rows: int = 256, rows_per_task: int = 4,
               progress: bool = True) -> CorpusSummary:
    """Embed (``task="embed"``) or classify (``"predict"``) every input on Ray, writing Parquet
    shards and ``manifest.json`` under ``out`` (see the module docstring); inputs already in
    ``out`` are skipped. ``model``: a model path (or a :class:`ModelSpec` with load options).

    ``ray_address``: ``"local"``/None starts Ray on this machine (``num_cpus`` logical CPUs,
    node address 127.0.0.1) and stops it at the end; an address joins that cluster; a process
    already connected to Ray uses that connection. ``actors``: model actors (default: one per
    GPU, else 1). ``batch_size``: videos per model call; ``shard_rows``: rows per shard (a
    killed job recomputes at most the shards it had not written)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    spec = model if isinstance(model, ModelSpec) else ModelSpec(os.fspath(model))
    opts = _Options(task=task, actors=actors, batch_size=batch_size, views=views, normalize=normalize,
                    embedding_dtype=embedding_dtype, topk=topk, shard_rows=shard_rows, rows_per_task=rows_per_task)
    ray = _import_ray()
    out = Path(out)
    _check_folder(out, spec, task)
    out.mkdir(parents=True, exist_ok=True)
    rows = list_inputs(inputs)
    done = set(read_corpus(out, columns=["id"]).column("id").to_pylist())
    todo = [r for r in rows if r["id"] not in done]
    probe, preprocess = open_model(spec, task, device="cpu")  # the driver needs the preprocessing only
    num_frames = probe.config.num_frames
    del probe
    t0 = time.perf_counter()
    videos = errors = 0
    if todo:
        started = _connect(ray, ray_address, num_cpus)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = progress
            videos, errors = _write_shards(_pipeline(ray, todo, spec, preprocess, num_frames, opts), out,
                                           shard_rows)
        finally:
            if started:
                ray.shutdown()
    seconds = time.perf_counter() - t0
    manifest = _write_manifest(out, spec, preprocess, opts, len(rows))
    summary = CorpusSummary(videos, errors, len(rows) - len(todo), manifest["counts"]["rows"], seconds)
    logger.info("%s", summary.line())
    return summary


# ------------------------------------------------------------------------------------ reading
def is_corpus_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds the output of :func:`run_corpus` (Parquet shards)."""
    return Path(folder).is_dir() and any(Path(folder).glob(SHARD_GLOB))


def read_corpus(folder: str | os.PathLike, columns: Sequence[str] | None = None):
    """Every row of a :func:`run_corpus` folder as one pyarrow Table, each id once (the first
    row written wins; a duplicate can only come from outside the job, e.g. shards copied in).
    ``columns``: only these (``id`` is always read), e.g. ``["id", "error"]`` to count a large folder."""
    pa, pq = _import_parquet()
    shards = sorted(Path(folder).glob(SHARD_GLOB))
    if not shards:
        return pa.table({"id": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    wanted = None if columns is None else list(dict.fromkeys(["id", *columns]))
    table = pa.concat_tables([pq.read_table(s, columns=wanted) for s in shards], promote_options="default")
    ids = table.column("id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    return table if len(first) == table.num_rows else table.take(np.sort(first))


def read_corpus_embeddings(folder: str | os.PathLike):
    """The embeddings of a :func:`run_corpus` ``embed`` folder as an
    :class:`~dist_video.engine.embed.EmbeddingIndex` (rows that failed are left out), for
    :func:`~dist_video.engine.embed.search_embeddings`."""
    from .engine.embed import EmbeddingIndex

    table = read_corpus(folder)
    if "embedding" not in table.column_names:
        raise ValueError(f"{folder}: holds no embeddings (a predict output?)")
    table = table.filter(table.column("error").is_null())
    width = table.schema.field("embedding").type.list_size
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(-1, width))
    return EmbeddingIndex(emb, [(p, None, None) for p in table.column("path").to_pylist()])
