"""Training cost of DiST against full fine-tuning and temporal adapters, side by side.

Time per training step (forward, backward, AdamW update) and peak memory, for a ViT-B/16-sized
CLIP with random weights at 224 x 224, 8 CLIP frames (16 dense frames for DiST), batches of
1, 2 and 4 clips, each method at its best supported precision:

- dist: frozen CLIP in bf16 without autograd, the branch under bf16 autocast;
- adapter: frozen bf16 CLIP with trainable adapters, back-propagating through CLIP;
- full-finetune: fp32 master weights under bf16 autocast;
- dist-sel, dist-ckpt: DiST with activation checkpointing ``selective`` / ``full``.

Each (method, batch) runs in a fresh subprocess so its peak memory (peak RSS on CPU,
``max_memory_allocated`` on CUDA) is its own; all runs happen in one invocation, methods
interleaved batch by batch, and the whole sweep is repeated ``--rounds`` times (times and peak
RSS are medians over rounds: on a shared machine the load changes between processes). Memory
added per extra clip is the least-squares slope of peak memory over batch size. On CPU a second
measure is taken too: the peak of the bytes held by PyTorch tensors during one profiled step
(the profiler's memory timeline), which is what CUDA's ``max_memory_allocated`` measures on a
GPU, without the allocator slack that peak RSS includes. The FLOP-bound limit of DiST's step
is (CLIP forward + 3 x branch forward FLOPs, attention products included) / the measured bf16
matrix-product rate.

    python benchmarks/train_cost.py                 # 3 rounds (about 15 minutes on 2 cores)
    python benchmarks/train_cost.py --batches 1 2 --steps 2 --rounds 1   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bf16_matmul_rate, build_method, machine, median_time  # noqa: E402

from dist_video.engine.optim import adamw  # noqa: E402
from dist_video.engine.train import resolve_precision  # noqa: E402
from dist_video.engine.distributed import use_fast_gpu_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: dist-sel / dist-ckpt: DiST with model.activation_checkpointing = selective / full
TRAINED_METHODS = ("dist", "dist-sel", "dist-ckpt", "adapter", "full-finetune")
CHECKPOINTING = {"dist-sel": "selective", "dist-ckpt": "full"}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def worker(method: str, batch: int, steps: int, arch: str, res: int, device_name: str,
           tensor_memory: bool = True) -> dict:
    """One (method, batch) measurement, in this process."""
    device = torch.device(device_name)
    use_fast_gpu_kernels(device)  # cuDNN autotuner and TF32 on a GPU, as `dist-video train` runs
    torch.set_grad_enabled(True)
    model = build_method("dist" if method in CHECKPOINTING else method, arch, num_frames=16, alpha=2, device=device)
    if method in CHECKPOINTING:  # activations recomputed in backward
        model.branch.activation_checkpointing = CHECKPOINTING[method]
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    optimizer = adamw(params, lr=1e-5)  # the trainer's AdamW (fused kernel where available)
    video = torch.randn(batch, 3, 16, res, res, device=device)
    labels = torch.randint(0, 400, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_bytes(device)

    amp_dtype = resolve_precision("auto", device) or torch.float32  # the trainer's choice for this device

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            logits = model(video)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    med, times = median_time(step, steps, warmup=1, device=device)
    run = {"method": method, "batch": batch, "step_seconds": med, "step_times": times,
           "peak_memory_bytes": peak_memory_bytes(device), "memory_before_steps_bytes": before,
           "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cpu" and tensor_memory:
        run["peak_tensor_bytes"] = peak_tensor_bytes(step)
    return run


def peak_tensor_bytes(step) -> int:
    """Peak bytes held by PyTorch tensors during one call of ``step`` (CPU), from the
    profiler's memory timeline: weights and optimizer state included, allocator slack not."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    finally:
        os.unlink(path)
    return int(max(sum(s) for s in sizes))


