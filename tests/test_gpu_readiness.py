"""GPU readiness (issue 16), tested on CPU: the CUDA facts each finding depends on (compute
capability, visible GPUs, autocast's output dtypes, the FLOP counter's kernels) are emulated by
patching, and the multi-process evaluation runs on Gloo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_video.classifier import bf16_supported, resolve_clip_dtype
from dist_video.engine import checkpoint, distributed
from dist_video.engine.train import resolve_precision

ASSETS = Path(__file__).parent / "assets"
TINY_CLIP = ASSETS / "official-tiny" / "clip_openai_state_dict.pt"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpus(monkeypatch):
    """Emulate a CUDA machine: ``gpus(count, capability)``. ``torch.cuda.is_bf16_supported``
    says True whatever the capability, as PyTorch does on Volta and Turing (emulated bf16)."""

    def make(count: int = 1, capability: tuple[int, int] = (8, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        set_devices = []
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_devices.append(torch.device(d)))
        return set_devices

    return make


@pytest.fixture
def host_without_bf16(monkeypatch):
    """A host CPU without native bf16 (AMD EPYC Rome/Milan)."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)


# ----------------------------------------------------------------------------- 1. precision per GPU generation

@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(gpus, capability, expected):
    gpus(1, capability)  # V100 7.0, T4 7.5, A100 8.0, A10/RTX 30xx 8.6, H100 9.0
    cuda = torch.device("cuda:0")
    assert bf16_supported(cuda) is (expected == torch.bfloat16)
    assert resolve_precision("auto", cuda) == expected  # fp16: the trainer adds a GradScaler
    assert resolve_clip_dtype("auto", cuda) == expected
    assert resolve_precision("fp32", cuda) is None and resolve_clip_dtype("fp32", cuda) == torch.float32


# ----------------------------------------------------------------------------- 2. CLIP's dtype from the device

def _saved_model(tiny_clip, folder: Path) -> Path:
    from dist_video import DiSTConfig, DiSTVideoModel

    model = DiSTVideoModel(tiny_clip(width=64, layers=2), DiSTConfig(num_frames=4, temporal_dim=8,
                                                                     integration_dim=64, pooling_layers=1),
                           clip_dtype="fp32")
    model.set_linear_head(3, ["a", "b", "c"])
    return model.save_pretrained(folder)


@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_predict_decides_the_clip_dtype_for_the_gpu_not_the_host_cpu(tiny_clip, tmp_path, gpus, host_without_bf16,
                                                                     monkeypatch, capability, expected):
    from dist_video.classifier import VideoClassifier
    from dist_video.loading import load_model

    folder = _saved_model(tiny_clip, tmp_path / "model")
    assert resolve_clip_dtype("auto", "cpu") == torch.float32  # the host alone would say fp32
    gpus(1, capability)
    moved = []
    monkeypatch.setattr(VideoClassifier, "to", lambda self, device: moved.append(torch.device(device)) or self)
    model = load_model(str(folder), device="cuda").model
    assert moved == [torch.device("cuda:0")]
    assert model.clip_dtype == expected


def test_an_auto_clip_dtype_follows_the_model_to_another_device(tiny_clip, monkeypatch):
    """A model built on the CPU with ``clip_dtype="auto"`` and moved elsewhere takes that device's
    precision (emulated: the CPU without bf16, the meta device with it); an explicit dtype and a
    dtype-only cast are left alone."""
    from dist_video import DiSTConfig, DiSTVideoModel
    from dist_video import classifier

    monkeypatch.setattr(classifier, "bf16_supported", lambda device: torch.device(device).type == "meta")
    config = DiSTConfig(num_frames=4, temporal_dim=8, integration_dim=64, pooling_layers=1)
    auto = DiSTVideoModel(tiny_clip(width=64, layers=2), config)
    assert auto.clip_dtype == torch.float32
    auto.double()  # a dtype cast on the same device: the CLIP's dtype is the caller's
    assert auto.clip_dtype == torch.float64
    auto.to("meta")
    assert auto.clip_dtype == torch.bfloat16  # the meta device's "auto"
    fixed = DiSTVideoModel(tiny_clip(width=64, layers=2), config, clip_dtype="fp32").to("meta")
    assert fixed.clip_dtype == torch.float32


