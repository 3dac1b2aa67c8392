"""The ``dist-video`` command line: train, evaluate, predict, embed, search, info, convert, export, serve,
watch, prepare, scan, kinetics710, make-synthetic, demo.

Each command is one entry of :data:`COMMANDS` (its help, its arguments, its run function); the
argument groups several commands share (the model source, device and precision, output) are
declared once. A command's expected failures (bad input, a missing file) print one line
``dist-video COMMAND: error: ...`` and exit 2 (1 for files that failed within a batch, and for
a model whose outputs are not finite); anything else is a bug: one line ``internal error``
and exit 1, or the traceback with ``--debug``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

__all__ = ["main", "build_parser", "Command", "COMMANDS"]

MODEL_HELP = "a dist-video model folder, an exported ONNX folder, an authors' .pyth checkpoint or CLIP weights"
CLASSES_HELP = ("class names: a file (one per line) or kinetics400 / kinetics600 / kinetics700 / kinetics710 / ssv2; "
                "a .pyth checkpoint's text head, or the classes a head that knows more is restricted to")


# ---------------------------------------------------------------------------- shared argument groups

def _config_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", help="a shipped preset, e.g. k400-vit-b16-8+16f (see `dist-video info --presets`)")
    g.add_argument("--config", help="a YAML config file (may name a `base` preset)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    g.add_argument("--output", help="output folder (same as --set output_dir=...)")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no progress messages (only warnings "
                   "and errors on standard error)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _model_source_arguments(p: argparse.ArgumentParser, *, classes: bool = False, labels: str | None = None,
                            prompt: bool = True, vocab: bool = True, frames: bool = False,
                            prompt_default: str | None = None) -> None:
    """``--clip`` and ``--trust-checkpoint`` (every command that loads a model), and what the
    command takes of: ``--classes``, ``--labels`` (``"names"``; ``"dataset"``: the value is
    optional, meaning the dataset's class names), ``--prompt``, ``--vocab``, ``--frames``."""
    g = p.add_argument_group("model source")
    g.add_argument("--clip", help="CLIP weights (for an authors' .pyth checkpoint without them, or with a preset)")
    g.add_argument("--trust-checkpoint", action="store_true", help="load a checkpoint that holds more than tensors "
                   "(unpickling can run code: only for files you made yourself)")
    if classes:
        g.add_argument("--classes", help=CLASSES_HELP)
    if labels == "names":
        g.add_argument("--labels", metavar="NAMES", help="zero-shot: classify into these label names instead (a "
                       "comma-separated list or a file with one per line); needs a class-text head or CLIP weights")
    elif labels == "dataset":
        g.add_argument("--labels", nargs="?", const="", default=None, metavar="NAMES", help="zero-shot: score the "
                       "dataset's classes by the text of their names (or of NAMES: a file or a comma-separated "
                       "list, one per dataset class), replacing the model's head")
    if prompt:
        g.add_argument("--prompt", default=prompt_default, help="a template such as 'a video of {}.' (text without "
                       "{} is a prefix; default with --labels: CLIP's Kinetics prompt ensemble; with --classes: "
                       "the bare names; for a search query: the query as it is)")
    if vocab:
        g.add_argument("--vocab", help="BPE vocabulary for the text tower (default: the model's, else the one "
                       "shipped)")
    else:
        g.add_argument("--vocab", help=argparse.SUPPRESS)
    if frames:
        g.add_argument("--frames", type=_positive_int, default=8, help="frames per clip for plain CLIP weights "
                       "(default 8)")


def _device_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if there is one)")
    g.add_argument("--clip-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="frozen CLIP precision (auto: bf16 where the device has it natively, fp16 on older GPUs, "
                   "else fp32; an exported folder is float32)")


def _compile_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="wrap the inference form in torch.compile; the first "
                   "batch per shape compiles")


def _window_arguments(p: argparse.ArgumentParser, window_help: str) -> None:
    p.add_argument("--window", type=float, help=window_help)
    p.add_argument("--stride", type=float, help="seconds between window starts (default: the window)")


