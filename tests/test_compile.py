"""``torch.compile`` as an option (issue 25): ``fuse(model, compile=True)`` and
``train.compile=true`` compute what the eager forms compute, within floating-point tolerance.
Compilation takes tens of seconds on a CPU: slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_video import DiSTConfig, DiSTVideoModel, fuse
from dist_video.config import load_config
from dist_video.engine.checkpoint import load_training_state
from dist_video.data.synthetic import make_synthetic

from data_helpers import TINY_CLIP


def _model(tiny_clip) -> DiSTVideoModel:
    torch.manual_seed(0)
    return DiSTVideoModel(tiny_clip(width=64, layers=2), DiSTConfig(num_frames=4, temporal_dim=8, integration_dim=64,
                                                                    pooling_layers=1),
                          clip_dtype="fp32").set_linear_head(5).eval()


def test_fuse_without_compile_is_the_plain_inference_form(tiny_clip):
    model = _model(tiny_clip)
    fused = fuse(model, torch.float32)
    assert type(fused) is type(model.fuse(torch.float32))  # not wrapped
    assert fuse(model, torch.float32, compile=True) is not None


@pytest.mark.slow
def test_compiled_inference_form_equals_eager(tiny_clip):
    torch._dynamo.reset()
    model = _model(tiny_clip)
    eager = fuse(model, torch.float32)
    compiled = fuse(model, torch.float32, compile=True)
    assert compiled is not eager and hasattr(compiled, "_orig_mod")  # a torch.compile module
    torch.manual_seed(1)
    for batch in (1, 3):
        video = torch.randn(batch, 3, 4, 64, 64)
        with torch.no_grad():
            reference = eager(video)
            out = compiled(video)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_train=8, num_val=2, seed=0, size=32, num_frames=8, workers=1)
    return out


def _losses(data: Path, out: Path, compile_: bool) -> list[float]:
    from dist_video.engine.train import train

    sets = [f"model.clip={TINY_CLIP}", "model.head=linear", "model.dist.num_frames=8", "model.dist.temporal_dim=16",
            "model.dist.integration_dim=64", "data.format=csv", f"data.root={data}", f"data.train={data / 'train.csv'}",
            f"data.val={data / 'val.csv'}", f"data.classes={data / 'classes.txt'}", "data.crop_size=32",
            "data.test_scale=32", "data.num_views=1", "data.workers=0", "augment.mixup_alpha=0.0",
            "augment.cutmix_alpha=0.0", "optim.epochs=1", "train.batch_size=2", "train.eval_every=0",
            "train.log_every=1", "train.max_steps=3", "train.precision=fp32", "model.clip_dtype=fp32",
            "train.device=cpu", f"train.compile={str(compile_).lower()}", f"output_dir={out}"]
    result = train(load_config(None, None, sets), resume=False, progress=False)
    assert result.step == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.slow
def test_training_compiled_gives_the_eager_loss_curve(synthetic, tmp_path):
    torch._dynamo.reset()
    eager = _losses(synthetic, tmp_path / "eager", False)
    compiled = _losses(synthetic, tmp_path / "compiled", True)
    assert len(eager) == 3 and len(set(eager)) > 1  # the weights move: the later losses test the updates
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    # the checkpointed weights are the module's own names (no compile wrapper in them)
    state = load_training_state(tmp_path / "compiled" / "checkpoints" / "last.pt")["model"]
    assert not any("_orig_mod" in k for k in state)


@pytest.mark.slow
def test_two_process_training_compiled_around_ddp_gives_the_eager_weights(synthetic, tmp_path):
    """``train.compile`` under torchrun: DDP inside, ``torch.compile`` outside (its all-reduce
    overlaps the compiled backward), gradient accumulation through ``no_sync``; the weights equal
    the eager 2-process run's within floating-point tolerance."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from data_helpers import tiny_run_args

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    weights, losses = {}, {}
    for compile_ in (False, True):
        out = tmp_path / f"compile-{compile_}"
        args = tiny_run_args(synthetic, out, "train.device=cpu", "train.precision=fp32", "model.clip_dtype=fp32",
                             "augment.mixup_alpha=0.0", "augment.cutmix_alpha=0.0", "train.max_steps=3",
                             "train.batch_size=2", "optim.epochs=3", f"train.compile={str(compile_).lower()}")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "dist_video.cli", "train", *args], capture_output=True, text=True,
                              timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 process(es)" in proc.stderr
        weights[compile_] = load_file(out / "model" / "model.safetensors")
        losses[compile_] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                            if json.loads(line)["kind"] == "train"]
    assert len(losses[False]) == 3 and len(set(losses[False])) > 1  # the later losses test the updates
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)
    assert weights[True].keys() == weights[False].keys()  # no compile or DDP wrapper in the names
    # Adam turns rounding noise in a near-zero gradient into an update of up to the learning rate,
    # so a few elements may differ; a wrong reduction across the processes would move nearly all
    differing = sum(int(((weights[True][k] - weights[False][k]).abs() > 1e-4).sum()) for k in weights[False])
    total = sum(w.numel() for w in weights[False].values())
    assert differing <= total // 1000, (differing, total)