def test_training_decides_the_clip_dtype_for_the_gpu_not_the_host_cpu(synthetic, tmp_path, gpus, host_without_bf16,
                                                                       monkeypatch):
    from dist_video.engine import train as train_module

    class Built(Exception):
        pass

    def build_classifier(model_cfg, clip=None):
        raise Built(model_cfg.clip_dtype)

    gpus(1, (7, 5))
    gpu_env = distributed.DistEnv(device=torch.device("cuda"))
    monkeypatch.setattr(train_module, "setup_distributed", lambda name: gpu_env)
    monkeypatch.setattr(train_module, "build_classifier", build_classifier)
    with pytest.raises(Built, match="^fp16$"):  # a T4: fp16, though the host CPU has no bf16 either
        train_module.train(_tiny_config(synthetic, tmp_path / "run"), resume=False, progress=False)


# ----------------------------------------------------------------------------- 3. resume on fewer GPUs

def test_resume_with_fewer_gpus_than_saved_restores_what_exists(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA calls run at once, not queued
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]

    # a checkpoint of an 8-GPU run: one generator per process
    saved = checkpoint.rng_state(states)
    checkpoint.set_rng_state(saved, torch.device("cuda:0"), rank=0)
    assert len(restored) == 1 and torch.equal(restored[0][0], states[0])
    assert restored[0][1] == torch.device("cuda:0")
    checkpoint.set_rng_state(saved, torch.device("cuda:0"), rank=3)  # process 3, on its only visible GPU
    assert torch.equal(restored[-1][0], states[3])

    # an older checkpoint: the main process's generators of all 8 GPUs it saw
    old = {**checkpoint.rng_state(), "cuda": states}
    checkpoint.set_rng_state(old, torch.device("cuda:0"), rank=0)
    assert torch.equal(restored[-1][0], states[0])

    # more processes now than saved: the new ones start afresh
    before = len(restored)
    checkpoint.set_rng_state(checkpoint.rng_state(states[:2]), torch.device("cuda:0"), rank=5)
    assert len(restored) == before

    # CPU runs save no CUDA state and restore none
    assert "cuda_by_rank" not in checkpoint.rng_state([None, None])
    checkpoint.set_rng_state(saved, torch.device("cpu"), rank=0)
    assert len(restored) == before


def test_the_cuda_generator_saved_is_the_device_s_own(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([torch.device(device).index]))
    assert checkpoint.cuda_rng_state(torch.device("cuda:1")).tolist() == [1]
    assert checkpoint.cuda_rng_state(torch.device("cpu")) is None


# ----------------------------------------------------------------------------- 4. device selection

def test_each_process_gets_its_own_gpu(gpus):
    gpus(4)
    assert distributed.resolve_device("auto", 2, 4) == torch.device("cuda:2")  # torchrun: every GPU visible
    assert distributed.resolve_device("cuda", 3, 4) == torch.device("cuda:3")
    assert distributed.resolve_device("cuda:1", 0, 1) == torch.device("cuda:1")  # one process: any GPU
    with pytest.raises(RuntimeError, match="all 4 processes of this machine on one GPU"):
        distributed.resolve_device("cuda:1", 0, 4)
    with pytest.raises(RuntimeError, match="only 4 GPU"):
        distributed.resolve_device("cuda:7", 0, 1)
    with pytest.raises(RuntimeError, match="only 4 are visible"):
        distributed.resolve_device("cuda", 5, 8)
    assert distributed.resolve_device("cpu", 3, 4) == torch.device("cpu")


def test_one_visible_gpu_per_process_is_cuda_0(gpus, monkeypatch):
    gpus(1)  # SLURM --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds this task's GPU only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert distributed.resolve_device("auto", 3, 4) == torch.device("cuda:0")
    assert distributed.resolve_device("cuda", 3, 4) == torch.device("cuda:0")


