"""The engine through the command line: train, evaluate, predict, info, resume after SIGKILL,
SIGTERM, 2-process Gloo, NaN policy and the one-line errors.

Everything runs on a tiny CLIP (the official-tiny fixture's, 64 px, patch 16, 4 blocks) fed
32 px synthetic moving-digit videos of 8 frames, so each training run takes seconds."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_video.engine.checkpoint import load_training_state
from dist_video.engine.data import ResumableBatchSampler

from cli_helpers import cli_env, run_cli, start_cli
from data_helpers import tiny_run_args
from resume_helpers import kill_when, reached_step, wait_until

ASSETS = Path(__file__).parent / "assets"
TIMEOUT = 240


@pytest.fixture(scope="module")
def data(synthetic_videos) -> Path:
    return synthetic_videos(32, 12)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments for a seconds-long DiST run on ``data`` into ``out``."""
    return tiny_run_args(data, out, *extra)


def cli(*args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = run_cli(*args, env=cli_env(**(env or {})), timeout=TIMEOUT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"dist-video {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == [lines[-1]], proc.stderr  # progress lines may come first; one error line, last
    assert lines[-1].startswith(f"dist-video {command}: error: "), lines[-1]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


# ----------------------------------------------------------------------------- sampler

def test_resumable_batch_sampler_shards_and_resumes():
    single = list(ResumableBatchSampler(50, 6, seed=3, epoch=2))
    assert len(single) == 50 // 6 and all(len(b) == 6 for b in single)
    assert len({i for b in single for i in b}) == 48  # no repeats within an epoch
    # two processes with half the batch each cover exactly the single-process global batches
    ranks = [list(ResumableBatchSampler(50, 3, seed=3, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    # resuming at batch 5 gives the same remaining batches
    assert list(ResumableBatchSampler(50, 6, seed=3, epoch=2, start_batch=5)) == single[5:]
    # another epoch, another order
    assert list(ResumableBatchSampler(50, 6, seed=3, epoch=3)) != single


# ----------------------------------------------------------------------------- the happy path

@pytest.mark.slow
def test_train_evaluate_predict_info_through_the_cli(data, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", *tiny(data, run, "train.eval_every=1"))
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "trainable parameters;" in proc.stderr and "[final] top-1" in proc.stderr  # progress messages (INFO)
    for key in ("top1", "top5", "mean_class_accuracy"):
        assert 0.0 <= final[key] <= 1.0
    assert final["num_videos"] == 12
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "training_curves.png", "model/config.json",
                 "model/model.safetensors", "checkpoints/last.pt", "eval/metrics.json", "eval/predictions.csv",
                 "eval/confusion_matrix.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 9))  # 32 clips / (4 x 2 accumulation) = 4 updates x 2 epochs
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 8
    # only the branch and the head were trained; CLIP is referenced, not copied
    assert not (run / "model" / "clip.safetensors").exists()
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["preprocess"]["num_views"] == 2 and meta["preprocess"]["crop_size"] == 32

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["top1"] == final["top1"] and metrics["num_videos"] == 12
    assert len(metrics["per_class_accuracy"]) == 12
    rows = (run / "eval" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 12

    # stand-alone evaluation of the saved model gives the same numbers
    proc = cli("evaluate", str(run / "model"), "--config", str(run / "config.yaml"), "--output",
               str(tmp_path / "eval"), "--quiet")
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again == {k: final[k] for k in again}
    assert "metrics written to" not in proc.stderr  # --quiet: warnings and errors only

    # prediction prints probabilities of known classes; JSON output is parseable
    video = data / "val" / "00000.mp4"
    proc = cli("predict", str(run / "model"), str(video), "--topk", "3", "--json")
    result = json.loads(proc.stdout)
    classes = (data / "classes.txt").read_text().split("\n")
    assert result[0]["views"] == 2 and len(result[0]["top"]) == 3
    probs = [t["probability"] for t in result[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert all(t["class"] in classes for t in result[0]["top"])
    # the same video in predictions.csv has the same top class
    row = next(r for r in rows[1:] if r.split(",")[0].endswith("00000.mp4"))
    assert result[0]["top"][0]["class"] in row

    proc = cli("info", str(run / "model"), "--json")
    info = json.loads(proc.stdout)
    assert info["parameters"]["trainable"] == summary["trainable_params"]
    assert info["input"] == {"frames": 8, "clip_frames": 4, "resolution": 32}
    assert 0 < info["gmacs_per_view"]["branch"] < info["gmacs_per_view"]["total"]


@pytest.mark.slow
def test_python_predict_clip(data, tmp_path):
    from dist_video.engine.data import test_clips_of_file
    from dist_video.engine.predict import predict_clip
    from dist_video.loading import load_model

    run = tmp_path / "run"
    cli("train", *tiny(data, run, "optim.epochs=1", "train.max_steps=1"))
    loaded = load_model(str(run / "model"), device="cpu")
    model, preprocess = loaded.model, loaded.preprocess
    clips = test_clips_of_file(data / "val" / "00003.mp4", preprocess, num_frames=8)
    assert clips.shape == (2, 3, 8, 32, 32)
    top = predict_clip(model, clips[0], topk=4)
    assert len(top) == 1 and len(top[0]) == 4
    assert abs(sum(p for _, p in predict_clip(model, clips[0], topk=12)[0]) - 1.0) < 1e-4


# ----------------------------------------------------------------------------- never lose a run

@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(data, tmp_path):
    extra = ("train.checkpoint_every_steps=1", "data.workers=0")
    ref = tmp_path / "uninterrupted"
    cli("train", *tiny(data, ref, *extra))

    run = tmp_path / "killed"
    proc = start_cli("train", *tiny(data, run, *extra))
    # mid-epoch 0 (4 updates per epoch)
    kill_when(proc, reached_step(run / "metrics.jsonl", 3), timeout=TIMEOUT, what="step 3")
    assert not (run / "model").exists()
    resumed = cli("train", *tiny(data, run, *extra))
    assert "resumed from" in resumed.stderr

    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (json.loads((ref / "eval" / "metrics.json").read_text())
            == json.loads((run / "eval" / "metrics.json").read_text()))
    assert (ref / "eval" / "predictions.csv").read_text() == (run / "eval" / "predictions.csv").read_text()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 9))  # the log was cut back to the checkpoint: no duplicate steps


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    run = tmp_path / "run"
    proc = start_cli("train", *tiny(data, run, "optim.epochs=50"))
    wait_until(proc, reached_step(run / "metrics.jsonl", 2), timeout=TIMEOUT, what="step 2")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert "SIGTERM received" in err and "checkpoint saved" in err
    state = load_training_state(run / "checkpoints" / "last.pt")
    assert state["step"] >= 2


# ----------------------------------------------------------------------------- several processes

@pytest.mark.slow
def test_two_process_gloo_training_and_evaluation(data, tmp_path):
    # the same global batch (2 processes x 2 clips x accumulation 2 = 4 x 2 on one process)
    common = ("train.device=cpu", "train.precision=fp32", "model.clip_dtype=fp32", "augment.mixup_alpha=0.0",
              "augment.cutmix_alpha=0.0", "train.max_steps=3")
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dist_video.cli", "train", *tiny(data, two, *common, "train.batch_size=2")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    two_metrics = json.loads((two / "eval" / "metrics.json").read_text())

    # the 2-process evaluation equals a 1-process evaluation of the same weights
    one_eval = tmp_path / "one-eval"
    cli("evaluate", str(two / "model"), "--config", str(two / "config.yaml"), "--output", str(one_eval), "--quiet")
    one_metrics = json.loads((one_eval / "metrics.json").read_text())
    assert one_metrics.pop("model") == str(two / "model")
    assert one_metrics == two_metrics
    assert (one_eval / "predictions.csv").read_text() == (two / "eval" / "predictions.csv").read_text()

    # and the 2-process training equals 1-process training with the same global batch
    one = tmp_path / "one"
    cli("train", *tiny(data, one, *common, "train.batch_size=4"))
    # Equal up to float summation order. atol: attention key biases get a mathematically zero
    # gradient, whose rounding noise Adam normalises into updates; 1e-4 is 1% of one Adam step
    # (branch lr 1e-2) and far below what a wrong gradient average (x2) would give.
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


# ----------------------------------------------------------------------------- failures

@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(data, tmp_path):
    huge = ("optim.lr=1e36", "optim.grad_clip=null", "optim.warmup_epochs=0")
    proc = cli("train", *tiny(data, tmp_path / "stop", *huge), check=False)
    line = one_line_error(proc, "train")
    assert "non-finite loss" in line and "at step 2" in line
    assert "no checkpoint was written yet" in line  # checkpoints only at epoch ends here

    proc = cli("train", *tiny(data, tmp_path / "skip", *huge, "train.nonfinite_loss=skip"), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] > 0
    assert "skipped" in proc.stderr


@pytest.mark.slow
def test_bad_config_keys_name_the_nearest_valid_key(data, tmp_path):
    proc = cli("train", *tiny(data, tmp_path / "r", "optim.lrr=0.1"), check=False)
    assert "optim.lr" in one_line_error(proc, "train")
    proc = cli("train", *tiny(data, tmp_path / "r", "train.batch_size=many"), check=False)
    assert "train.batch_size" in one_line_error(proc, "train")
    assert not (tmp_path / "r").exists()  # nothing was written


@pytest.mark.slow
def test_missing_clip_weights(data, tmp_path):
    proc = cli("train", *tiny(data, tmp_path / "r", f"model.clip={tmp_path / 'nope.pt'}"), check=False)
    assert "nope.pt" in one_line_error(proc, "train")


@pytest.mark.slow
def test_unwritable_output_folder(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        proc = cli("train", *tiny(data, locked / "run"), check=False)
        line = one_line_error(proc, "train")
        assert str(locked) in line and "writ" in line
    finally:
        locked.chmod(0o700)


@pytest.mark.slow
def test_unwritable_output_folder_as_a_file(data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = cli("train", *tiny(data, afile), check=False)
    assert str(afile) in one_line_error(proc, "train")


@pytest.mark.slow
def test_mismatched_checkpoints(data, tmp_path):
    run = tmp_path / "run"
    cli("train", *tiny(data, run, "optim.epochs=1", "train.max_steps=1"))
    # resuming with another architecture
    proc = cli("train", *tiny(data, run, "optim.epochs=1", "model.dist.temporal_dim=32"), check=False)
    line = one_line_error(proc, "train")
    assert "temporal_dim" in line and "last.pt" in line
    # a model trained on other classes
    other = tmp_path / "other"
    other.mkdir()
    names = (data / "classes.txt").read_text().split()
    (other / "classes.txt").write_text("\n".join(["a", "b", "c"]) + "\n")
    proc = cli("evaluate", str(run / "model"), "--config", str(run / "config.yaml"), "--set",
               f"data.classes={other / 'classes.txt'}", "--output", str(tmp_path / "e"), "--quiet", check=False)
    line = one_line_error(proc, "evaluate")
    assert "class" in line
    assert names
    # an initialisation from a model with another architecture
    proc = cli("train", *tiny(data, tmp_path / "init", f"model.init={run / 'model'}", "model.dist.num_frames=16",
                              "optim.epochs=1"), check=False)
    assert "frames" in one_line_error(proc, "train")


def test_full_disk_is_reported_before_training(tmp_path, monkeypatch):
    import shutil as _shutil

    from dist_video.engine import checkpoint

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=5 << 20))
    with pytest.raises(OSError, match=r"has 5 MiB free, but checkpoints need about 64 MiB"):
        checkpoint.check_output_dir(tmp_path / "run", need_bytes=64 << 20)
    assert checkpoint.check_output_dir(tmp_path / "run", need_bytes=1 << 20).is_dir()


@pytest.mark.slow
def test_read_only_filesystem_output_is_reported(data):
    target = Path("/proc/dist-video-run")  # cannot be created, not even by root
    proc = cli("train", *tiny(data, target), check=False)
    line = one_line_error(proc, "train")
    assert str(target) in line and "cannot be written" in line


_PAGE_FAULTS = r"""
import resource, sys, torch
from dist_video.engine.allocator import keep_freed_memory
applied = keep_freed_memory()
def faults_of_a_fresh_64mib_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, written once, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(12):  # the heap settles: until freed neighbours coalesce, a freed block can be a little
    # too small for the next 64-byte-aligned request (posix_memalign's padding), depending on the layout
    faults_of_a_fresh_64mib_tensor()
print(applied, sum(faults_of_a_fresh_64mib_tensor() for _ in range(3)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is for glibc")
def test_keep_freed_memory_reuses_large_blocks_instead_of_new_pages():
    def run(env):
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    applied, faults = run({"DIST_VIDEO_KEEP_FREED_MEMORY": "1"})
    off, faults_off = run({"DIST_VIDEO_KEEP_FREED_MEMORY": "0"})
    assert applied and not off
    # 64 MiB are 16,384 pages of 4 KiB: without the setting they fault again on every
    # allocation (3 x 16,384); with it later allocations reuse the earlier ones' memory.
    assert faults_off > 3 * 8000
    assert faults < 1000


# ----------------------------------------------------------------------------- the engine asks the model

def _models(tiny_clip):
    """DiST and every baseline on a tiny CLIP, each with a linear head."""
    from dist_video import DiSTConfig, DiSTVideoModel
    from dist_video.baselines import AdapterClassifier, BaselineConfig, FrozenMeanClassifier, FullFinetuneClassifier

    base = BaselineConfig(num_frames=4, alpha=2, adapter_dim=8)
    models = [DiSTVideoModel(tiny_clip(width=64, layers=2), DiSTConfig(num_frames=4, alpha=2, temporal_dim=16,
                                                                       integration_dim=64), clip_dtype="fp32")]
    models += [cls(tiny_clip(width=64, layers=2), base, clip_dtype="fp32")
               for cls in (FrozenMeanClassifier, FullFinetuneClassifier, AdapterClassifier)]
    return [m.set_linear_head(3) for m in models]


def test_weight_decay_groups_come_from_the_model_and_are_unchanged(tiny_clip):
    from dist_video.config import OptimConfig
    from dist_video.engine.optim import parameter_groups

    # The rule the optimizer applied itself before models declared no_weight_decay().
    tokens = ("cls_token", "positional_embedding", "class_embedding", "aggregated_cls_token",
              "aggregated_spatial_cls_token", "token_embedding")
    cfg = OptimConfig(weight_decay=0.05, branch_lr_mult=10)
    for model in _models(tiny_clip):
        before: dict[str, list[str]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                decay = p.ndim >= 2 and not any(t in name for t in tokens)
                group = f"{'clip' if name.startswith('clip.') else 'new'}-{'decay' if decay else 'no_decay'}"
                before.setdefault(group, []).append(name)
        groups = parameter_groups(model, cfg)
        assert {g["group_name"]: g["param_names"] for g in groups} == before, model.method
        for g in groups:
            assert g["weight_decay"] == (0.0 if g["group_name"].endswith("no_decay") else 0.05)
            assert g["lr_scale"] == (10 if g["group_name"].startswith("new") else 1.0)
    dist, full = _models(tiny_clip)[0], _models(tiny_clip)[2]
    assert {"branch.aggregated_cls_token", "head.bias"} <= dist.no_weight_decay()
    assert "head.weight" not in dist.no_weight_decay()
    assert {"clip.visual.class_embedding", "clip.visual.positional_embedding"} <= full.no_weight_decay()


def test_grad_checkpointing_is_set_through_the_model(tiny_clip):
    from dist_video.config import ModelConfig
    from dist_video.engine.builder import build_classifier

    dist, *baselines = _models(tiny_clip)
    for mode, expected in ((True, "full"), ("selective", "selective"), (False, "off"), ("off", "off")):
        assert dist.set_grad_checkpointing(mode) is dist and dist.branch.activation_checkpointing == expected
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        dist.set_grad_checkpointing("some")
    for model in baselines:
        model.set_grad_checkpointing(False)
        model.set_grad_checkpointing("off")
        with pytest.raises(ValueError, match=f"not available for the '{model.method}' method"):
            model.set_grad_checkpointing("selective")
    built = build_classifier(ModelConfig(activation_checkpointing="selective"), tiny_clip(width=64, layers=2))
    assert built.branch.activation_checkpointing == "selective"
    with pytest.raises(ValueError, match="frozen-mean"):
        build_classifier(ModelConfig(method="frozen-mean", activation_checkpointing=True),
                         tiny_clip(width=64, layers=2))


def test_methods_register_themselves():
    import dist_video
    from dist_video.classifier import VideoClassifier, model_class

    assert model_class("dist") is dist_video.DiSTVideoModel
    assert model_class("frozen-mean") is dist_video.FrozenMeanClassifier
    assert model_class("adapter") is dist_video.AdapterClassifier
    with pytest.raises(ValueError, match="unknown method 'nope': expected one of dist, frozen-mean, full-finetune, "
                                         "adapter"):
        model_class("nope")

    class Renamed(dist_video.FrozenMeanClassifier):  # keeps its parent's method: not registered again
        pass

    assert model_class("frozen-mean") is dist_video.FrozenMeanClassifier
    with pytest.raises(TypeError, match="method 'dist' is taken"):
        type("Impostor", (VideoClassifier,), {"method": "dist"})


def test_model_config_is_read_through_one_function(tiny_clip, tmp_path):
    from dist_video.classifier import FORMAT_UPGRADES, FORMAT_VERSION, VideoClassifier, read_model_config

    assert len(FORMAT_UPGRADES) == FORMAT_VERSION - 1  # one upgrade step per older version
    model = _models(tiny_clip)[1]
    model.save_pretrained(tmp_path / "m", metadata={"preprocess": {"crop_size": 64}})
    meta = read_model_config(tmp_path / "m")
    assert meta["format"] == "dist-video" and meta["format_version"] == FORMAT_VERSION
    assert meta["method"] == "frozen-mean" and meta["preprocess"] == {"crop_size": 64}
    with pytest.raises(ValueError, match="may not replace"):
        model.save_pretrained(tmp_path / "m2", metadata={"method": "dist"})
    newer = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**newer, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="format_version"):
        VideoClassifier.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_model_config(tmp_path)


def test_load_clip_reads_builtin_encoders():
    import dist_video
    from dist_video.clip_loaders import BUILTIN_ENCODERS, resolve_clip_path

    clip = dist_video.load_clip("builtin:digits")
    assert clip.config.image_size == 48 and not clip.has_text and clip.tokenizer is None
    assert set(BUILTIN_ENCODERS) == {"digits"} and resolve_clip_path("some/file.pt") == "some/file.pt"
    with pytest.raises(ValueError, match="unknown built-in encoder 'builtin:nope'; available: builtin:digits"):
        dist_video.load_clip("builtin:nope")


def test_library_calls_leave_malloc_alone(monkeypatch):
    """Only the command line and the benchmarks change the process's allocator settings."""
    from dist_video.engine import allocator, distributed

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1))
    env = distributed.setup_distributed("cpu")
    assert env.device.type == "cpu" and calls == []
    assert not hasattr(distributed, "keep_freed_memory")
