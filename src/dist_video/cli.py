"""The ``dist-video`` command line: train, evaluate, predict, embed, search, info, convert, prepare, scan,
make-synthetic, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

__all__ = ["main", "build_parser"]


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a shipped preset, e.g. k400-vit-b16-8+16f (see `dist-video info --presets`)")
    p.add_argument("--config", help="a YAML config file (may name a `base` preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--output", help="output folder (same as --set output_dir=...)")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars and no progress messages (only warnings "
                   "and errors on standard error)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _label_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", metavar="NAMES", help="zero-shot: classify into these label names instead (a "
                   "comma-separated list or a file with one per line); needs a class-text head or CLIP weights")
    p.add_argument("--prompt", default=None, help="a template such as 'a video of {}.' (default with --labels: "
                   "CLIP's Kinetics prompt ensemble; with --classes: the bare names; text without {} is a prefix)")
    p.add_argument("--vocab", help="BPE vocabulary for the text head (default: the model's, else the one shipped)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip for plain CLIP weights (default 8)")


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
    kept the heap's fragments made the peak of a long video vary widely from run to run
    (benchmarks/README.md#long-videos). On a GPU, let cuDNN pick
    its fastest convolution algorithms for the run's fixed shapes, and let float32 matrix
    products use TF32 tensor cores (the frozen CLIP and autocast regions compute in bf16/fp16
    anyway)."""
    import torch

    from .engine.allocator import keep_freed_memory
    from .engine.distributed import local_world_size, resolve_device

    device = resolve_device(name, int(os.environ.get("LOCAL_RANK", "0")), local_world_size())
    if device.type == "cpu" and keep_freed:
        keep_freed_memory()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")  # TF32 for float32 matrix products


def _load_cfg(args):
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"output_dir={args.output}")
    return load_config(args.preset, args.config, overrides)