def _ray_arguments(p: argparse.ArgumentParser, *, out: bool) -> None:
    g = p.add_argument_group("corpus on a Ray cluster (needs dist-video[ray]; docs/corpus.md)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help="run as a Ray Data job: "
                   "on the cluster at ADDRESS, or 'local' (the default value) on this machine; inputs may also be "
                   "folders, path lists (.txt, .csv, .parquet) and WebDataset .tar shards; writes Parquet shards "
                   "and manifest.json under --out, and a rerun skips the inputs already there")
    g.add_argument("--actors", type=_positive_int, default=None, help="with --ray: model actors (default: one per "
                   "GPU, else 1)")
    if out:
        g.add_argument("--out", metavar="DIR", help="with --ray: the output folder")


def _run_corpus(args, task: str) -> int:
    """``--ray``: the command as a corpus job (:func:`dist_video.corpus.run_corpus`)."""
    from .corpus import ModelSpec, run_corpus

    if getattr(args, "window", None) is not None or not args.out:
        raise ValueError("--ray takes whole files (no --window) and needs --out DIR")
    spec = ModelSpec(args.model, clip=args.clip, classes=getattr(args, "classes", None),
                     labels=getattr(args, "labels", None), prompt=getattr(args, "prompt", None), vocab=args.vocab,
                     clip_dtype=args.clip_dtype, num_frames=args.frames, trust_checkpoint=args.trust_checkpoint)
    summary = run_corpus(spec, args.videos, args.out, task=task, ray_address=args.ray, actors=args.actors,
                         views=args.views, normalize=getattr(args, "normalize", False),
                         topk=getattr(args, "topk", 5), progress=args.progress)
    print(f"dist-video {task}: {summary.line()}; output: {args.out}", file=sys.stderr)
    return 1 if summary.errors else 0


def _dataset_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--format", default=None, help="annotation format of an annotation-file argument: csv, kinetics, "
                   "ssv2, ucf101, hmdb51 (a folder with one sub-folder per class needs none)")
    g.add_argument("--root", help="the videos' folder (kinetics, ssv2, ucf101, hmdb51; base of csv paths)")
    g.add_argument("--classes", help="class list file (ssv2: the labels JSON)")
    g.add_argument("--split", default="train", help="ucf101/hmdb51: train or test (default train)")
    g.add_argument("--fold", type=int, default=1, help="ucf101/hmdb51 official split 1, 2 or 3")
    g.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")


# ---------------------------------------------------------------------------- helpers

