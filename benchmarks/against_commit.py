"""This tree against an earlier commit, side by side: the model benchmark and the predict path.

The commit is unpacked (``git archive``) into a temporary folder; each round runs, in turn, the
earlier tree and this one as separate processes with the same Python (``PYTHONPATH`` set to each
tree's ``src``), so machine noise falls on both alike:

1. ``model``: each tree's ``benchmarks/inference.py --no-costs`` (DiST and CLIP alone, K400
   ViT-B/16 8+16f in the fused form, batches of 1 / 4 / 16 clips); the repetitions of all rounds
   are pooled per tree and batch, and their medians compared.
2. ``predict``: ``python -m dist_video.cli predict MODEL VIDEOS --json`` on Kinetics-like videos
   (``loader.make_video``: 10 s, 340 x 256, 30 fps, H.264), the model a randomly initialised K400
   ViT-B/16 8+16f saved by each tree with the same seed; the wall time of the whole command.

    python benchmarks/against_commit.py f221864                       # both parts, 3 rounds
    python benchmarks/against_commit.py f221864 --part predict --videos 4 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SAVE_MODEL = """
import sys, torch
sys.path.insert(0, "benchmarks")
from common import build_method
model = build_method("dist", "ViT-B/16", 16, 2, torch.device("cpu"), dist_preset="k400-vit-b16-8+16f")
model.save_pretrained(sys.argv[1])
"""


def unpack(commit: str, folder: Path) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return sha


def run(tree: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    done = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"against_commit: {' '.join(args[:3])} failed in {tree}:\n{done.stderr[-2000:]}")
    return done


def model_part(trees: dict[str, Path], rounds: int, repeats: int, batches: list[int], work: Path) -> dict:
    pooled = {name: {} for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            out = work / f"model-{name}-{r}"
            run(tree, ["benchmarks/inference.py", "--no-costs", "--repeats", str(repeats), "--device", "cpu",
                       "--batches", *map(str, batches), "--out", str(out)])
            for row in json.loads((out / "inference.json").read_text())["throughput"]:
                for model, times in row["times"].items():
                    pooled[name].setdefault(f"{model}@{row['batch']}", []).extend(times)
            print(f"round {r + 1}/{rounds}: {name} done", flush=True)
    rows = []
    for b in batches:
        for model in ("dist", "clip"):
            key = f"{model}@{b}"
            base, head = (statistics.median(pooled[n][key]) for n in ("base", "head"))
            rows.append({"model": model, "batch": b, "base_seconds": base, "head_seconds": head,
                         "head_over_base_time": head / base, "repetitions": len(pooled["head"][key])})
    return {"rows": rows, "times": pooled}


def predict_part(trees: dict[str, Path], rounds: int, count: int, work: Path) -> dict:
    from loader import make_video

    videos = work / "videos"
    videos.mkdir()
    paths = [videos / f"kinetics_like_{i:02d}.mp4" for i in range(count)]
    for i, path in enumerate(paths):
        make_video(path, i, None)
    models = {name: work / f"model-{name}" for name in trees}
    for name, tree in trees.items():
        run(tree, ["-c", SAVE_MODEL, str(models[name])])
    seconds = {name: [] for name in trees}
    outputs = {}
    for r in range(rounds):
        for name, tree in trees.items():
            t = time.perf_counter()
            done = run(tree, ["-m", "dist_video.cli", "predict", str(models[name]), *map(str, paths),
                              "--json", "--device", "cpu"])
            seconds[name].append(time.perf_counter() - t)
            outputs[name] = json.loads(done.stdout)
            print(f"round {r + 1}/{rounds}: {name} predict {seconds[name][-1]:.1f} s", flush=True)
    top = {name: [(v["top"][0]["class"], round(v["top"][0]["probability"], 3)) for v in out]
           for name, out in outputs.items()}
    base, head = statistics.median(seconds["base"]), statistics.median(seconds["head"])
    return {"videos": count, "seconds": seconds, "base_seconds": base, "head_seconds": head,
            "head_over_base_time": head / base, "same_top_class": top["base"] == top["head"], "top": top}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# This tree ({result['head']}) against {result['base']}", "",
             f"`python benchmarks/against_commit.py {result['base']}` on {m['date']}: {m['cpu']} "
             f"({m['cores']} cores), torch {m['torch']}; {result['rounds']} rounds, the two trees in turn."]
    if "model" in result:
        lines += ["", "## Model (fused form, K400 ViT-B/16 8+16f, 224 px): medians of the pooled repetitions",
                  "", "| model | batch | earlier (s) | this tree (s) | this / earlier | repetitions each |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {'DiST' if r['model'] == 'dist' else 'CLIP alone'} | {r['batch']} | {r['base_seconds']:.3f} | "
                  f"{r['head_seconds']:.3f} | {r['head_over_base_time']:.3f} | {r['repetitions']} |"
                  for r in result["model"]["rows"]]
    if "predict" in result:
        p = result["predict"]
        lines += ["", f"## `dist-video predict` on {p['videos']} Kinetics-like videos (whole command, medians)", "",
                  "| earlier (s) | this tree (s) | this / earlier | same top classes |", "|---|---|---|---|",
                  f"| {p['base_seconds']:.1f} | {p['head_seconds']:.1f} | {p['head_over_base_time']:.3f} | "
                  f"{p['same_top_class']} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the earlier commit")
    ap.add_argument("--part", choices=["model", "predict", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="model part: repetitions per round")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--videos", type=int, default=12, help="predict part: videos per command")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="against-commit-") as tmp:
        work = Path(tmp)
        base = unpack(args.base, work / "base")
        trees = {"base": work / "base", "head": ROOT}
        result = {"machine": machine("cpu"), "base": base, "head": head + ("+changes" if dirty else ""),
                  "rounds": args.rounds}
        if args.part in ("model", "both"):
            result["model"] = model_part(trees, args.rounds, args.repeats, args.batches, work)
        if args.part in ("predict", "both"):
            result["predict"] = predict_part(trees, args.rounds, args.videos, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "against_commit.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "against_commit.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
