"""Deployment cost: onnxruntime against PyTorch, and the server's round trip against in-process prediction.

1. Latency per clip of DiST (K400 ViT-B/16 8+16f, 224 px, random weights, linear head) exported
   to ONNX (float32, onnxruntime's CPU provider) against the same fused model in PyTorch, in
   float32 (what the export holds) and in the model's default inference precision (bf16 where the
   CPU has it), at batches of 1 and 16 clips; the runtimes interleaved repetition by repetition.
2. Round trip: ``POST /predict`` of a 10-second video to ``dist-video serve`` (a subprocess on a
   loopback port, the model folder at its default precision) against ``predict_files`` in this
   process on the same file with the same model folder; interleaved, medians.

    python benchmarks/deploy.py                      # about 20 minutes on 2 CPU cores
    python benchmarks/deploy.py --batches 1 --repeats 2 --round-trips 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_method, machine  # noqa: E402

from dist_video.engine.predict import DEFAULT_PREPROCESS, predict_files  # noqa: E402
from dist_video.export import export_fused_onnx  # noqa: E402
from dist_video.loading import load_model  # noqa: E402
from dist_video.onnx_runner import OnnxVideoClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = "k400-vit-b16-8+16f"


def write_video(path: Path, seconds: float, fps: int = 30, width: int = 320, height: int = 240) -> Path:
    """A ``seconds``-long H.264 video of moving gradients."""
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, (xx + yy + 3 * i) % 256], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def latency(work: Path, batches: list[int], repeats: int, large_repeats: int) -> tuple[list[dict], dict]:
    model = build_method("dist", "ViT-B/16", 16, 2, torch.device("cpu"), dist_preset=PRESET)
    fp32 = model.fuse(torch.float32)
    default = model.fuse()
    default_dtype = str(default.dtype).replace("torch.", "")
    del model
    preprocess = {**DEFAULT_PREPROCESS, "num_frames": 16}
    report = export_fused_onnx(fp32, preprocess, work / "onnx", name=PRESET)
    runner = OnnxVideoClassifier(work / "onnx")
    runtimes = {"onnxruntime_fp32": runner, "pytorch_fp32": fp32, f"pytorch_{default_dtype}": default}
    rows = []
    for k, b in enumerate(batches):
        video = torch.randn(b, 3, 16, 224, 224, generator=torch.Generator().manual_seed(b))
        times = {name: [] for name in runtimes}
        with torch.no_grad():
            if k == 0:
                for fn in runtimes.values():  # warm-up, once
                    fn(video)
            for _ in range(repeats if b == 1 else large_repeats):
                for name, fn in runtimes.items():
                    t = time.perf_counter()
                    fn(video)
                    times[name].append(time.perf_counter() - t)
        row = {"batch": b, **{f"{name}_ms_per_clip": 1000 * statistics.median(ts) / b for name, ts in times.items()},
               "times_s": times}
        row["onnxruntime_over_pytorch_fp32"] = row["onnxruntime_fp32_ms_per_clip"] / row["pytorch_fp32_ms_per_clip"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
    verification = {"max_abs_diff_logits": report.max_abs_diff_logits,
                    "max_abs_diff_embeddings": report.max_abs_diff_embeddings, "opset": report.opset}
    return rows, {"default_dtype": default_dtype, **verification}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(work: Path, repeats: int, seconds: float) -> dict:
    import httpx

    folder = work / "model"
    build_method("dist", "ViT-B/16", 16, 2, torch.device("cpu"), dist_preset=PRESET).save_pretrained(folder)
    video = write_video(work / "ten_seconds.mp4", seconds)
    loaded = load_model(str(folder), device="cpu")
    model, preprocess = loaded.model, loaded.preprocess
    fused = model.fuse()
    del model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dist_video.cli", "serve", str(folder), "--port", str(port),
                               "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        data = video.read_bytes()

        def remote():
            r = httpx.post(url + "/predict", files={"video": (video.name, data, "video/mp4")}, timeout=600)
            r.raise_for_status()
            return r.json()[0]

        def local():
            return predict_files(fused, [str(video)], preprocess)[0]

        same = [t["class"] for t in remote()["top"]] == [t["class"] for t in local()["top"]]  # and warm-up
        times = {"server": [], "in_process": []}
        for _ in range(repeats):
            for name, fn in (("server", remote), ("in_process", local)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(timeout=60)
    s, p = statistics.median(times["server"]), statistics.median(times["in_process"])
    result = {"video_seconds": seconds, "video_bytes": len(data), "views": preprocess["num_views"],
              "server_s": s, "in_process_s": p, "overhead": s / p - 1, "same_top_classes": same, "times_s": times}
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}), flush=True)
    return result


def markdown(result: dict) -> str:
    m, lat, rt = result["machine"], result["latency"], result["round_trip"]
    d = result["export"]["default_dtype"]
    lines = ["# Deployment cost", "",
             f"`python benchmarks/deploy.py` on {m['date']}: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
             f"onnxruntime {result['onnxruntime']}. Medians of interleaved repetitions ({result['repeats']} at "
             f"batch 1, {result['large_repeats']} above, after one warm-up; round trip: "
             f"{len(rt['times_s']['server'])}).", "",
             f"## Latency per clip: DiST {PRESET} (224 px), onnxruntime vs PyTorch (fused)", "",
             f"| batch | onnxruntime fp32 ms/clip | PyTorch fp32 ms/clip | PyTorch {d} ms/clip "
             "| onnxruntime / PyTorch fp32 |", "|---|---|---|---|---|"]
    for r in lat:
        lines.append(f"| {r['batch']} | {r['onnxruntime_fp32_ms_per_clip']:.0f} | "
                     f"{r['pytorch_fp32_ms_per_clip']:.0f} | {r[f'pytorch_{d}_ms_per_clip']:.0f} | "
                     f"{r['onnxruntime_over_pytorch_fp32']:.2f} |")
    e = result["export"]
    lines += ["", f"Export verification (opset {e['opset']}): logits max |diff| "
              f"{e['max_abs_diff_logits']:.1e}, embeddings max |diff| {e['max_abs_diff_embeddings']:.1e}.", "",
              f"## Server round trip vs in-process predict ({rt['video_seconds']:g}-second video, "
              f"{rt['video_bytes'] / 2**20:.1f} MiB, {rt['views']} views)", "",
              "| server round trip s | in-process predict s | overhead | same top classes |", "|---|---|---|---|",
              f"| {rt['server_s']:.3f} | {rt['in_process_s']:.3f} | {100 * rt['overhead']:+.1f}% | "
              f"{rt['same_top_classes']} |", "",
              "The round trip is `POST /predict` (multipart upload over loopback, decode, 3 views, JSON) to "
              "`dist-video serve MODEL_FOLDER`; in-process is `predict_files` on the same file with the model "
              "folder's fused form made once, at the same (default) precision. Target: overhead at most 10%."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3, help="repetitions at batch 1")
    ap.add_argument("--large-repeats", type=int, default=3, help="repetitions at larger batches")
    ap.add_argument("--round-trips", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    import onnxruntime

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rt = round_trip(work, args.round_trips, args.seconds)
        (out / "deploy-round-trip.json").write_text(json.dumps(rt, indent=2) + "\n")
        lat, export = latency(work, args.batches, args.repeats, args.large_repeats)
    result = {"machine": machine("cpu"), "onnxruntime": onnxruntime.__version__, "repeats": args.repeats,
              "large_repeats": args.large_repeats, "latency": lat, "export": export, "round_trip": rt}
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "deploy.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