@pytest.mark.parametrize("visible_devices", [None, "", "0,1"])
def test_several_processes_on_one_unnamed_gpu_are_refused_before_nccl(gpus, monkeypatch, visible_devices):
    """``torchrun --nproc_per_node=2`` on a one-GPU machine: both processes would take cuda:0 and
    NCCL would fail obscurely; the clear message comes first. (``0,1`` with one GPU counted:
    a listed GPU that does not exist.)"""
    gpus(1)
    if visible_devices is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible_devices)
    for name in ("auto", "cuda"):
        with pytest.raises(RuntimeError, match="all 2 processes of this machine on its one visible GPU"):
            distributed.resolve_device(name, 1, 2)
    assert distributed.resolve_device("cuda", 0, 1) == torch.device("cuda:0")  # one process: its GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: joined.append(k))
    with pytest.raises(RuntimeError, match="one visible GPU"):
        distributed.setup_distributed("auto")
    assert joined == []  # refused before joining the process group


def test_nccl_is_bound_to_the_process_s_gpu_when_it_starts(gpus, monkeypatch):
    set_devices = gpus(2)
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(var, value)
    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **k: joined.append(k))
    env = distributed.setup_distributed("cuda")
    assert env.device == torch.device("cuda:1") and set_devices == [torch.device("cuda:1")]
    assert joined == [{"backend": "nccl", "rank": 1, "world_size": 2, "device_id": torch.device("cuda:1")}]
    joined.clear()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert distributed.setup_distributed("cpu").device == torch.device("cpu")
    assert joined == [{"backend": "gloo", "rank": 1, "world_size": 2}]  # Gloo: no device to bind


def test_a_single_process_makes_its_gpu_the_current_one(gpus, monkeypatch):
    set_devices = gpus(2)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    env = distributed.setup_distributed("cuda:1")
    assert env.device == torch.device("cuda:1") and not env.distributed
    assert set_devices == [torch.device("cuda:1")]


# ----------------------------------------------------------------------------- 5. evaluation shards by video

def test_evaluation_shards_whole_videos():
    from dist_video.engine.evaluate import ShardSampler

    views = 3
    for world in (1, 2, 3, 4):
        shards = [list(ShardSampler(7 * views, rank, world, items_per_video=views)) for rank in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(7 * views))
        for shard in shards:
            videos = {i // views for i in shard}
            assert len(shard) == views * len(videos)  # all of a video's views, on one process
    assert list(ShardSampler(5, 1, 2)) == [1, 3]  # one item per video: round robin as before


@pytest.fixture(scope="module")
def synthetic(synthetic_videos) -> Path:
    return synthetic_videos(16, 6)


def _evaluation_rank(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    """One process of a Gloo evaluation that counts the videos it decodes."""
    torch.set_num_threads(1)
    import dist_video.data.datasets as datasets_module
    from dist_video import DiSTConfig, DiSTVideoModel
    from dist_video.clip import CLIP, CLIPConfig
    from dist_video.data import SegmentSampler, TestTransform, VideoClipDataset, load_annotations
    from dist_video.engine.evaluate import predict_dataset

    decoded = []
    read_frame_list = datasets_module.read_frame_list

    def counting(path, *args, **kwargs):
        decoded.append(os.path.basename(path))
        return read_frame_list(path, *args, **kwargs)

    datasets_module.read_frame_list = counting
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ann = load_annotations("csv", Path(data) / "val.csv", root=data, classes=Path(data) / "classes.txt")
        dataset = VideoClipDataset(ann.records, sampler=SegmentSampler(8), training=False, num_views=3,
                                   transform=TestTransform(crop_size=32, short_side=32), class_names=ann.class_names)
        torch.manual_seed(0)
        clip = CLIP(CLIPConfig(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2,
                               vision_heads=1, text_layers=0))
        model = DiSTVideoModel(clip, DiSTConfig(num_frames=8, temporal_dim=8, integration_dim=64, pooling_layers=1),
                               clip_dtype="fp32").set_linear_head(len(ann.class_names)).eval()
        env = distributed.DistEnv(rank, world, rank, torch.device("cpu"))
        scores, labels, order = predict_dataset(model, dataset, env, batch_size=4, workers=0)
        Path(out, f"rank{rank}-of-{world}.json").write_text(json.dumps(
            {"decoded": decoded, "scores": scores.tolist(), "order": order}))
    finally:
        distributed.cleanup_distributed()


@pytest.mark.slow
def test_two_process_evaluation_decodes_each_video_once(synthetic, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_evaluation_rank, args=(2, str(tmp_path / "init"), str(synthetic), str(tmp_path)), nprocs=2)
    _evaluation_rank(0, 1, "", str(synthetic), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}-of-2.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "rank0-of-1.json").read_text())
    assert len(single["decoded"]) == 6  # 6 videos x 3 views, each video decoded once
    for r in ranks:
        assert len(r["decoded"]) == len(set(r["decoded"])) == 3  # half the videos, once each
    assert set(ranks[0]["decoded"]).isdisjoint(ranks[1]["decoded"])
    for r in ranks:  # and the same result as one process
        assert r["order"] == single["order"]
        torch.testing.assert_close(torch.tensor(r["scores"]), torch.tensor(single["scores"]))