def _configure_logging(quiet: bool) -> None:
    """The library's messages (``dist_video.*`` loggers) go to standard error as plain lines:
    progress at INFO, or only warnings with ``--quiet``. Other libraries' loggers: warnings."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("dist_video").setLevel(logging.WARNING if quiet else logging.INFO)


def _prepare_device(name: str, keep_freed: bool = True) -> None:
    """Process-wide settings for the device this process runs on. On a CPU, have glibc keep
    freed memory for reuse (unless ``keep_freed`` is False): the large activations of every
    step then reuse memory instead of page-faulting fresh pages
    (:mod:`dist_video.engine.allocator`). Long-video runs (``--window``) leave malloc alone:
    there a decoding thread and the model's thread allocate side by side, and with freed memory
    kept the heap's fragments made the peak memory of a long video vary from run to run
    (benchmarks/README.md#long-videos). On a GPU, let cuDNN pick its fastest convolution
    algorithms for the run's fixed shapes, and let float32 matrix products use TF32 tensor
    cores (:func:`~dist_video.engine.distributed.use_fast_gpu_kernels`)."""
    from .engine.allocator import keep_freed_memory
    from .engine.distributed import local_world_size, resolve_device, use_fast_gpu_kernels

    device = resolve_device(name, int(os.environ.get("LOCAL_RANK", "0")), local_world_size())
    if device.type == "cpu" and keep_freed:
        keep_freed_memory()
    use_fast_gpu_kernels(device)


def _load_cfg(args):
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"output_dir={args.output}")
    return load_config(args.preset, args.config, overrides)


def _load(args, path=None, **settings):
    """:func:`dist_video.load_model` on the command's model source arguments (``settings`` replace them)."""
    from .loading import load_model

    options = {"clip": args.clip, "trust_checkpoint": args.trust_checkpoint}
    for name, default in (("classes", None), ("labels", None), ("prompt", None), ("vocab", None),
                          ("device", "auto"), ("clip_dtype", "auto")):
        options[name] = getattr(args, name, default)
    options["num_frames"] = getattr(args, "frames", 8)
    options.update(settings)
    return load_model(path if path is not None else args.model, **options)


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _print_json(value) -> None:
    print(json.dumps(_finite(value), indent=2, allow_nan=False, default=str))


def _bar(total: int, unit: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def _workers(args) -> int:
    return args.workers or max(1, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------- train, evaluate

def _train_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint "
                   "(default: output_dir/checkpoints/last.pt when it exists)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    _output_arguments(p)


def cmd_train(args) -> int:
    from .engine.train import train

    cfg = _load_cfg(args)
    _prepare_device(cfg.train.device)
    resume = False if args.no_resume else (args.resume or True)
    result = train(cfg, resume=resume, progress=args.progress)
    if result.status == "interrupted":
        return 130
    if result.metrics and (os.environ.get("RANK", "0") == "0"):
        print(json.dumps(_finite({k: result.metrics[k] for k in ("top1", "top5", "mean_class_accuracy",
                                                                  "num_videos")})))
        print(f"model saved to {result.output_dir / 'model'}", file=sys.stderr)
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    _config_arguments(p)
    _model_source_arguments(p, classes=True, labels="dataset")
    _compile_argument(p)
    _output_arguments(p)


def cmd_evaluate(args) -> int:
    from .engine.run import evaluate_model

    cfg = _load_cfg(args)
    _prepare_device(cfg.train.device)
    metrics = evaluate_model(args.model, cfg, clip=args.clip, classes=args.classes, output=args.output,
                             progress=args.progress, labels=args.labels, prompt=args.prompt, vocab=args.vocab,
                             trust_checkpoint=args.trust_checkpoint, compile=args.compile)
    if metrics is not None:
        print(json.dumps(_finite({k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy", "num_videos")})))
    return 0


# ---------------------------------------------------------------------------- predict

def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--topk", type=_positive_int, default=5)
    p.add_argument("--views", type=_positive_int, default=None, help="temporal views to average (default: the "
                   "model's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _model_source_arguments(p, classes=True, labels="names", frames=True)
    _window_arguments(p, "long videos: classify windows of this many seconds (a timeline)")
    p.add_argument("--csv", metavar="FILE", help="with --window: one row per window")
    p.add_argument("--timeline", metavar="FILE.png", help="with --window: plot the top classes over time")
    p.add_argument("--annotate", metavar="OUT.mp4", help="with --window: the video re-encoded (H.264) with the "
                   "current top label drawn on every frame")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass (default 8)")
    _device_arguments(p)
    _compile_argument(p)
    _ray_arguments(p, out=True)


def cmd_predict(args) -> int:
    if args.ray is not None:
        return _run_corpus(args, "predict")
    loaded = _load_for_videos(args).require_head()
    if args.window is None:
        results = loaded.predict(args.videos, topk=args.topk, views=args.views)
    else:
        results = _predict_timelines(args, loaded)
    if args.json:
        _print_json(results)
    for r in results:
        if "error" in r:
            print(f"dist-video predict: error: {r['video']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            _print_result(r)
    return 1 if any("error" in r for r in results) else 0


def _print_result(r: dict) -> None:
    print(r["video"])
    if "windows" in r:
        for w in r["windows"]:
            top = "   ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in w["top"][:3])
            print(f"  {w['start']:9.2f}-{w['end']:<9.2f}s  {top}")
        return
    for rank, item in enumerate(r["top"], 1):
        print(f"  {rank}. {item['class']:<40s} {100 * item['probability']:6.2f}%")


def _whole_number(low: int):
    """An argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _load_for_videos(args, keep_freed: bool | None = None):
    """The model of a command that reads video files or streams (predict, embed, watch): the
    long-video options checked, the device prepared (glibc keeps freed memory unless ``--window``
    or ``keep_freed=False``), the model loaded and, with ``--compile``, compiled."""
    _check_window_arguments(args)
    _prepare_device(args.device, keep_freed=args.window is None if keep_freed is None else keep_freed)
    loaded = _load(args)
    if getattr(args, "compile", False):
        loaded.compile()
    return loaded


def _check_window_arguments(args) -> None:
    """Usage errors of the long-video options (exit status 2, before any work). The number of
    windows a video gets is bounded where it is known, per video
    (:func:`dist_video.engine.timeline.window_bounds`: a one-line error for that file)."""
    for flag in ("window", "stride"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{flag} must be a finite positive number of seconds, got {value}")
    if args.window is None:
        for flag in ("stride", "csv", "timeline", "annotate"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag} needs --window SECONDS")
    elif len(getattr(args, "videos", ())) > 1 and (getattr(args, "timeline", None) or getattr(args, "annotate", None)):
        raise ValueError("--timeline and --annotate take one video at a time")


def _predict_timelines(args, loaded) -> list[dict]:
    """``predict --window``: a timeline per video, then the CSV / plot / annotated video asked for."""
    from .engine.inference import FILE_ERRORS, error_message
    from .engine.timeline import annotate_video, plot_timeline, write_timeline_csv

    results, timelines = [], []
    for path in args.videos:
        try:
            timeline = loaded.timeline(path, window=args.window, stride=args.stride, batch_size=args.batch_size)
        except FILE_ERRORS as e:
            results.append({"video": path, "error": error_message(e)})
            continue
        timelines.append(timeline)
        results.append(timeline.to_dict(args.topk))
    if args.csv:
        print(f"wrote {write_timeline_csv(timelines, args.csv, args.topk)}", file=sys.stderr)
    if args.timeline and timelines:
        print(f"wrote {plot_timeline(timelines[0], args.timeline)}", file=sys.stderr)
    if args.annotate and timelines:
        print(f"wrote {annotate_video(timelines[0], args.annotate)}", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------- embed, search

def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a re-run embeds only the files "
                   "not in it yet)")
    p.add_argument("--normalize", action="store_true", help="unit-length embeddings")
    p.add_argument("--views", type=_positive_int, default=None, help="temporal views to average (default: the "
                   "model's)")
    _window_arguments(p, "one embedding per window of this many seconds")
    _model_source_arguments(p, prompt=False, vocab=False, frames=True)
    _device_arguments(p)
    _compile_argument(p)
    _output_arguments(p)
    _ray_arguments(p, out=False)


def cmd_embed(args) -> int:
    if args.ray is not None:
        return _run_corpus(args, "embed")
    loaded = _load_for_videos(args)
    with _bar(len(args.videos), "video", args.progress) as bar:
        result = loaded.embed(args.videos, out=args.out, views=args.views, window=args.window, stride=args.stride,
                              normalize=args.normalize, progress=lambda path: bar.update(1))
    for e in result.errors:
        print(f"dist-video embed: error: {e['video']}: {e['error']}", file=sys.stderr)
    print(f"wrote {result.embeddings.shape[0]} embeddings of {result.embeddings.shape[1]} dimensions to "
          f"{os.path.join(args.out, 'embeddings.safetensors')} (rows: index.csv); {result.computed} file(s) "
          "embedded now, the others in earlier runs", file=sys.stderr)
    return 1 if result.errors else 0


def _search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR", help="a folder written by `dist-video embed` (with or without --ray)")
    p.add_argument("query", help="a text, e.g. 'a person juggling'")
    p.add_argument("--model", required=True, help="the model that embedded the videos (it needs a text tower)")
    p.add_argument("--topk", type=_positive_int, default=10)
    _model_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_search(args) -> int:
    from .corpus import is_corpus_folder, read_corpus_embeddings
    from .engine.embed import read_embeddings, search_embeddings

    index = read_corpus_embeddings(args.folder) if is_corpus_folder(args.folder) else read_embeddings(args.folder)
    loaded = _load(args, prompt=None, device="cpu", clip_dtype="fp32")
    hits = search_embeddings(index, loaded.text_embedding(args.query, prompt=args.prompt), topk=args.topk)
    if args.json:
        _print_json(hits)
        return 0
    for h in hits:
        where = "" if h["start"] is None else f"  {h['start']:.2f}-{h['end']:.2f} s"
        print(f"{h['rank']:3d}. {h['score']:.4f}  {h['video']}{where}")
    return 0


# ---------------------------------------------------------------------------- info, convert, export

def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model (folder, exported folder, .pyth or CLIP weights), or nothing "
                   "(use --preset)")
    _config_arguments(p)
    _model_source_arguments(p, prompt=False, vocab=False)
    p.add_argument("--arch", default=None, help="CLIP architecture for a preset without weights: ViT-B/16, ViT-L/14")
    p.add_argument("--size", type=int, default=None, help="input resolution (default: CLIP's)")
    p.add_argument("--presets", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true")


def cmd_info(args) -> int:
    from .engine.info import describe

    if args.presets:
        from .config import list_presets
        from .dist import PRESETS
        print("config presets:  " + ", ".join(list_presets()))
        print("DiST presets:    " + ", ".join(PRESETS))
        return 0
    cfg = _load_cfg(args) if (args.preset or args.config or args.overrides) else None
    print(describe(args.model, cfg, clip=args.clip, arch=args.arch, size=args.size, as_json=args.json,
                   trust_checkpoint=args.trust_checkpoint))
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("output")
    _model_source_arguments(p, classes=True, prompt_default="")
    p.add_argument("--selected-layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="CLIP blocks the branch reads, if not all (comma-separated)")
    p.add_argument("--copy-clip", action="store_true", help="store the CLIP weights in the folder "
                   "(default: copied, since the .pyth holds them; with --clip, referenced by path)")


def cmd_convert(args) -> int:
    from .loading import convert_official

    out = convert_official(args.checkpoint, args.output, clip=args.clip, classes=args.classes, vocab=args.vocab,
                           prompt=args.prompt, selected_layers=args.selected_layers, copy_clip=args.copy_clip,
                           trust_checkpoint=args.trust_checkpoint)
    print(f"wrote {out}")
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a dist-video model folder, an authors' .pyth checkpoint (with --classes) or CLIP "
                   "weights (with --labels)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |onnxruntime - PyTorch| accepted")
    _model_source_arguments(p, classes=True, labels="names", frames=True)


def cmd_export(args) -> int:
    from .export import export_onnx

    report = export_onnx(args.model, args.out_dir, opset=args.opset, clip=args.clip, classes=args.classes,
                         labels=args.labels, vocab=args.vocab, prompt=args.prompt, tolerance=args.tolerance,
                         num_frames=args.frames, trust_checkpoint=args.trust_checkpoint)
    print(report.summary())
    print(f"wrote {report.out_dir} (model.onnx, preprocess.json, labels.txt; opset {report.opset})")
    return 0


# ---------------------------------------------------------------------------- serve

def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder, an exported ONNX folder or an authors' .pyth (with --classes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or set DIST_VIDEO_TOKEN)")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload accepted (413 above)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (504 above)")
    p.add_argument("--max-concurrent", type=int, default=2, help="requests decoding/predicting at once")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond those (503 above)")
    p.add_argument("--max-batch", type=int, default=16, help="clips per forward pass, across requests")
    p.add_argument("--max-labels", type=int, default=1000, help="label names a request may send (text-head models)")
    p.add_argument("--upload-timeout", type=float, default=60.0, help="seconds for a request's body to arrive (408)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive")
    p.add_argument("--max-windows", type=int, default=10_000, help="windows of a timeline request (400 above)")
    p.add_argument("--max-frame-pixels", type=int, default=3840 * 2160,
                   help="width x height of an upload's frames (400 above; default 4K)")
    p.add_argument("--max-frames", type=int, default=512, help="frames decoded per request: views x frames per clip")
    p.add_argument("--max-decoded-mb", type=float, default=1024.0,
                   help="MiB of decoded RGB frames a request may hold at once (400 above)")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated host names the Host/Origin headers may carry besides the bound address "
                        "(a reverse proxy's public name; '*': any)")
    _model_source_arguments(p, classes=True, labels="names", frames=True)
    _device_arguments(p)
    _compile_argument(p)
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")


def cmd_serve(args) -> int:
    from .serve import ServeSettings, run_server

    token = args.token if args.token is not None else (os.environ.get("DIST_VIDEO_TOKEN") or None)
    settings = ServeSettings(token=token, max_upload_bytes=int(args.max_upload_mb * 2 ** 20), timeout=args.timeout,
                             max_concurrent=args.max_concurrent, max_queue=args.max_queue, max_batch=args.max_batch,
                             max_labels=args.max_labels, upload_timeout=args.upload_timeout,
                             header_timeout=args.header_timeout, max_windows=args.max_windows,
                             max_frame_pixels=args.max_frame_pixels, max_frames=args.max_frames,
                             max_decoded_bytes=int(args.max_decoded_mb * 2 ** 20),
                             allowed_hosts=tuple(h for h in (args.allowed_hosts or "").split(",") if h.strip()))
    run_server(args.model, host=args.host, port=args.port, settings=settings, clip=args.clip, classes=args.classes,
               labels=args.labels, vocab=args.vocab, prompt=args.prompt, device=args.device, clip_dtype=args.clip_dtype,
               num_frames=args.frames, log_level="warning" if args.quiet else "info",
               trust_checkpoint=args.trust_checkpoint, compile=args.compile)
    return 0


# ---------------------------------------------------------------------------- watch

def _watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("source", help="/dev/videoN, an rtsp:// rtmp:// http(s):// udp:// srt:// tcp:// URL, - (standard "
                   "input), or a file")
    p.add_argument("--window", type=float, default=4.0, help="seconds per window (default 4)")
    p.add_argument("--stride", type=float, default=1.0, help="seconds between window starts (default 1)")
    p.add_argument("--topk", type=_positive_int, default=5)
    _model_source_arguments(p, classes=True, labels="names", frames=True)
    _device_arguments(p)
    p.add_argument("--realtime", action="store_true", help="play a file at its real speed (a live source always "
                   "is): a window the model cannot keep up with is skipped")
    p.add_argument("--reconnect", type=_non_negative_int, default=0, metavar="N",
                   help="reopen a live source that drops up to N times (default 0)")
    p.add_argument("--csv", action="store_true", help="CSV rows with a header instead of JSON lines")
    p.add_argument("--annotate", metavar="OUT.mp4", help="also write the stream with the running top label drawn")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the source to open or for its "
                   "next data (default 10)")


def cmd_watch(args) -> int:
    from .live import run_watch

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a finite positive number of seconds, got {args.timeout}")
    loaded = _load_for_videos(args, keep_freed=False).require_head()
    return run_watch(model=loaded.inference(), source=args.source, preprocess=loaded.preprocess, window=args.window,
                     stride=args.stride, topk=args.topk, realtime=args.realtime, reconnect=args.reconnect,
                     csv=args.csv, annotate=args.annotate, timeout=args.timeout)


# ---------------------------------------------------------------------------- datasets

def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a folder of videos, or an annotation file (with --format/--root)")
    p.add_argument("dst", metavar="DST", help="output folder (re-running skips the videos already done)")
    p.add_argument("--short-side", type=int, default=320, help="short side in pixels, never enlarged (default 320)")
    p.add_argument("--gop", type=int, default=16, help="frames between keyframes (default 16)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality, lower is better (default 23)")
    p.add_argument("--preset", default="veryfast", help="x264 speed preset (default veryfast)")
    p.add_argument("--tune", default="fastdecode",
                   help="x264 tuning, comma-separated, or none (default fastdecode: cheaper decoding, "
                        "slightly larger files)")
    _dataset_arguments(p)
    _output_arguments(p)


def cmd_prepare(args) -> int:
    import time

    from .data.prepare import check_tune, plan_prepare, prepare_with_report, report_summary

    started = time.perf_counter()
    tune = None if args.tune == "none" else args.tune
    check_tune(tune)
    jobs, ann = plan_prepare(args.src, args.dst, fmt=args.format, root=args.root, classes=args.classes,
                             split=args.split, fold=args.fold)
    with _bar(len(jobs), "video", args.progress) as bar:
        def on_result(r, report):
            if r.status == "failed":
                bar.write(f"failed: {r.source}: {r.cause}", file=sys.stderr)
            bar.set_postfix(done=report.done, skipped=report.skipped, failed=report.failed, refresh=False)
            bar.update(1)

        report, path = prepare_with_report(jobs, ann, args.src, args.dst, short_side=args.short_side, gop=args.gop,
                                           workers=_workers(args), crf=args.crf, preset=args.preset, tune=tune,
                                           started=started, on_result=on_result)
    print(report_summary(report, path))
    return 0 if report.failed == 0 else 1


def _scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="a folder with one sub-folder per class, or an "
                   "annotation file (with --format/--root)")
    p.add_argument("--min-frames", type=int, default=16, help="fewer decodable frames is reported as short "
                   "(default 16)")
    p.add_argument("--report", default="scan_report.json", help="report JSON (default scan_report.json)")
    p.add_argument("--write-clean", metavar="FILE", help="write a CSV annotation file without the missing, "
                   "unreadable and truncated videos (and FILE's .classes.txt)")
    _dataset_arguments(p)
    _output_arguments(p)


def cmd_scan(args) -> int:
    from .data.scan import scan_with_report

    with _bar(0, "video", args.progress) as bar:
        def on_dataset(n: int) -> None:
            bar.total += n
            bar.refresh()

        outcome = scan_with_report(args.datasets, args.report, fmt=args.format, root=args.root, classes=args.classes,
                                   split=args.split, fold=args.fold, workers=_workers(args),
                                   min_frames=args.min_frames, write_clean=args.write_clean, on_dataset=on_dataset,
                                   on_result=lambda r: bar.update(1))
    for r in outcome.bad:
        print(f"{r.status}: {r.path}: {r.cause}")
    print(json.dumps(outcome.summary, indent=2))
    print(f"report: {outcome.report}", file=sys.stderr)
    if outcome.clean is not None:
        clean, classes = outcome.clean
        print(f"wrote {len(outcome.results) - len(outcome.bad)} of {len(outcome.results)} videos to {clean} "
              f"(classes: {classes})", file=sys.stderr)
    return 1 if outcome.bad else 0


def _kinetics710_arguments(p: argparse.ArgumentParser) -> None:
    for release in ("400", "600", "700"):
        p.add_argument(f"--k{release}", required=True, metavar="DIR", help=f"the Kinetics-{release} release folder "
                       "(its annotation CSVs, directly or in annotations/, and its videos below it)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (train.csv, val.csv, classes.txt, "
                   "label_map.json, report.json, videos/)")
    p.add_argument("--match-by", default="youtube_id", choices=["youtube_id", "segment"],
                   help="a clip's identity: its YouTube id (UniFormerV2's rule, default) or id + start + end")
    p.add_argument("--no-videos", action="store_true", help="search no video: keep every labelled row")
    p.add_argument("--no-links", action="store_true", help="write no videos/ folder of links to the files found")


def cmd_kinetics710(args) -> int:
    from .data.kinetics710 import build_kinetics710, format_report

    report = build_kinetics710(k400=args.k400, k600=args.k600, k700=args.k700, out=args.out, match_by=args.match_by,
                               find_videos=not args.no_videos, link_videos=not args.no_links)
    print(format_report(report))
    return 0


# ---------------------------------------------------------------------------- demo, make-synthetic

def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from .demo import add_demo_arguments

    add_demo_arguments(p)
    _output_arguments(p)


def cmd_demo(args) -> int:
    from .demo import run_demo

    _prepare_device(args.device)
    run_demo(out=args.out, train_videos=args.train_videos, val_videos=args.val_videos, epochs=args.epochs,
             baseline_epochs=args.baseline_epochs, seed=args.seed, device=args.device, keep_data=args.keep_data,
             progress=args.progress)
    return 0


def _make_synthetic_arguments(p: argparse.ArgumentParser) -> None:
    from .data.synthetic import add_make_synthetic_arguments

    add_make_synthetic_arguments(p)


def cmd_make_synthetic(args) -> int:
    from .data.synthetic import run_make_synthetic

    run_make_synthetic(out=args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                       digits=args.digits, motions=args.motions, num_frames=args.num_frames, size=args.size,
                       fps=args.fps, workers=args.workers)
    return 0


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Command:
    """One ``dist-video`` command: its name, its one-line help, what declares its arguments and
    what runs it (parsed arguments -> exit status)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: tuple[Command, ...] = (
    Command("demo", "train DiST on synthetic moving digits with the built-in encoder (no downloads)",
            _demo_arguments, cmd_demo),
    Command("train", "train a video classifier (DiST or a baseline)", _train_arguments, cmd_train),
    Command("evaluate", "evaluate a model on the validation split (multi-view)", _evaluate_arguments, cmd_evaluate),
    Command("predict", "top classes of video files", _predict_arguments, cmd_predict),
    Command("embed", "video embeddings for retrieval (embeddings.safetensors + index.csv)", _embed_arguments,
            cmd_embed),
    Command("search", "rank embedded videos by similarity to a text", _search_arguments, cmd_search),
    Command("info", "model size, parameters, GFLOPs per view and config", _info_arguments, cmd_info),
    Command("convert", "an authors' .pyth checkpoint -> a dist-video model folder", _convert_arguments, cmd_convert),
    Command("export", "export a model to an ONNX folder (model.onnx, preprocess.json, labels.txt)",
            _export_arguments, cmd_export),
    Command("serve", "an HTTP prediction server with a web page (needs dist-video[serve])", _serve_arguments,
            cmd_serve),
    Command("watch", "rolling predictions on live input: a camera, a stream, standard input or a file (docs/live.md)",
            _watch_arguments, cmd_watch),
    Command("prepare", "re-encode a dataset once to a small short side with short GOPs (every frame kept)",
            _prepare_arguments, cmd_prepare),
    Command("scan", "check every video of a dataset and list the bad ones", _scan_arguments, cmd_scan),
    Command("kinetics710", "build Kinetics-710 (the union of Kinetics-400, -600, -700) from the release folders",
            _kinetics710_arguments, cmd_kinetics710),
    Command("make-synthetic", "write the synthetic moving-digit video dataset", _make_synthetic_arguments,
            cmd_make_synthetic),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-video",
        description="DiST: a frozen CLIP image model + a small temporal network = a cheap, strong video classifier.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.set_defaults(quiet=False, progress=True)  # commands without --quiet / --no-progress
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


# ---------------------------------------------------------------------------- running a command

def _non_finite(args, error: Exception) -> int:
    """A model whose outputs are not finite: one line naming the model (and, with ``--json``, that
    line as JSON on standard output); exit status 1."""
    model = getattr(args, "model", None) or getattr(args, "checkpoint", None) or "the model"
    message = f"{model}: {error}"
    if getattr(args, "json", False):
        _print_json({"model": str(model), "error": str(error)})
    print(f"dist-video {args.command}: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        args.progress = False
    _configure_logging(args.quiet)
    if args.debug:
        return args.func(args)
    from .config import ConfigError
    from .data.decoding import VideoDecodeError
    from .engine.inference import NonFiniteOutputError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except NonFiniteOutputError as e:
        return _non_finite(args, e)
    except (ConfigError, VideoDecodeError, ValueError, FileNotFoundError, OSError, KeyError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"dist-video {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so on one line (the traceback is behind --debug)
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"dist-video {args.command}: internal error: {type(e).__name__}: {first} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