def dist_flop_bound(arch: str, res: int, device: torch.device, rate: float) -> dict:
    """Seconds per clip if DiST's step ran at the bf16 matmul rate: (CLIP fwd + 3 x branch fwd) FLOPs."""
    from dist_video.profiling import attention_macs, count_macs

    model = build_method("dist", arch, 16, 2, device).eval()
    video = torch.zeros(1, 3, 16, res, res, device=device)
    total = count_macs(model.encode_video, video)
    clip_macs = count_macs(model.clip_layers, video) + attention_macs(model, res, res)
    branch_macs = total - count_macs(model.clip_layers, video)
    flops = 2 * (clip_macs + 3 * branch_macs)
    return {"clip_forward_gflops": 2 * clip_macs / 1e9, "branch_forward_gflops": 2 * branch_macs / 1e9,
            "step_gflops_per_clip": flops / 1e9, "bf16_matmul_tflops": rate / 1e12,
            "seconds_per_clip": flops / rate}


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    batches = results["batches"]
    width = 0.8 / len(TRAINED_METHODS)
    for i, m in enumerate(TRAINED_METHODS):
        rows = [r for r in results["runs"] if r["method"] == m]
        axes[0].bar([b + (i - (len(TRAINED_METHODS) - 1) / 2) * width for b in range(len(batches))],
                    [r["step_seconds"] for r in rows], width, label=m)
        axes[1].plot(batches, [r["peak_memory_bytes"] / 2**30 for r in rows], "o-", label=m)
    bound = results["dist_flop_bound"]["seconds_per_clip"]
    axes[0].plot(range(len(batches)), [bound * b for b in batches], "k_", markersize=25,
                 label="DiST FLOP-bound limit")
    axes[0].set_xticks(range(len(batches)), [str(b) for b in batches])
    axes[0].set_xlabel("clips per step")
    axes[0].set_ylabel("seconds per training step")
    axes[1].set_xlabel("clips per step")
    axes[1].set_ylabel(f"peak memory ({'GPU' if results['machine']['device'] == 'cuda' else 'RSS'}, GiB)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    host = results["machine"]
    fig.suptitle(f"Training cost, {results['arch']} {results['resolution']}px, 8 CLIP frames "
                 f"({host['cpu'] if host['device'] == 'cpu' else host.get('gpu')})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    ms = TRAINED_METHODS
    rows = ["| clips/step | " + " | ".join(f"{m} s/step" for m in ms) +
            " | DiST / full-FT | DiST / adapter | DiST / FLOP bound | dist-sel / full-FT | dist-ckpt / full-FT |",
            "|---" * 11 + "|"]
    bound = results["dist_flop_bound"]["seconds_per_clip"]
    for b in results["batches"]:
        t = {r["method"]: r["step_seconds"] for r in results["runs"] if r["batch"] == b}
        rows.append(f"| {b} | " + " | ".join(f"{t[m]:.2f}" for m in ms) +
                    f" | {t['dist'] / t['full-finetune']:.2f} | {t['dist'] / t['adapter']:.2f} | "
                    f"{t['dist'] / (bound * b):.2f} | {t['dist-sel'] / t['full-finetune']:.2f} | "
                    f"{t['dist-ckpt'] / t['full-finetune']:.2f} |")
    peak = "GPU max_memory_allocated" if results["machine"]["device"] == "cuda" else "peak RSS"
    measures = [(f"memory added per clip ({peak} slope)", results["memory_per_clip_bytes"])]
    if "tensor_memory_per_clip_bytes" in results:
        measures.append(("memory added per clip (peak tensor bytes slope)", results["tensor_memory_per_clip_bytes"]))
    for title, mem in measures:
        rows += ["", f"| {title} | MiB | / full-FT | / adapter |", "|---|---|---|---|"]
        for m in ms:
            rows.append(f"| {m} | {mem[m] / 2**20:.0f} | {mem[m] / mem['full-finetune']:.2f} | "
                        f"{mem[m] / mem['adapter']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after 1 warm-up step)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="whole sweeps; each (method, batch) reports the median over rounds")
    ap.add_argument("--no-tensor-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="ViT-B/16")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps, args.arch, args.res, args.device,
                                tensor_memory=not args.no_tensor_memory)))
        return

    device = torch.device(args.device)
    rounds: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):  # whole sweeps, one after another: load changes hit every method alike
        for b in args.batches:
            for m in TRAINED_METHODS:
                cmd = [sys.executable, __file__, "--worker", m, str(b), "--steps", str(args.steps), "--arch",
                       args.arch, "--res", str(args.res), "--device", args.device]
                if r > 0:
                    cmd.append("--no-tensor-memory")  # measured once (the profiled step is slow)
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                rounds.setdefault((m, b), []).append(run)
                tensors = f", tensors {run['peak_tensor_bytes'] / 2**30:.2f} GiB" if "peak_tensor_bytes" in run else ""
                print(f"round {r + 1}/{args.rounds} {m:>14s}  batch {b}: {run['step_seconds']:.2f} s/step, "
                      f"peak {run['peak_memory_bytes'] / 2**30:.2f} GiB{tensors}", flush=True)
    runs = []
    for (m, b), rs in rounds.items():
        run = dict(rs[0])
        run["round_step_seconds"] = [x["step_seconds"] for x in rs]
        run["step_seconds"] = statistics.median(run["round_step_seconds"])
        run["round_peak_memory_bytes"] = [x["peak_memory_bytes"] for x in rs]
        run["peak_memory_bytes"] = statistics.median(run["round_peak_memory_bytes"])
        runs.append(run)
    rate = bf16_matmul_rate(device)
    results = {
        "machine": machine(device), "arch": args.arch, "resolution": args.res, "clip_frames": 8, "dense_frames": 16,
        "batches": args.batches, "timed_steps": args.steps, "rounds": args.rounds, "runs": runs,
        "dist_flop_bound": dist_flop_bound(args.arch, args.res, device, rate),
        "command": " ".join(["python", "benchmarks/train_cost.py"] + sys.argv[1:]),
    }
    results["memory_per_clip_bytes"] = {
        m: slope([r["batch"] for r in runs if r["method"] == m],
                 [r["peak_memory_bytes"] for r in runs if r["method"] == m])
        for m in TRAINED_METHODS}
    if all("peak_tensor_bytes" in r for r in runs):
        results["tensor_memory_per_clip_bytes"] = {
            m: slope([r["batch"] for r in runs if r["method"] == m],
                     [r["peak_tensor_bytes"] for r in runs if r["method"] == m])
            for m in TRAINED_METHODS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else "_cuda"
    (out / f"train_cost{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"train_cost{suffix}.png")
    md = table(results)
    (out / f"train_cost{suffix}.md").write_text(f"Machine: {results['machine']}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