# ----------------------------------------------------------------------------- 6. decoder threads per process

def test_decoder_threads_share_the_cores_between_the_processes_of_a_machine(monkeypatch):
    from dist_video.data import decoding

    class Worker:
        num_workers = 2

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    big = 1280 * 720
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decoding.decoder_threads(None, big) == 4
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Worker())
    assert decoding.decoder_threads(None, big) == 8  # one process: 16 cores / 2 workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes, each with 2 workers
    assert decoding.decoder_threads(None, big) == 1
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    assert decoding.decoder_threads(None, big) == 2
    assert decoding.decoder_threads(3, big) == 3  # asked for: as asked


# ----------------------------------------------------------------------------- 8. host synchronisations

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _tiny_config(data: Path, out: Path, *extra: str):
    from dist_video.config import load_config

    sets = [f"model.clip={TINY_CLIP}", "model.head=linear", "model.dist.num_frames=8", "model.dist.temporal_dim=16",
            "model.dist.integration_dim=64", "data.format=csv", f"data.root={data}", f"data.train={data / 'train.csv'}",
            f"data.val={data / 'val.csv'}", f"data.classes={data / 'classes.txt'}", "data.crop_size=32",
            "data.test_scale=32", "data.num_views=1", "data.workers=0", "augment.mixup_alpha=0.0",
            "augment.cutmix_alpha=0.0", "optim.epochs=1", "train.batch_size=2", "train.eval_every=0",
            "train.log_every=1000", f"output_dir={out}", *extra]
    return load_config(None, None, sets)


