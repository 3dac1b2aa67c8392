"""Video loader throughput against the raw decode speed of the same files.

Kinetics-like videos (10 s, 340 x 256, 30 fps, H.264 with B-frames, textured moving content:
scikit-learn's sample photos panned and zoomed, with a scene cut and sensor-like noise) are
generated once into a cache folder. Then, side by side in one run, per core (one decoder
thread, one torch thread):

* ``raw``: every frame decoded with PyAV, nothing converted: the physical limit here;
* ``decode``: ``read_frames`` of 16 segment-sampled frames (RGB), probe cached;
* ``loader``: probe (cached) + segment sampling (16 frames) + ``read_frames`` +
  ``TrainTransform`` (crop 224, flip, colour jitter, grayscale, normalisation);

for each installed backend, as clips per second, medians of several repetitions; plus the
cold ``probe`` cost and a DataLoader run with 0, 1 and 2 workers (``loader.md``).

What users feed (``--part feed``, ``loader-feed.md``): Kinetics-like 720p originals (10 s,
1280 x 720, 30 fps, x264 defaults) against the same files prepared by ``dist-video prepare`` at
short side 320 and 256 (prepare's defaults: GOP 16, x264 ``fastdecode``), with
``data.clips_per_video`` 1, 2 and 4 (independent and shared frames), for each installed backend,
and Something-Something-v2-like videos prepared at 320: training clips (16 frames, crop 224) per
second per core through the dataset's item path (what a loader worker runs: decode and the uint8
crop/resize/flip; the colour map and normalisation run on the batch on the device), all settings
interleaved in every repetition; plus the time and disk ``prepare`` took.

prepare's settings (``--part prepare-options``, ``loader-prepare-options.md``): the 720p originals
prepared at 320 with several GOPs, with and without ``fastdecode``, side by side with PyAV.

Usage: ``python benchmarks/loader.py [--part all|decode|feed|prepare-options] [--videos 8]
[--repeats 5] [--feed-videos 6] [--feed-repeats 3] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from dist_video.data import (SegmentSampler, TrainTransform, VideoClipDataset, VideoRecord, available_backends,
                             clear_probe_cache, probe, read_frames)
from dist_video.data import decoding

WIDTH, HEIGHT, FPS, SECONDS = 340, 256, 30, 10


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "av": av.__version__,
            "ffmpeg": ".".join(map(str, av.library_versions["libavcodec"])),
            "numpy": np.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def make_video(path: Path, seed: int, keyint: int | None, width: int = WIDTH, height: int = HEIGHT,
               fps: int = FPS, seconds: float = SECONDS, codec: str = "libx264") -> None:
    """A 10 s H.264 video (340x256 at 30 fps unless told): a photo panned and zoomed, a cut to
    another photo at a random time, per-frame noise. x264 defaults otherwise (B-frames, keyint
    250, scenecut). ``codec="libvpx-vp9"``: VP9 (realtime speed, in a .webm ``path``)."""
    WIDTH, HEIGHT = width, height  # this video's frame size
    from sklearn.datasets import load_sample_images
    photos = [torch.from_numpy(np.array(img)).permute(2, 0, 1).float() for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    n = int(seconds * fps)
    cut = int(rng.integers(n // 3, 2 * n // 3))
    order = rng.permutation(len(photos))
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libx264":
            options = {"crf": "23", "preset": "medium"}
            if keyint:
                options.update({"g": str(keyint), "keyint_min": str(keyint)})
        else:
            options = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        stream.options = options
        for i in range(n):
            photo = photos[order[0] if i < cut else order[1]]
            _, ph, pw = photo.shape
            t = i / n
            zoom = 0.55 + 0.25 * np.sin(2 * np.pi * (t + seed * 0.13))
            ch, cw = int(ph * zoom), int(ph * zoom * WIDTH / HEIGHT)
            cw = min(cw, pw)
            y0 = int((ph - ch) * (0.5 + 0.4 * np.sin(3 * t + seed)))
            x0 = int((pw - cw) * (0.5 + 0.45 * np.sin(2 * np.pi * t * 0.7 + seed)))
            crop = photo[:, y0:y0 + ch, x0:x0 + cw][None]
            frame = F.interpolate(crop, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]
            frame = frame + torch.from_numpy(rng.normal(0, 4, (1, HEIGHT, WIDTH)).astype(np.float32))
            img = frame.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def videos(cache: Path, count: int, keyint: int | None) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = cache / f"kinetics_like_{'default' if keyint is None else f'g{keyint}'}_{i:02d}.mp4"
        if not path.exists():
            make_video(path, i, keyint)
        paths.append(path)
    return paths


def raw_decode(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return sum(1 for _ in container.decode(stream))


def measure(paths: list[Path], repeats: int, backends: list[str]) -> dict:
    sampler = SegmentSampler(16)
    transform = TrainTransform(crop_size=224)
    clips_per_pass = 3  # segment-sampled clips per video per pass
    for p in paths:
        probe(p)
    times: dict[str, list[float]] = {"raw": []}
    for b in backends:
        times[f"{b}/decode"] = []
        times[f"{b}/loader"] = []
    breakdown = {"decode_s": [], "transform_s": []}

    def run_decode(backend: str, rep: int) -> None:
        for k, p in enumerate(paths):
            for c in range(clips_per_pass):
                g = torch.Generator().manual_seed(rep * 1000 + k * 10 + c)
                read_frames(p, sampler(probe(p).num_frames, rng=g), backend, threads=1)

    def run_loader(backend: str, rep: int) -> None:
        for k, p in enumerate(paths):
            for c in range(clips_per_pass):
                g = torch.Generator().manual_seed(rep * 1000 + k * 10 + c)
                t0 = time.perf_counter()
                frames = read_frames(p, sampler(probe(p).num_frames, rng=g), backend, threads=1)
                t1 = time.perf_counter()
                transform(frames, label=0, generator=g)
                if backend == "pyav":
                    breakdown["decode_s"].append(t1 - t0)
                    breakdown["transform_s"].append(time.perf_counter() - t1)

    for b in backends:  # warm-up
        run_loader(b, 999)
    for rep in range(repeats):
        t = time.perf_counter()
        for p in paths:
            raw_decode(p)
        times["raw"].append(len(paths) / (time.perf_counter() - t))
        for b in backends:
            t = time.perf_counter()
            run_decode(b, rep)
            times[f"{b}/decode"].append(len(paths) * clips_per_pass / (time.perf_counter() - t))
            t = time.perf_counter()
            run_loader(b, rep)
            times[f"{b}/loader"].append(len(paths) * clips_per_pass / (time.perf_counter() - t))
    result = {"clips_per_second": {k: statistics.median(v) for k, v in times.items()},
              "all_repetitions": times}
    raw = result["clips_per_second"]["raw"]
    result["ratio_to_raw"] = {k: v / raw for k, v in result["clips_per_second"].items() if k != "raw"}
    # per-repetition ratios, to show their spread
    result["ratio_to_raw_per_repetition"] = {
        k: [round(x / r, 3) for x, r in zip(v, times["raw"])] for k, v in times.items() if k != "raw"}
    result["pyav_ms_per_clip"] = {"decode+convert": 1000 * statistics.median(breakdown["decode_s"]),
                                  "transform": 1000 * statistics.median(breakdown["transform_s"])}
    # cold probe: demux-only index of a file never seen
    cold = []
    for p in paths:
        clear_probe_cache()
        t = time.perf_counter()
        probe(p)
        cold.append(time.perf_counter() - t)
    result["probe_cold_ms"] = 1000 * statistics.median(cold)
    result["probe_counted_by"] = sorted({probe(p).counted_by for p in paths})
    frames = [raw_decode(p) for p in paths]
    result["frames_per_video"] = statistics.median(frames)
    result["raw_frames_per_second"] = raw * statistics.median(frames)
    return result


def measure_dataloader(paths: list[Path], workers_list: list[int], clips_per_epoch: int) -> dict:
    """Clips per second of a DataLoader over the videos; the second epoch is timed from
    ``iter(loader)`` to its last batch (workers persistent, probe caches warm)."""
    from torch.utils.data import DataLoader
    repeat = max(1, -(-clips_per_epoch // len(paths)))
    records = [VideoRecord(str(p), i % 4) for i, p in enumerate(paths)] * repeat
    out = {}
    for workers in workers_list:
        ds = VideoClipDataset(records, sampler=SegmentSampler(16), transform=TrainTransform(crop_size=224),
                              training=True, seed=0)
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)
        rates = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            t = time.perf_counter()
            n = sum(batch["video"].shape[0] for batch in loader)
            rates.append(n / (time.perf_counter() - t))
        out[str(workers)] = {"clips_per_second": rates[-1], "first_epoch_clips_per_second": rates[0],
                             "clips_per_epoch": len(records)}
        del loader
    base = out[str(workers_list[0])]["clips_per_second"]
    for v in out.values():
        v["speedup_vs_0_workers"] = v["clips_per_second"] / base
    return out


# ----------------------------------------------------------------------------- what users feed

FEED_SIZE = (1280, 720)
#: Something-Something-v2-like: 427x240 VP9 WebM, 12 fps, about 4 s.
SSV2_LIKE = {"width": 426, "height": 240, "fps": 12, "seconds": 4.0, "codec": "libvpx-vp9"}


def timed_prepare(originals: list[Path], folder: Path, side: int, workers: int, gop: int = 16,
                  tune: str | None = "fastdecode") -> tuple[list[Path], dict]:
    """``prepare_dataset`` of ``originals`` into a fresh ``folder``: outputs, time and disk."""
    from dist_video.data.prepare import PrepareJob, prepare_dataset
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.mp4"):
        old.unlink()
    jobs = [PrepareJob(str(p), str(folder / (p.stem + ".mp4"))) for p in originals]
    t0 = time.perf_counter()
    results = prepare_dataset(jobs, short_side=side, gop=gop, tune=tune, workers=workers)
    wall = time.perf_counter() - t0
    failed = [r for r in results if r.status != "done"]
    if failed:
        raise RuntimeError(f"prepare failed: {failed[0].source}: {failed[0].cause}")
    before, after = sum(r.bytes_before for r in results), sum(r.bytes_after for r in results)
    info = probe(results[0].output)
    return [Path(r.output) for r in results], {
        "videos": len(jobs), "workers": workers, "gop": gop, "tune": tune, "wall_seconds": wall,
        "bytes_before": before, "bytes_after": after,
        "wall_seconds_per_1000_videos": wall / len(jobs) * 1000,
        "gib_per_1000_videos_after": after / len(jobs) * 1000 / 2**30,
        "gib_per_1000_videos_before": before / len(jobs) * 1000 / 2**30,
        "size_before": [probe(originals[0]).width, probe(originals[0]).height], "size": [info.width, info.height]}


def cached_videos(folder: Path, names: list[str], seeds: list[int], **video) -> list[Path]:
    """Generated videos ``folder/name`` (made once, then reused from the cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in zip(names, seeds):
        if not (folder / name).exists():
            make_video(folder / name, seed, None, **video)
    return [folder / name for name in names]


def feed_originals(cache: Path, count: int) -> list[Path]:
    """The Kinetics-like 720p originals (cached)."""
    return cached_videos(cache / "720p", [f"kinetics_like_720p_{i:02d}.mp4" for i in range(count)],
                         [100 + i for i in range(count)], width=FEED_SIZE[0], height=FEED_SIZE[1])


def feed_sets(cache: Path, count: int, workers: int) -> tuple[dict[str, list[Path]], dict]:
    """720p originals (cached) and their copies prepared at short side 320 and 256 (made
    anew each run, timed); and Something-Something-v2-like originals prepared at 320 (timed
    only)."""
    originals = feed_originals(cache, count)
    ssv2 = cached_videos(cache / "ssv2-like", [f"{200 + i}.webm" for i in range(count)],
                         [200 + i for i in range(count)], **SSV2_LIKE)
    sets = {"720p originals": originals}
    prepare = {}
    for side in (320, 256):
        sets[f"prepared short side {side}"], prepare[f"kinetics-like {side}"] = timed_prepare(
            originals, cache / f"prepared-{side}", side, workers)
    sets["ssv2-like, prepared 320"], prepare["ssv2-like 320"] = timed_prepare(ssv2, cache / "ssv2-like-prepared",
                                                                              320, workers)
    return sets, prepare


def clip_columns(clips_per_video: list[int], clip_frames) -> list[tuple[int, str]]:
    """(clips per video, clip frames) settings: ``shared`` only where there are several clips."""
    return [(n, mode) for mode in clip_frames for n in clips_per_video if mode == "independent" or n > 1]


def column_name(n: int, mode: str) -> str:
    return f"{n}" + (" shared" if mode == "shared" else "")


def setting_key(name: str, backend: str, n: int, clip_frames: str) -> str:
    return f"{name} | {backend} | {column_name(n, clip_frames)}"


def measure_feed(sets: dict[str, list[Path]], backends: list[str], clips_per_video: list[int],
                 repeats: int, warmup: int = 1, min_seconds: float = 3.0,
                 clip_frames: tuple[str, ...] = ("independent",)) -> dict:
    """Training clips per second per core through ``VideoClipDataset.__getitem__`` (probe
    cached, one decoder thread, one torch thread) for every (set, backend, clips per video,
    clip frames: ``independent`` always, ``shared`` for several clips per video); every
    repetition runs every setting once, in the same order, after ``warmup`` passes that are not
    counted. A setting's repetition goes over its videos (new random draws each time) until
    ``min_seconds`` have passed, so fast settings are not timed over a fraction of a second."""
    settings = [(name, b, n, mode) for name in sets for b in backends for n, mode in clip_columns(clips_per_video,
                                                                                                 clip_frames)]
    datasets = {}
    for name, b, n, mode in settings:
        records = [VideoRecord(str(p), 0) for p in sets[name]]
        datasets[(name, b, n, mode)] = VideoClipDataset(
            records, sampler=SegmentSampler(16), transform=TrainTransform(crop_size=224), training=True, seed=0,
            backend=b, decode_threads=1, clips_per_video=n, clip_frames=mode)
        for p in sets[name]:
            probe(p)
    rates: dict[tuple, list[float]] = {k: [] for k in settings}
    for rep in range(warmup + repeats):
        for key in settings:
            ds = datasets[key]
            t = time.perf_counter()
            clips = passes = 0
            while passes == 0 or time.perf_counter() - t < min_seconds:
                ds.set_epoch(1000 * rep + passes)
                for i in range(len(ds)):
                    video = ds[i]["video"]
                    clips += video.shape[0] if key[2] > 1 else 1
                passes += 1
            if rep >= warmup:
                rates[key].append(clips / (time.perf_counter() - t))
        print(f"feed pass {rep + 1} of {warmup + repeats} done", file=sys.stderr)
    table = {setting_key(*k): statistics.median(v) for k, v in rates.items()}
    out = {"clips_per_second_per_core": table, "all_repetitions": {setting_key(*k): v for k, v in rates.items()}}
    ratios = {}
    first = next(iter(sets))
    for name, b, n, mode in settings:
        base = table[setting_key(name, b, 1, "independent")]
        ratios[f"{setting_key(name, b, n, mode)} / 1"] = table[setting_key(name, b, n, mode)] / base
        if n == 1 and name.startswith("prepared") and first.endswith("originals"):
            ratios[f"{name} / {first} | {b} | 1"] = base / table[setting_key(first, b, 1, "independent")]
    out["ratios"] = ratios
    return out


def feed_columns(st: dict) -> list[tuple[int, str]]:
    return clip_columns(st["clips_per_video"], st.get("clip_frames", ["independent"]))


def write_feed_markdown(result: dict, path: Path) -> None:
    m, st, feed = result["machine"], result["settings"], result["feed"]
    table = feed["clips_per_second_per_core"]
    lines = ["# Loader throughput on what users feed", "",
             f"Measured by `benchmarks/loader.py --part feed` on {m['date']}: {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}, PyAV {m['av']} (libavcodec {m['ffmpeg']}), Python {m['python']}; backends: "
             f"{', '.join(f'{k} {v}' for k, v in st['backend_versions'].items())}.",
             f"{st['feed_videos']} generated Kinetics-like videos (10 s, 1280x720, 30 fps, x264 defaults: B-frames, "
             "keyint 250, scene cuts) and the same files after `dist-video prepare --short-side S` (its defaults: "
             "GOP 16, `--tune fastdecode`); "
             f"{st['feed_videos']} SSv2-like videos (4 s, 426x240, 12 fps, VP9) after `prepare --short-side 320`. "
             "Training clips of 16 segment-sampled frames, `TrainTransform(crop_size=224)`, through "
             "`VideoClipDataset.__getitem__` (a loader worker's share: decoding and the uint8 crop, resize and flip; "
             "the colour map and normalisation run on the batch on the device) "
             "in one process with one decoder thread and one torch thread: clips "
             f"per second per core, medians of {st['feed_repeats']} repetitions (after {st['feed_warmup']} "
             "uncounted passes), every setting run once in each repetition (side by side), each over its videos "
             f"again until at least {st.get('feed_min_seconds', 0):g} s had passed.", "",
             "Columns: `data.clips_per_video` N with each clip sampled on its own (the default), and "
             "`N shared` with `data.clip_frames=shared` (the N clips share one sample of frames and differ "
             "in augmentation only).", "",
             feed_table_header(st), "|---|---|" + "---|" * (2 * len(feed_columns(st)) - 1)]
    names = list(dict.fromkeys(k.split(" | ")[0] for k in table))
    for name in names:
        for b in st["backends"]:
            lines.append(feed_table_row(table, name, b, st))
    lines += ["", "Prepared against the originals (clips_per_video 1, same backend):", "",
              "| videos | " + " | ".join(st["backends"]) + " |", "|---|" + "---|" * len(st["backends"])]
    for name in (n for n in names if n.startswith("prepared")):
        lines.append(f"| {name} | " + " | ".join(f"{feed['ratios'][f'{name} / {names[0]} | {b} | 1']:.2f}x"
                                                 for b in st["backends"]) + " |")
    lines += ["", "## prepare", "",
              "`prepare_dataset(..., gop=16, tune='fastdecode', workers=all cores)` from scratch; "
              "SSv2-like: 426x240 VP9 WebM, 12 fps, "
              "4 s, generated the same way.", "",
              "| videos, short side | size before -> after | wall time per video | per 1,000 videos "
              "| disk per 1,000 videos: after (before) |",
              "|---|---|---|---|---|"]
    for name, p in result["prepare"].items():
        lines.append(f"| {name} | {p['size_before'][0]}x{p['size_before'][1]} -> {p['size'][0]}x{p['size'][1]} | "
                     f"{p['wall_seconds'] / p['videos']:.2f} s ({p['workers']} workers) | "
                     f"{p['wall_seconds_per_1000_videos'] / 3600:.2f} h | "
                     f"{p['gib_per_1000_videos_after']:.2f} GiB ({p['gib_per_1000_videos_before']:.2f} GiB) |")
    lines += ["", "Generated videos: a photo panned and zoomed with sensor-like noise and one scene cut; real "
              "Kinetics videos differ in content, length (up to 10 s), resolution and encoder settings, so "
              "treat the absolute rates and sizes as this machine's measurement on these files.", ""]
    path.write_text("\n".join(lines))


def feed_table_header(st: dict, first: str = "videos | backend") -> str:
    columns = feed_columns(st)
    return (f"| {first} | " + " | ".join(f"clips_per_video {column_name(*c)}" for c in columns) + " | "
            + " | ".join(f"{column_name(*c)} / 1" for c in columns[1:]) + " |")


def feed_table_row(table: dict, name: str, b: str, st: dict, label: str | None = None) -> str:
    row = [table[setting_key(name, b, n, mode)] for n, mode in feed_columns(st)]
    return (f"| {label or f'{name} | {b}'} | " + " | ".join(f"{x:.2f}" for x in row) + " | "
            + " | ".join(f"{x / row[0]:.2f}x" for x in row[1:]) + " |")


#: ``prepare`` settings compared by ``--part prepare-options`` at short side 320: (GOP, x264 tune).
PREPARE_OPTIONS = [(16, None), (16, "fastdecode"), (32, "fastdecode"), (64, "fastdecode"), (250, "fastdecode")]


def option_name(gop: int, tune: str | None) -> str:
    return f"GOP {gop}, " + (f"tune {tune}" if tune else "x264 default tools")


def measure_prepare_options(cache: Path, count: int, workers: int, repeats: int, warmup: int,
                            min_seconds: float) -> dict:
    """The 720p originals prepared at short side 320 with each of ``PREPARE_OPTIONS``; clips per
    second per core (PyAV) at ``clips_per_video`` 1 and 2 (independent and shared frames)."""
    originals = feed_originals(cache, count)
    sets, prepare = {}, {}
    for gop, tune in PREPARE_OPTIONS:
        name = option_name(gop, tune)
        sets[name], prepare[name] = timed_prepare(originals, cache / f"options-g{gop}-{tune or 'none'}", 320,
                                                  workers, gop=gop, tune=tune)
    feed = measure_feed(sets, ["pyav"], [1, 2], repeats, warmup, min_seconds, clip_frames=("independent", "shared"))
    return {"prepare": prepare, "feed": feed}


def write_prepare_options_markdown(result: dict, path: Path) -> None:
    m, st, feed = result["machine"], result["settings"], result["feed"]
    table = feed["clips_per_second_per_core"]
    lines = ["# prepare's settings against the loader's speed", "",
             f"Measured by `benchmarks/loader.py --part prepare-options` on {m['date']}: {m['cpu']}, {m['cores']} "
             f"cores, torch {m['torch']}, PyAV {m['av']} (libavcodec {m['ffmpeg']}), Python {m['python']}.",
             f"{st['feed_videos']} generated Kinetics-like 720p videos (as in loader-feed.md) prepared at short side "
             "320 with each GOP and x264 tuning below; training clips of 16 segment-sampled frames through "
             "`VideoClipDataset.__getitem__` with PyAV, one decoder thread and one torch thread: clips per second "
             f"per core, medians of {st['feed_repeats']} repetitions (after {st['feed_warmup']} uncounted passes), "
             f"all settings side by side in every repetition, each over its videos until at least "
             f"{st['feed_min_seconds']:g} s had passed. `2 shared`: `data.clip_frames=shared`.", "",
             feed_table_header(st, "prepared at 320")[:-1] + "| disk per 1,000 videos | prepare per 1,000 videos |",
             "|---|" + "---|" * (2 * len(feed_columns(st)) - 1) + "---|---|"]
    for name, p in result["prepare"].items():
        lines.append(feed_table_row(table, name, "pyav", st, label=name)
                     + f" {p['gib_per_1000_videos_after']:.2f} GiB | {p['wall_seconds_per_1000_videos'] / 3600:.2f} h "
                     f"({p['workers']} workers) |")
    lines.append("")
    path.write_text("\n".join(lines))


def backend_versions(backends: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for b in backends:
        try:
            out[b] = version({"pyav": "av"}.get(b, b))
        except PackageNotFoundError:
            out[b] = "?"
    return out


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = ["# Video loader throughput", "",
             f"Measured by `benchmarks/loader.py` on {m['date']}: {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}, PyAV {m['av']} (libavcodec {m['ffmpeg']}), Python {m['python']}.",
             f"{result['settings']['videos']} Kinetics-like videos per set (10 s, 340x256, 30 fps, H.264 with "
             f"B-frames, crf 23); medians of {result['settings']['repeats']} repetitions; one decoder thread and "
             "one torch thread (per core).", ""]
    for name, res in result["sets"].items():
        cps = res["clips_per_second"]
        lines += [f"## {name}", "",
                  f"Raw decode (every frame, nothing converted): {cps['raw']:.1f} videos/s "
                  f"({res['raw_frames_per_second']:.0f} frames/s). Cold probe (demux only): "
                  f"{res['probe_cold_ms']:.1f} ms per video; counted by {', '.join(res['probe_counted_by'])}.", "",
                  "| backend | decode 16 frames (clips/s) | ratio to raw "
                  "| full loader: decode + sample + augment 224 (clips/s) | ratio to raw |",
                  "| --- | --- | --- | --- | --- |"]
        for b in result["settings"]["backends"]:
            lines.append(f"| {b} | {cps[f'{b}/decode']:.1f} | {res['ratio_to_raw'][f'{b}/decode']:.2f} | "
                         f"{cps[f'{b}/loader']:.1f} | {res['ratio_to_raw'][f'{b}/loader']:.2f} |")
        ms = res["pyav_ms_per_clip"]
        lines += ["", f"PyAV loader per clip: {ms['decode+convert']:.1f} ms decoding + RGB of 16 frames, "
                  f"{ms['transform']:.1f} ms augmentation.", ""]
    dl = result["dataloader"]
    lines += ["## DataLoader (segment 16 frames, train transform 224, batch 8)", "",
              "| workers | clips/s | speed-up vs 0 workers |", "| --- | --- | --- |"]
    for w, v in dl.items():
        lines.append(f"| {w} | {v['clips_per_second']:.1f} | {v['speedup_vs_0_workers']:.2f} |")
    lines += ["", "0 workers load in the main process; with workers, the main process only collates. Frames "
              "this small decode with one thread (FFmpeg's frame threads do not speed them up). The second "
              "epoch is timed, from `iter(loader)` to its last batch (persistent workers, probe caches warm).", "",
              "## Why the loader can beat the raw decode", "",
              "`read_frames` decodes only as far as the last requested frame and converts only requested "
              "frames to RGB; frames nobody asked for that no other frame references (most B-frames) are "
              "handed to FFmpeg with `skip_frame=NONREF` and never decoded, output frames being identified by "
              "their timestamps so indices stay exact; and it seeks over keyframe gaps longer than "
              "`SEEK_GAP` frames, checking that decoding resumes exactly at the keyframe. Augmentation works on "
              "a uint8 crop, resizes once, and folds colour jitter, grayscale and normalisation into one "
              "affine colour map.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist-video-loader-bench"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--dataloader-clips", type=int, default=48, help="clips per DataLoader epoch")
    parser.add_argument("--part", choices=["all", "decode", "feed", "prepare-options"], default="all",
                        help="decode: loader.md; feed: loader-feed.md (720p vs prepared, clips_per_video); "
                             "prepare-options: loader-prepare-options.md (prepare's GOP and tuning)")
    parser.add_argument("--feed-videos", type=int, default=6)
    parser.add_argument("--feed-repeats", type=int, default=3)
    parser.add_argument("--feed-warmup", type=int, default=1, help="uncounted passes before the repetitions")
    parser.add_argument("--feed-min-seconds", type=float, default=3.0,
                        help="each setting's repetition runs over its videos again until this long")
    parser.add_argument("--clips-per-video", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--clip-frames", nargs="+", choices=["independent", "shared"],
                        default=["independent", "shared"], help="feed: data.clip_frames settings to measure")
    parser.add_argument("--prepare-workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    backends = available_backends()
    cache = Path(args.cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "feed"):
        sets, prepare = feed_sets(cache, args.feed_videos, args.prepare_workers)
        torch.set_num_threads(1)
        print("prepared: " + json.dumps(prepare), file=sys.stderr)
        result = {"machine": machine(),
                  "settings": {"feed_videos": args.feed_videos, "feed_repeats": args.feed_repeats,
                               "feed_warmup": args.feed_warmup, "feed_min_seconds": args.feed_min_seconds,
                               "clips_per_video": args.clips_per_video, "clip_frames": args.clip_frames,
                               "backends": backends,
                               "backend_versions": backend_versions(backends),
                               "clip": "16 frames, segment-based sampling, TrainTransform(crop_size=224)",
                               "decoder_threads": 1, "torch_threads": 1},
                  "prepare": prepare,
                  "feed": measure_feed(sets, backends, args.clips_per_video, args.feed_repeats, args.feed_warmup,
                                       args.feed_min_seconds, clip_frames=tuple(args.clip_frames))}
        (out / "loader-feed.json").write_text(json.dumps(result, indent=2) + "\n")
        write_feed_markdown(result, out / "loader-feed.md")
        print((out / "loader-feed.md").read_text())
        if args.part == "feed":
            return 0
    if args.part in ("all", "prepare-options"):
        measured = measure_prepare_options(cache, args.feed_videos, args.prepare_workers, args.feed_repeats,
                                           args.feed_warmup, args.feed_min_seconds)
        torch.set_num_threads(1)
        result = {"machine": machine(),
                  "settings": {"feed_videos": args.feed_videos, "feed_repeats": args.feed_repeats,
                               "feed_warmup": args.feed_warmup, "feed_min_seconds": args.feed_min_seconds,
                               "clips_per_video": [1, 2], "clip_frames": ["independent", "shared"],
                               "backends": ["pyav"], "options": PREPARE_OPTIONS},
                  **measured}
        (out / "loader-prepare-options.json").write_text(json.dumps(result, indent=2) + "\n")
        write_prepare_options_markdown(result, out / "loader-prepare-options.md")
        print((out / "loader-prepare-options.md").read_text())
        if args.part == "prepare-options":
            return 0
    t0 = time.perf_counter()
    sets = {"x264 defaults (keyint 250, scene cuts)": videos(cache, args.videos, None),
            "short GOP (keyint 30)": videos(cache, args.videos, 30)}
    print(f"videos ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    result = {"machine": machine(),
              "settings": {"videos": args.videos, "repeats": args.repeats, "backends": backends,
                           "clip": "16 frames, segment-based sampling, TrainTransform(crop_size=224)",
                           "seek_gap": decoding.SEEK_GAP, "decoder_threads": 1, "torch_threads": 1},
              "sets": {}}
    for name, paths in sets.items():
        seeks0 = decoding.STATS["seeks"]
        result["sets"][name] = measure(paths, args.repeats, backends)
        result["sets"][name]["pyav_seeks"] = decoding.STATS["seeks"] - seeks0
        print(name, json.dumps(result["sets"][name]["clips_per_second"]), file=sys.stderr)
    torch.set_num_threads(1)
    result["dataloader"] = measure_dataloader(sets["x264 defaults (keyint 250, scene cuts)"], [0, 1, 2],
                                              args.dataloader_clips)
    print("dataloader", json.dumps(result["dataloader"]), file=sys.stderr)
    (out / "loader.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / "loader.md")
    print((out / "loader.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