# ---------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from .engine.train import train

    cfg = _load_cfg(args)
    _prepare_device(cfg.train.device)
    resume = False if args.no_resume else (args.resume or True)
    result = train(cfg, resume=resume, progress=args.progress)
    if result.status == "interrupted":
        return 130
    if result.metrics and (os.environ.get("RANK", "0") == "0"):
        print(json.dumps({k: result.metrics[k] for k in ("top1", "top5", "mean_class_accuracy", "num_videos")}))
        print(f"model saved to {result.output_dir / 'model'}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .engine.run import evaluate_model

    cfg = _load_cfg(args)
    _prepare_device(cfg.train.device)
    metrics = evaluate_model(args.model, cfg, clip=args.clip, classes=args.classes, output=args.output,
                             progress=args.progress, labels=args.labels, prompt=args.prompt, vocab=args.vocab)
    if metrics is not None:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy", "num_videos")}))
    return 0


def cmd_predict(args) -> int:
    from .engine.predict import load_for_inference, predict_files
    from .onnx_runner import OnnxVideoClassifier, is_exported_folder

    _check_window_arguments(args)
    if is_exported_folder(args.model):  # an exported folder: onnxruntime and its preprocess.json
        if args.labels is not None:
            raise ValueError(f"{args.model}: an exported model has a fixed class list; --labels needs a model "
                             "folder, an authors' .pyth or CLIP weights")
        model = OnnxVideoClassifier(args.model)
        preprocess = model.preprocess
    else:
        _prepare_device(args.device, keep_freed=args.window is None)
        model, preprocess = load_for_inference(args.model, clip=args.clip, classes=args.classes, vocab=args.vocab,
                                               prompt=args.prompt, device=args.device, clip_dtype=args.clip_dtype,
                                               labels=args.labels, num_frames=args.frames)
    if args.window is None:
        results = predict_files(model, args.videos, preprocess, topk=args.topk, views=args.views)
    else:
        results = _predict_timelines(args, model, preprocess)
    if args.json:
        print(json.dumps(results, indent=2))
    for r in results:
        if "error" in r:
            print(f"dist-video predict: error: {r['video']}: {r['error']}", file=sys.stderr)
        elif args.json:
            continue
        elif "windows" in r:
            print(r["video"])
            for w in r["windows"]:
                top = "   ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in w["top"][:3])
                print(f"  {w['start']:9.2f}-{w['end']:<9.2f}s  {top}")
        else:
            print(r["video"])
            for rank, item in enumerate(r["top"], 1):
                print(f"  {rank}. {item['class']:<40s} {100 * item['probability']:6.2f}%")
    return 1 if any("error" in r for r in results) else 0


def _check_window_arguments(args) -> None:
    """Usage errors of the long-video options (exit status 2, before any work)."""
    if args.window is None:
        for flag in ("stride", "csv", "timeline", "annotate"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag} needs --window SECONDS")
    elif len(args.videos) > 1 and (getattr(args, "timeline", None) or getattr(args, "annotate", None)):
        raise ValueError("--timeline and --annotate take one video at a time")


def _predict_timelines(args, model, preprocess) -> list[dict]:
    """``predict --window``: a timeline per video, then the CSV / plot / annotated video asked for."""
    from .classifier import VideoClassifier
    from .engine.inference import FILE_ERRORS, error_message
    from .engine.timeline import annotate_video, plot_timeline, video_timeline, write_timeline_csv

    fused = model.fuse() if isinstance(model, VideoClassifier) else model
    results, timelines = [], []
    for path in args.videos:
        try:
            timeline = video_timeline(fused, path, preprocess, window=args.window, stride=args.stride,
                                      batch_size=args.batch_size)
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


def cmd_embed(args) -> int:
    from .engine.embed import embed_files
    from .engine.predict import load_for_inference

    _check_window_arguments(args)
    _prepare_device(args.device, keep_freed=args.window is None)
    model, preprocess = load_for_inference(args.model, clip=args.clip, vocab=args.vocab, device=args.device,
                                           clip_dtype=args.clip_dtype, num_frames=args.frames, require_head=False)
    with _bar(len(args.videos), "video", args.progress) as bar:
        result = embed_files(model, args.videos, preprocess, out=args.out, views=args.views, window=args.window,
                             stride=args.stride, normalize=args.normalize, progress=lambda path: bar.update(1))
    for e in result.errors:
        print(f"dist-video embed: error: {e['video']}: {e['error']}", file=sys.stderr)
    print(f"wrote {result.embeddings.shape[0]} embeddings of {result.embeddings.shape[1]} dimensions to "
          f"{os.path.join(args.out, 'embeddings.safetensors')} (rows: index.csv); {result.computed} file(s) "
          "embedded now, the others in earlier runs", file=sys.stderr)
    return 1 if result.errors else 0


def cmd_search(args) -> int:
    from .engine.embed import read_embeddings, search_embeddings
    from .engine.predict import load_for_inference, text_query

    index = read_embeddings(args.folder)
    model, _ = load_for_inference(args.model, clip=args.clip, vocab=args.vocab, device="cpu", clip_dtype="fp32",
                                  require_head=False)
    hits = search_embeddings(index, text_query(model, args.query, prompt=args.prompt, vocab=args.vocab),
                             topk=args.topk)
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for h in hits:
        where = "" if h["start"] is None else f"  {h['start']:.2f}-{h['end']:.2f} s"
        print(f"{h['rank']:3d}. {h['score']:.4f}  {h['video']}{where}")
    return 0


def cmd_info(args) -> int:
    from .engine.info import describe

    if args.presets:
        from .config import list_presets
        from .dist import PRESETS
        print("config presets:  " + ", ".join(list_presets()))
        print("DiST presets:    " + ", ".join(PRESETS))
        return 0
    cfg = _load_cfg(args) if (args.preset or args.config or args.overrides) else None
    print(describe(args.model, cfg, clip=args.clip, arch=args.arch, size=args.size, as_json=args.json))
    return 0


def cmd_convert(args) -> int:
    from .engine.predict import convert_official

    out = convert_official(args.checkpoint, args.output, clip=args.clip, classes=args.classes, vocab=args.vocab,
                           prompt=args.prompt, selected_layers=args.selected_layers, copy_clip=args.copy_clip)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    report = export_onnx(args.model, args.out_dir, opset=args.opset, clip=args.clip, classes=args.classes,
                         labels=args.labels, vocab=args.vocab, prompt=args.prompt, tolerance=args.tolerance)
    print(report.summary())
    print(f"wrote {report.out_dir} (model.onnx, preprocess.json, labels.txt; opset {report.opset})")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeSettings, run_server

    settings = ServeSettings(token=args.token or os.environ.get("DIST_VIDEO_TOKEN") or None,
                             max_upload_bytes=int(args.max_upload_mb * 2 ** 20), timeout=args.timeout,
                             max_concurrent=args.max_concurrent, max_queue=args.max_queue, max_batch=args.max_batch,
                             max_labels=args.max_labels)
    run_server(args.model, host=args.host, port=args.port, settings=settings, clip=args.clip, classes=args.classes,
               labels=args.labels, vocab=args.vocab, prompt=args.prompt, device=args.device, clip_dtype=args.clip_dtype,
               num_frames=args.frames, log_level="warning" if args.quiet else "info")
    return 0


def cmd_make_synthetic(args) -> int:
    from .data.synthetic import run_make_synthetic

    run_make_synthetic(args)
    return 0


def _bar(total: int, unit: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def cmd_prepare(args) -> int:
    import time

    from .data.prepare import (PrepareReport, check_tune, plan_prepare, prepare_dataset, write_annotations,
                               write_report)

    t0 = time.perf_counter()
    tune = None if args.tune == "none" else args.tune
    check_tune(tune)
    jobs, ann = plan_prepare(args.src, args.dst, fmt=args.format, root=args.root, classes=args.classes,
                             split=args.split, fold=args.fold)
    workers = args.workers or max(1, len(os.sched_getaffinity(0)))
    report = PrepareReport(source=os.path.abspath(args.src), destination=os.path.abspath(args.dst),
                           short_side=args.short_side, gop=args.gop, workers=workers, crf=args.crf,
                           preset=args.preset, tune=tune)
    with _bar(len(jobs), "video", args.progress) as bar:
        def on_result(r):
            report.add(r)
            if r.status == "failed":
                bar.write(f"failed: {r.source}: {r.cause}", file=sys.stderr)
            bar.set_postfix(done=report.done, skipped=report.skipped, failed=report.failed, refresh=False)
            bar.update(1)

        results = prepare_dataset(jobs, short_side=args.short_side, gop=args.gop, workers=workers, crf=args.crf,
                                  preset=args.preset, tune=tune, on_result=on_result)
    if ann is not None:
        name = os.path.splitext(os.path.basename(os.path.normpath(args.src)))[0]
        report.annotation_files = [str(p) for p in write_annotations(jobs, results, ann, args.dst, name)]
    report.seconds = time.perf_counter() - t0
    path = write_report(report, args.dst)
    print(f"prepared {report.done} videos, skipped {report.skipped} already done, {report.failed} failed; "
          f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB in "
          f"{report.seconds:.1f} s; report: {path}")
    return 0 if report.failed == 0 else 1


def cmd_scan(args) -> int:
    from .data.scan import (BAD_STATUSES, ScanResult, load_for_scan, scan_dataset, summarize,
                            write_clean_annotations, write_scan_report)

    if args.write_clean and len(args.datasets) != 1:
        raise ValueError("--write-clean takes one dataset at a time")
    workers = args.workers or max(1, len(os.sched_getaffinity(0)))
    results, names = [], []
    for source in args.datasets:
        records, missing, ann = load_for_scan(source, fmt=args.format, root=args.root, classes=args.classes,
                                              split=args.split, fold=args.fold)
        names = ann.class_names
        with _bar(len(records) + len(missing), "video", args.progress) as bar:
            part = [ScanResult(p, -1, "missing", "file not found") for p in missing]
            bar.update(len(missing))
            part += scan_dataset(records, workers=workers, min_frames=args.min_frames,
                                 on_result=lambda r: bar.update(1))
        results += part
    summary = summarize(results)
    for r in results:
        if r.status in BAD_STATUSES:
            print(f"{r.status}: {r.path}: {r.cause}")
    print(json.dumps(summary, indent=2))
    report = write_scan_report(results, args.report, datasets=[os.path.abspath(d) for d in args.datasets])
    print(f"report: {report}", file=sys.stderr)
    if args.write_clean:
        clean, classes = write_clean_annotations(results, names, args.write_clean)
        kept = sum(r.status not in BAD_STATUSES for r in results)
        print(f"wrote {kept} of {len(results)} videos to {clean} (classes: {classes})", file=sys.stderr)
    return 0 if not any(r.status in BAD_STATUSES for r in results) else 1


def _dataset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None, help="annotation format of an annotation-file argument: csv, kinetics, "
                   "ssv2, ucf101, hmdb51 (a folder with one sub-folder per class needs none)")
    p.add_argument("--root", help="the videos' folder (kinetics, ssv2, ucf101, hmdb51; base of csv paths)")
    p.add_argument("--classes", help="class list file (ssv2: the labels JSON)")
    p.add_argument("--split", default="train", help="ucf101/hmdb51: train or test (default train)")
    p.add_argument("--fold", type=int, default=1, help="ucf101/hmdb51 official split 1, 2 or 3")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")


def cmd_demo(args) -> int:
    from .demo import run_demo

    _prepare_device(args.device)
    run_demo(args, progress=args.progress)
    return 0


# ---------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-video",
        description="DiST: a frozen CLIP image model + a small temporal network = a cheap, strong video classifier.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.set_defaults(quiet=False, progress=True)  # commands without --quiet / --no-progress
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train DiST on synthetic moving digits with the built-in encoder (no downloads)")
    from .demo import add_demo_arguments
    add_demo_arguments(p)
    _output_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a video classifier (DiST or a baseline)")
    _config_arguments(p)
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint "
                   "(default: output_dir/checkpoints/last.pt when it exists)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    _output_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model on the validation split (multi-view)")
    p.add_argument("model", help="a dist-video model folder or an authors' .pyth checkpoint")
    _config_arguments(p)
    p.add_argument("--clip", help="CLIP weights (for a .pyth checkpoint without them)")
    p.add_argument("--classes", help="class names for a .pyth checkpoint (default: the dataset's)")
    p.add_argument("--labels", nargs="?", const="", default=None, metavar="NAMES", help="zero-shot: score the "
                   "dataset's classes by the text of their names (or of NAMES: a file or a comma-separated list, "
                   "one per dataset class), replacing the model's head")
    p.add_argument("--prompt", default=None, help="with --labels: a template such as 'a video of {}.' "
                   "(default: CLIP's Kinetics prompt ensemble)")
    p.add_argument("--vocab", help="BPE vocabulary for --labels (default: the model's, else the one shipped)")
    _output_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top classes of video files")
    p.add_argument("model", help="a dist-video model folder or an authors' .pyth checkpoint")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--views", type=int, default=None, help="temporal views to average (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--clip", help="CLIP weights (for a .pyth checkpoint without them)")
    p.add_argument("--classes", help="class names for a .pyth checkpoint: a file (one per line) or "
                   "'kinetics400' / 'ssv2'")
    _label_arguments(p)
    p.add_argument("--window", type=float, help="long videos: classify windows of this many seconds (a timeline)")
    p.add_argument("--stride", type=float, help="seconds between window starts (default: the window)")
    p.add_argument("--csv", metavar="FILE", help="with --window: one row per window")
    p.add_argument("--timeline", metavar="FILE.png", help="with --window: plot the top classes over time")
    p.add_argument("--annotate", metavar="OUT.mp4", help="with --window: the video re-encoded (H.264) with the "
                   "current top label drawn on every frame")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--clip-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="frozen CLIP precision (auto: bf16 where the device has it natively, fp16 on older GPUs, "
                   "else fp32)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", help="video embeddings for retrieval (embeddings.safetensors + index.csv)")
    p.add_argument("model", help="a dist-video model folder, an authors' .pyth checkpoint or CLIP weights")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a re-run embeds only the files "
                   "not in it yet)")
    p.add_argument("--normalize", action="store_true", help="unit-length embeddings")
    p.add_argument("--views", type=int, default=None, help="temporal views to average (default: the model's)")
    p.add_argument("--window", type=float, help="one embedding per window of this many seconds")
    p.add_argument("--stride", type=float, help="seconds between window starts (default: the window)")
    p.add_argument("--clip", help="CLIP weights (for a .pyth checkpoint without them)")
    p.add_argument("--vocab", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, default=8, help="frames per clip for plain CLIP weights (default 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--clip-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    _output_arguments(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="rank embedded videos by similarity to a text")
    p.add_argument("folder", metavar="DIR", help="a folder written by `dist-video embed`")
    p.add_argument("query", help="a text, e.g. 'a person juggling'")
    p.add_argument("--model", required=True, help="the model that embedded the videos (it needs a text tower)")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--prompt", default=None, help="a template for the query, e.g. 'a video of {}.' "
                   "(default: the query as it is)")
    p.add_argument("--clip", help="CLIP weights (for a .pyth checkpoint without them)")
    p.add_argument("--vocab", help="BPE vocabulary (default: the model's, else the one shipped)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="model size, parameters, GFLOPs per view and config")
    p.add_argument("model", nargs="?", help="a model folder, an authors' .pyth file, or nothing (use --preset)")
    _config_arguments(p)
    p.add_argument("--clip", help="CLIP weights to describe with the preset")
    p.add_argument("--arch", default=None, help="CLIP architecture for a preset without weights: ViT-B/16, ViT-L/14")
    p.add_argument("--size", type=int, default=None, help="input resolution (default: CLIP's)")
    p.add_argument("--presets", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="an authors' .pyth checkpoint -> a dist-video model folder")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--clip", help="CLIP weights, if the checkpoint lacks them")
    p.add_argument("--classes", help="class names (file, 'kinetics400' or 'ssv2') for the text head")
    p.add_argument("--vocab", help="BPE vocabulary for the class-name text head")
    p.add_argument("--prompt", default="")
    p.add_argument("--selected-layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="CLIP blocks the branch reads, if not all (comma-separated)")
    p.add_argument("--copy-clip", action="store_true", help="store the CLIP weights in the folder "
                   "(default: copied, since the .pyth holds them; with --clip, referenced by path)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a model to an ONNX folder (model.onnx, preprocess.json, labels.txt)")
    p.add_argument("model", help="a dist-video model folder or an authors' .pyth checkpoint (with --classes)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |onnxruntime - PyTorch| accepted")
    p.add_argument("--clip", help="CLIP weights (for a .pyth checkpoint without them)")
    p.add_argument("--classes", help="class names for a .pyth checkpoint's text head: a file (one per line) or "
                   "'kinetics400' / 'ssv2'")
    _label_arguments(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="an HTTP prediction server with a web page (needs dist-video[serve])")
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
    p.add_argument("--clip", help="CLIP weights (for a .pyth checkpoint without them)")
    p.add_argument("--classes", help="class names for a .pyth checkpoint")
    _label_arguments(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--clip-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="frozen CLIP precision of a model folder (an exported folder is float32)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="re-encode a dataset once to a small short side with short GOPs "
                       "(every frame kept)")
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
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("scan", help="check every video of a dataset and list the bad ones")
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="a folder with one sub-folder per class, or an "
                   "annotation file (with --format/--root)")
    p.add_argument("--min-frames", type=int, default=16, help="fewer decodable frames is reported as short "
                   "(default 16)")
    p.add_argument("--report", default="scan_report.json", help="report JSON (default scan_report.json)")
    p.add_argument("--write-clean", metavar="FILE", help="write a CSV annotation file without the missing, "
                   "unreadable and truncated videos (and FILE's .classes.txt)")
    _dataset_arguments(p)
    _output_arguments(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("make-synthetic", help="write the synthetic moving-digit video dataset")
    from .data.synthetic import add_make_synthetic_arguments
    add_make_synthetic_arguments(p)
    p.set_defaults(func=cmd_make_synthetic)
    return parser


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

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ConfigError, VideoDecodeError, ValueError, FileNotFoundError, OSError, KeyError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"dist-video {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