def test_a_micro_step_never_waits_for_the_device(synthetic, tmp_path, monkeypatch):
    """Reading a device tensor on the host (``.item()``, ``bool()``, ...) waits for the GPU: at
    most once per optimizer update, never inside a micro-step. Counted: reads of floating-point
    and boolean tensors (the loss and what is computed from it) by the training loop; the
    mixer's integer seed is drawn on the CPU."""
    from dist_video.engine import train as train_module

    syncs: list[str] = []
    micro_steps = []
    real_forward_backward = train_module._Run.forward_backward

    def forward_backward(self, *args, **kwargs):
        micro_steps.append(1)
        start = len(syncs)
        out = real_forward_backward(self, *args, **kwargs)
        assert syncs[start:] == [], f"host synchronisations inside a micro-step: {syncs[start:]}"
        return out

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if not (self.is_floating_point() or self.dtype == torch.bool):
                return real(self, *args, **kwargs)
            caller = sys._getframe(1).f_code
            stack = sys._getframe(1)
            while stack is not None and stack.f_code.co_name != "forward_backward":
                stack = stack.f_back
            # what the training loop reads (the data pipeline's own CPU reads are not device reads)
            if stack is not None or caller.co_filename.endswith(os.path.join("engine", "train.py")):
                syncs.append(f"{name} in {caller.co_name}")
            return real(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(train_module._Run, "forward_backward", forward_backward)
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    cfg = _tiny_config(synthetic, tmp_path / "run", "train.accumulation=2", "train.max_steps=3",
                       "train.precision=fp32", "model.clip_dtype=fp32")
    result = train_module.train(cfg, resume=False, progress=False)
    assert result.status == "max_steps" and result.step == 3 and len(micro_steps) == 6
    assert len(syncs) <= result.step + 1, syncs  # one per update, plus the log record at the end


# ----------------------------------------------------------------------------- 9, 11. process-wide settings

def test_cli_keeps_freed_memory_on_cpus_and_tunes_cudnn_and_tf32_on_gpus(gpus, monkeypatch):
    from dist_video import cli
    from dist_video.engine import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    for flag in ("benchmark", "allow_tf32"):
        monkeypatch.setattr(torch.backends.cudnn, flag, False)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        cli._prepare_device("cpu")
        assert calls == [1] and not torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "highest"

        gpus(2)
        cli._prepare_device("cuda")
        cli._prepare_device("auto")
        assert calls == [1]  # glibc's allocator is left alone for GPU runs
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # TF32 matrix products
    finally:
        torch.set_float32_matmul_precision(matmul_precision)


# ----------------------------------------------------------------------------- 10. preload memory per machine

def test_preload_shares_the_memory_between_the_processes_of_a_machine(synthetic, tmp_path, monkeypatch):
    from dist_video.data import datasets as datasets_module
    from dist_video.engine.data import build_datasets

    cfg = _tiny_config(synthetic, tmp_path / "run", "data.preload=true")
    need = sum(8 * 32 * 32 * 3 for _ in range(16))  # 16 training videos of 8 frames, 32 x 32
    monkeypatch.setattr(datasets_module, "_available_memory", lambda: int(need / 0.3))  # they take 30%
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert build_datasets(cfg, splits=("train",), verbose=False).train is not None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two copies: 60% of the memory
    with pytest.raises(MemoryError, match="data.preload"):
        build_datasets(cfg, splits=("train",), verbose=False)


# ----------------------------------------------------------------------------- 11. autocast and fp16

def _cuda_autocast_policy(monkeypatch):
    """CUDA autocast runs layer_norm and softmax in float32 and returns float32 (CPU autocast
    keeps the input's dtype): apply that rule on CPU."""
    import dist_video.clip as clip_module
    import dist_video.dist as dist_module

    def fp32_under_autocast(fn):
        def wrapped(x, *args, **kwargs):
            if torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
                    return fn(x.float(), *args, **kwargs)
            return fn(x, *args, **kwargs)
        return wrapped

    for module in (F, clip_module.F, dist_module.F):
        monkeypatch.setattr(module, "layer_norm", fp32_under_autocast(F.layer_norm))
        monkeypatch.setattr(module, "softmax", fp32_under_autocast(F.softmax))
    monkeypatch.setattr(torch, "softmax", fp32_under_autocast(torch.softmax))


def test_training_form_keeps_the_autocast_dtype_under_cuda_autocast_rules(tiny_clip, monkeypatch):
    from dist_video import DiSTConfig, DiSTVideoModel

    _cuda_autocast_policy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the emulation works: a raw call gives float32
        assert F.layer_norm(torch.randn(2, 8, dtype=torch.bfloat16), (8,)).dtype == torch.float32
    torch.manual_seed(0)
    model = DiSTVideoModel(tiny_clip(width=128, layers=2), DiSTConfig(num_frames=4, temporal_dim=16,
                                                                      integration_dim=128, pooling_layers=2),
                           clip_dtype=torch.bfloat16).set_linear_head(3).train()
    dtypes: dict[str, torch.dtype] = {}

    def record(name, output):
        tensors = [t for t in (output if isinstance(output, tuple) else (output,)) if isinstance(t, torch.Tensor)]
        dtypes[name] = tensors[0].dtype

    for name, module in model.branch.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: record(name, o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 4, 64, 64)).float().sum().backward()
    norms = {n: d for n, d in dtypes.items() if n.endswith(("ln", "ln_1", "ln_temporal", "ln_post")) or ".ln_" in n}
    assert norms and all(d == torch.bfloat16 for d in norms.values()), norms
    wide = {n: d for n, d in dtypes.items() if d == torch.float32}
    assert not wide, f"float32 activations under bf16 autocast: {wide}"


def test_fp16_layer_norm_statistics_are_float32(device):
    # a mean of 1000 over 4096 values: summed in fp16 the statistics would overflow (max 65504)
    x = (1000 + torch.randn(4, 4096, device=device)).half()
    y = F.layer_norm(x, (4096,))
    reference = F.layer_norm(x.float(), (4096,))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), reference, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_inference_form_in_half_precision_matches_float32(tiny_clip, device, dtype):
    from dist_video import DiSTConfig, DiSTVideoModel

    torch.manual_seed(0)
    model = DiSTVideoModel(tiny_clip(width=128, layers=2), DiSTConfig(num_frames=4, temporal_dim=16,
                                                                      integration_dim=128, pooling_layers=2),
                           clip_dtype="fp32").set_linear_head(5).eval().to(device)
    video = torch.randn(2, 3, 4, 64, 64, device=device)
    reference = model.fuse(torch.float32)(video)
    fused = model.fuse(dtype)
    assert all(b.dtype in (dtype, torch.float32) for b in fused.buffers())
    half = fused(video)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, reference, atol=0.05 * reference.abs().max().item(), rtol=0.05)


def test_a_training_step_at_the_device_s_auto_precision(tiny_clip, device):
    """What the trainer does on ``device``: CLIP in its auto dtype, the branch under autocast
    at the auto precision, loss scaling with fp16; the update changes the branch and is finite."""
    from dist_video import DiSTConfig, DiSTVideoModel
    from dist_video.engine.optim import adamw

    amp = resolve_precision("auto", device)
    torch.manual_seed(0)
    model = DiSTVideoModel(tiny_clip(width=128, layers=2), DiSTConfig(num_frames=4, temporal_dim=16,
                                                                      integration_dim=128, pooling_layers=2),
                           clip_dtype=resolve_clip_dtype("auto", device)).set_linear_head(5).to(device).train()
    assert model.clip_dtype == resolve_clip_dtype("auto", device)
    params = [p for _, p in model.trainable_parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = adamw(params, lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    video = torch.randn(2, 3, 4, 64, 64, device=device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(video)
    loss = F.cross_entropy(logits.float(), torch.tensor([1, 3], device=device))
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


# ----------------------------------------------------------------------------- 12. FLOPs and the machine

def test_fused_attention_counts_zero_on_every_device():
    from dist_video import profiling
    from dist_video.profiling import count_macs

    q = torch.empty(2, 4, 50, 64, device="meta")  # the CUDA kernels' shapes, without a GPU
    aten = torch.ops.aten
    for op, args in ((getattr(aten, "_scaled_dot_product_efficient_attention", None), (q, q, q, None, False)),
                     (getattr(aten, "_scaled_dot_product_flash_attention", None), (q, q, q))):
        if op is None:
            continue
        assert op in profiling._fused_attention_ops()
        assert count_macs(lambda: op(*args)) == 0
    assert count_macs(lambda: q.view(-1, 64) @ q.view(-1, 64).t()) == 400 * 400 * 64  # products still count


def test_machine_describes_the_benchmark_s_device(gpus, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import common
    finally:
        sys.path.remove(str(BENCHMARKS))

    gpus(2, (7, 0))

    class Props:
        total_memory = 16 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU {i}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=None: Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    info = common.machine(torch.device("cuda:1"))
    assert info["device"] == "cuda" and info["gpu"] == "GPU 1" and info["gpu_capability"] == "7.0"
    assert info["gpu_memory_gib"] == 16.0
    cpu = common.machine(torch.device("cpu"))
    assert cpu["device"] == "cpu" and "gpu" not in cpu  # a CPU benchmark on a GPU machine


# ----------------------------------------------------------------------------- 13. the check on an offline node

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def _offline(command: list[str]) -> tuple[list[str], str | None]:
    """``command`` in a network namespace without network (loopback up for Gloo), or as it is
    with the reason when this machine does not permit that."""
    from net_helpers import private_network

    return private_network(command)


def _check(args: list[str], out: Path, python: str = sys.executable, timeout: int = 600):
    import subprocess
    import warnings

    command, why_online = _offline([str(GPU_CHECK), "--python", python, "--out", str(out), *args])
    if why_online:
        warnings.warn(f"gpu_check ran with the network: {why_online}")
    env = {**os.environ, "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    return proc, summary


def test_the_check_stops_at_preflight_when_pytorch_sees_no_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this PyTorch sees a GPU")
    proc, summary = _check(["--device", "cuda"], tmp_path / "out", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [s["step"] for s in summary["steps"]] == ["preflight"]  # nothing after a failed set-up
    assert summary["steps"][0]["status"] == "failed"
    assert "sees no CUDA device" in summary["stopped"] and "sees no CUDA device" in summary["steps"][0]["reason"]
    assert "STOPPED" in (tmp_path / "out" / "summary.md").read_text()
    assert "skipped (no GPU)" not in proc.stdout


@pytest.mark.slow
def test_the_check_runs_offline_with_a_preinstalled_python(tmp_path):
    """The issue's user: no network, pip's index off, a Python with PyTorch; the package from src/."""
    out = tmp_path / "out"
    proc, summary = _check(["--device", "cpu", "--tests", "none", "--skip", "benchmark-inference,benchmark-loader"],
                           out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["step"]: s for s in summary["steps"]}
    for name in ("preflight", "environment", "cli-train"):
        assert steps[name]["status"] == "passed", steps[name]
    for s in summary["steps"]:
        assert s["status"] == "passed" or (s["status"] == "skipped" and s["reason"]), s
    assert steps["tests"]["reason"] == "--tests none"
    assert steps["benchmark-loader"]["reason"] == "--skip benchmark-loader"
    assert "2+ CUDA GPUs" in steps["nccl"]["reason"]
    assert summary["environment"]["device"] == "cpu"  # --device cpu, also where a GPU is visible
    assert summary["preflight"]["cuda_available"] is torch.cuda.is_available()
    assert (out / "cli-train" / "eval" / "metrics.json").is_file()  # the CLI's own evaluation ran
    assert "| cli-train | passed |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_steps_that_need_a_missing_package_say_which(tmp_path):
    import subprocess

    python = subprocess.run([sys.executable, str(ROOT / "scripts" / "python_without.py"), str(tmp_path / "venv"),
                             "av", "ftfy", "wcwidth"], capture_output=True, text=True, check=True).stdout.strip()
    proc, summary = _check(["--device", "cpu", "--skip", "benchmark-inference"], tmp_path / "out", python=python,
                           timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    missing = summary["preflight"]["missing"]  # a bare Python may lack more (the extras): these two at least
    assert missing["decoding (PyAV)"] == ["av"] and missing["tokenizer"] == ["ftfy"], missing
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["environment"]["status"] == "passed"
    for name in ("tests", "cli-train", "benchmark-loader"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith("needs av "), steps[name]


def test_the_check_rejects_bad_arguments(tmp_path):
    import subprocess

    for args in (["--tests", "some"], ["--python", str(tmp_path / "nope")], ["--wheelhouse", str(tmp_path / "nope")],
                 ["--step-timeout", "1m"]):
        proc = subprocess.run([str(GPU_CHECK), "--out", str(tmp_path / "out"), *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("gpu_check: "), (args, proc.stderr)


def test_benchmarks_use_the_gpu_settings_the_cli_uses(gpus, monkeypatch):
    """``use_fast_gpu_kernels``: what ``cli._prepare_device`` sets on a GPU (cuDNN autotuner, TF32),
    called by the inference and training-cost benchmarks; nothing on a CPU."""
    for flag in ("benchmark", "allow_tf32"):
        monkeypatch.setattr(torch.backends.cudnn, flag, False)
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        distributed.use_fast_gpu_kernels("cpu")
        assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
        gpus(1)
        distributed.use_fast_gpu_kernels(torch.device("cuda:0"))
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    for name in ("inference.py", "train_cost.py"):
        assert "use_fast_gpu_kernels(device)" in (BENCHMARKS / name).read_text()


def test_the_summary_reports_step_times_achieved_tflops_and_compile_times(tmp_path):
    """``gpu_check_summary.py`` on a GPU run's files: train step ms per method, DiST's achieved
    TFLOP/s against the measured matmul rate and the datasheet peak, and the compiled rows."""
    import subprocess

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (tmp_path / "steps.jsonl").write_text(json.dumps({"step": "benchmark-train-cost", "status": "passed",
                                                      "seconds": 40}) + "\n")
    (tmp_path / "environment.json").write_text(json.dumps(
        {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1}]}))
    (bench / "inference.json").write_text(json.dumps({"throughput": [
        {"batch": 8, "dist_clips_per_second": 400.0, "clip_clips_per_second": 500.0, "ratio_dist_to_clip": 1.25,
         "dist_compiled_clips_per_second": 480.0, "clip_compiled_clips_per_second": 550.0,
         "dist_compile_seconds": 61.2, "clip_compile_seconds": 30.4},
        {"batch": 32, "dist_clips_per_second": 900.0, "clip_clips_per_second": 1000.0, "ratio_dist_to_clip": 1.1,
         "compile_error": "dist_compiled: RuntimeError: out of memory"}]}))
    runs = [{"method": m, "batch": b, "step_seconds": s, "peak_memory_bytes": 2**30 * b}
            for m, b, s in (("dist", 8, 0.1), ("dist", 32, 0.2), ("full-finetune", 32, 0.8))]
    (bench / "train_cost_cuda.json").write_text(json.dumps({
        "resolution": 224, "runs": runs, "memory_per_clip_bytes": {"dist": 2**29},
        "dist_flop_bound": {"step_gflops_per_clip": 500.0, "bf16_matmul_tflops": 700.0}}))
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cuda", "SECONDS_SO_FAR": "50"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py")], env=env, check=True,
                   capture_output=True, text=True)
    training = json.loads((tmp_path / "summary.json").read_text())["training"]
    assert training["step_ms"] == {"dist": 200.0, "full-finetune": 800.0}  # the largest batch
    flops = training["dist_tflops"]
    assert flops["achieved"] == pytest.approx(500.0 * 32 / 0.2 / 1000)  # GFLOP/clip x clips/s
    assert flops["bf16_dense_nominal"] == 989.0 and flops["bf16_matmul_measured"] == 700.0
    text = (tmp_path / "summary.md").read_text()
    assert "**80.0 TFLOP/s** achieved" in text and "(8%)" in text
    assert "| dist | 200 | 160.00 |" in text
    assert "| 8 | 480.0 | 550.0 | 61 | 30 |" in text
    assert "`torch.compile` failed at batch 32: dist_compiled: RuntimeError: out of memory" in text


def test_the_inference_benchmark_records_a_failed_compile_and_keeps_the_eager_rows(monkeypatch, tmp_path):
    """On a one-shot GPU run a compiler failure must not cost the eager numbers: the row says
    what failed, the eager columns are measured, and each batch size is on disk once measured."""
    from dist_video.clip import CLIPConfig

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import common
        import inference
    finally:
        sys.path.remove(str(BENCHMARKS))
    small = CLIPConfig(embed_dim=32, image_size=224, patch_size=32, vision_width=32, vision_layers=12,
                       vision_heads=2, text_layers=0)
    monkeypatch.setattr(common, "clip_config_for_architecture", lambda arch, text=True: small)

    def failing_compile(module):
        def call(*args):
            raise RuntimeError("inductor: no kernel for this op\nlong traceback")
        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(sys, "argv", ["inference.py", "--compile", "--no-costs", "--batches", "1", "2",
                                      "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)])
    inference.main()
    rows = json.loads((tmp_path / "inference.json").read_text())["throughput"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert rows[0]["compile_error"] == "dist_compiled: RuntimeError: inductor: no kernel for this op"
    assert all(r["dist_clips_per_second"] > 0 and r["clip_clips_per_second"] > 0 for r in rows)
    assert not any("dist_compiled_seconds" in r for r in rows)
    assert "`torch.compile` failed at batch 1" in (tmp_path / "inference.md").read_text()


def test_the_device_run_keeps_the_device_and_gpu_tests_and_leaves_the_slow_cpu_checks_to_ci():
    """``scripts/device_tests.py`` (``gpu_check.sh --tests device``): tests taking ``device``, the
    ``gpu``-marked CUDA comparison and the quick readiness tests; not the slow readiness tests,
    which re-run the whole check on the CPU."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "device_tests",
                           "-p", "no:cacheprovider", "tests/test_gpu.py", "tests/test_gpu_readiness.py",
                           "tests/test_fused.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if "::" in line]
    kept = {line.split("::")[1].split("[")[0] for line in lines}
    assert "test_dist_on_cuda_matches_the_cpu_in_float32" in kept, proc.stdout  # marked gpu, no device fixture
    assert "test_the_check_rejects_bad_arguments" in kept  # a quick readiness test
    assert "test_the_check_runs_offline_with_a_preinstalled_python" not in kept  # slow: CI's job
    assert not any(line.startswith("tests/test_fused.py") for line in lines)  # CPU-only tests: CI's job
