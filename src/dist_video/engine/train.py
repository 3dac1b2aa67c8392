"""The training loop: the paper's recipe on one CPU or many GPUs, and never losing a run.

Exact resumption rests on three things: the data order and every sample's augmentation are
functions of (seed, epoch, position) only (see :mod:`dist_video.engine.data`); checkpoints
hold the optimizer, scheduler, scaler and RNG states; and the position inside the epoch is
saved, so a resumed run continues with the very next batch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, config_to_dict, save_config
from ..data.mixup import MixupCutmix, soft_target_cross_entropy
from ..model import bf16_supported
from .builder import attach_head, build_classifier, load_clip_for
from .checkpoint import (check_output_dir, load_training_state, save_training_state, set_rng_state)
from .data import build_datasets, train_loader, write_bad_files
from .distributed import DistEnv, barrier, cleanup_distributed, setup_distributed
from .evaluate import autocast_context, evaluate
from .metrics import MetricLog, plot_training_curves
from .optim import CosineSchedule, build_optimizer

__all__ = ["train", "TrainResult", "NonFiniteLossError", "resolve_precision", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    status: str  # finished | interrupted | max_steps
    output_dir: Path
    step: int
    epoch: int
    metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    trainable_params: int = 0


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the trainable part: ``auto`` -> bf16 where supported, else fp16 on
    GPUs (with loss scaling), else fp32 (``None``)."""
    if name == "auto":
        if bf16_supported(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if name not in table:
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, got {name!r}")
    return table[name]


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next update and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the next step, "
              "then stopping (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _any_rank(flag: bool, env: DistEnv) -> bool:
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _accumulation(cfg: Config, env: DistEnv) -> int:
    per_update = cfg.train.batch_size * env.world_size
    if cfg.train.global_batch_size > 0:
        if cfg.train.global_batch_size % per_update:
            raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
                             f"batch_size x processes = {cfg.train.batch_size} x {env.world_size}")
        return cfg.train.global_batch_size // per_update
    return max(1, cfg.train.accumulation)


def _check_resume_compatible(saved: dict, cfg: Config, path: Path) -> None:
    now = config_to_dict(cfg)
    for section in ("model",):
        before, after = saved.get(section, {}), now[section]
        free = ("init", "activation_checkpointing")  # may change on resume: same network, same weights
        diffs = [k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in free]
        if diffs:
            k = sorted(diffs)[0]
            raise ValueError(f"{path}: cannot resume, the checkpoint was made with {section}.{k}="
                             f"{before.get(k)!r} but the config now says {after.get(k)!r} "
                             "(use a new output_dir, or --no-resume to start over)")


def train(cfg: Config, *, resume: bool | str = True, progress: bool = True) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` and evaluate it; files go to ``cfg.output_dir``.

    ``resume``: True (continue from ``output_dir/checkpoints/last.pt`` if present), False
    (start over), or a checkpoint path."""
    env = setup_distributed(cfg.train.device)
    try:
        return _train(cfg, env, resume, progress)
    finally:
        cleanup_distributed()


def _train(cfg: Config, env: DistEnv, resume: bool | str, progress: bool) -> TrainResult:
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    if env.is_main:
        check_output_dir(out)
        check_output_dir(ckpt_dir)
    barrier()

    torch.manual_seed(cfg.train.seed)
    datasets = build_datasets(cfg, splits=("train", "val"), progress=progress and env.is_main,
                              verbose=env.is_main)
    class_names = datasets.class_names
    clip = load_clip_for(cfg.model) if not cfg.model.init else None
    model = build_classifier(cfg.model, clip)
    model = attach_head(model, cfg.model, class_names).to(env.device)
    amp_dtype = resolve_precision(cfg.train.precision, env.device)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())

    # Rough checkpoint size (trainable weights + 2 Adam moments) to check disk space up front.
    if env.is_main:
        need = 4 * trainable * 3 + (sum(p.numel() for p in model.clip.parameters()) * 4
                                    if model.trains_clip else 0)
        check_output_dir(ckpt_dir, need_bytes=2 * need + (64 << 20))
        save_config(cfg, out / "config.yaml")

    accumulation = _accumulation(cfg, env)
    global_batch = cfg.train.batch_size * env.world_size * accumulation
    batches_per_epoch = len(datasets.train) // (cfg.train.batch_size * env.world_size)
    updates_per_epoch = batches_per_epoch // accumulation
    if updates_per_epoch < 1:
        raise ValueError(f"the training set ({len(datasets.train)} clips) is smaller than one update of "
                         f"{global_batch} clips (batch_size x processes x accumulation)")
    total_steps = updates_per_epoch * cfg.optim.epochs
    if cfg.train.max_steps:
        total_steps_run = min(total_steps, cfg.train.max_steps)
    else:
        total_steps_run = total_steps
    lr = cfg.optim.lr * (global_batch / cfg.optim.base_batch_size if cfg.optim.scale_lr else 1.0)

    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = CosineSchedule(optimizer, lr, total_steps, round(cfg.optim.warmup_epochs * updates_per_epoch),
                               cfg.optim.warmup_start_lr, cfg.optim.min_lr)
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype == torch.float16 else None

    epoch, step, batch_in_epoch, skipped = 0, 0, 0, 0
    train_seconds = 0.0
    log = MetricLog(out / "metrics.jsonl", out / "tensorboard" if env.is_main else None) if env.is_main else None
    ckpt_path = ckpt_dir / CHECKPOINT_NAME
    resume_path = Path(resume) if isinstance(resume, (str, os.PathLike)) else (ckpt_path if resume else None)
    if isinstance(resume, (str, os.PathLike)) and not resume_path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    if resume_path is not None and resume_path.is_file():
        state = load_training_state(resume_path)
        _check_resume_compatible(state["config"], cfg, resume_path)
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if model.trains_clip or not k.startswith("clip.")]
        if missing or unexpected:
            raise ValueError(f"{resume_path}: model weights do not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        skipped = state["extra"].get("skipped_steps", 0)
        train_seconds = state["extra"].get("train_seconds", 0.0)
        if log is not None:
            log.truncate_after(step)
        if env.is_main:
            print(f"resumed from {resume_path}: epoch {epoch}, step {step}", file=sys.stderr)

    ddp_model = model
    if env.distributed and optimizer is not None:
        ddp_model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)

    mixer = MixupCutmix(mixup_alpha=cfg.augment.mixup_alpha, cutmix_alpha=cfg.augment.cutmix_alpha,
                        prob=cfg.augment.mix_prob, switch_prob=cfg.augment.switch_prob,
                        label_smoothing=cfg.augment.label_smoothing, num_classes=len(class_names))

    def save_checkpoint(at_epoch: int, at_batch: int) -> None:
        if env.is_main:
            save_training_state(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                epoch=at_epoch, step=step, batch_in_epoch=at_batch, config=config_to_dict(cfg),
                                extra={"skipped_steps": skipped, "train_seconds": train_seconds})
        barrier()

    def run_eval(tag: str) -> dict:
        metrics = evaluate(model, datasets.val, env, class_names=class_names, batch_size=cfg.eval.batch_size,
                           workers=cfg.data.workers, amp_dtype=amp_dtype, out_dir=out / "eval",
                           video_paths=datasets.val_paths, progress=progress)
        if log is not None:
            log.log({"kind": "eval", "step": step, "epoch": epoch, "top1": metrics["top1"],
                     "top5": metrics["top5"], "mean_class_accuracy": metrics["mean_class_accuracy"]})
            print(f"[{tag}] top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
                  f"mean class {100 * metrics['mean_class_accuracy']:.2f}%  ({metrics['num_videos']} videos)",
                  file=sys.stderr)
        return metrics

    if env.is_main:
        print(f"{model.method}: {trainable:,} trainable parameters; {len(datasets.train)} training clips, "
              f"{len(class_names)} classes; {updates_per_epoch} updates/epoch of {global_batch} clips "
              f"({cfg.train.batch_size} x {env.world_size} process(es) x {accumulation} accumulation); "
              f"device {env.device}, autocast {amp_dtype or 'off'}", file=sys.stderr)

    status = "finished"
    metrics: dict = {}
    nothing_to_train = optimizer is None
    bar = None
    with _StopFlag() as stop:
        if nothing_to_train:
            if env.is_main:
                print("nothing to train (no trainable parameters): evaluating only", file=sys.stderr)
            epoch = cfg.optim.epochs
        if progress and env.is_main and not nothing_to_train:
            from tqdm import tqdm
            bar = tqdm(total=total_steps_run, initial=step, unit="step", dynamic_ncols=True,
                       mininterval=0.5 if sys.stderr.isatty() else 10.0)
        while epoch < cfg.optim.epochs and status == "finished":
            ddp_model.train()
            loader = train_loader(datasets.train, cfg, env, epoch=epoch, start_batch=batch_in_epoch)
            window_loss, window_clips, t_window = 0.0, 0, time.perf_counter()
            micro = 0
            optimizer.zero_grad(set_to_none=True)
            limit = updates_per_epoch * accumulation
            for batch_idx, batch in enumerate(loader, start=batch_in_epoch):
                if batch_idx >= limit:
                    break
                t0 = time.perf_counter()
                video = batch["video"].to(env.device, non_blocking=True)
                labels = batch["label"].to(env.device, non_blocking=True)
                gen = torch.Generator().manual_seed(
                    hash((cfg.train.seed, epoch, batch_idx, env.rank)) & 0x7FFFFFFF)
                video, targets = mixer(video, labels, generator=gen)
                boundary = (batch_idx + 1) % accumulation == 0
                sync = boundary or not isinstance(ddp_model, DistributedDataParallel)
                ctx = ddp_model.no_sync() if not sync else _nullcontext()
                with ctx:
                    with autocast_context(env.device, amp_dtype):
                        logits = ddp_model(video)
                    loss = soft_target_cross_entropy(logits.float(), targets)
                    bad = _any_rank(not torch.isfinite(loss).item(), env)
                    if bad:
                        if cfg.train.nonfinite_loss == "skip":
                            skipped += 1
                            optimizer.zero_grad(set_to_none=True)
                            micro = 0
                            if env.is_main:
                                print(f"non-finite loss at step {step + 1} (epoch {epoch}, batch {batch_idx}): "
                                      f"skipped ({skipped} so far)", file=sys.stderr)
                            continue
                        last = (f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file()
                                else "no checkpoint was written yet")
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss.item()}) at step {step + 1} (epoch {epoch}, batch "
                            f"{batch_idx}); stopping ({last}). Lower optim.lr, or set "
                            "train.nonfinite_loss=skip to skip such steps")
                    scaled = loss / accumulation
                    if scaler is not None:
                        scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                micro += 1
                window_loss += loss.item() * video.shape[0]
                window_clips += video.shape[0]
                train_seconds += time.perf_counter() - t0
                if not boundary:
                    continue
                t1 = time.perf_counter()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.optim.grad_clip:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                micro = 0
                train_seconds += time.perf_counter() - t1
                if bar is not None:
                    elapsed = time.perf_counter() - t_window
                    bar.set_postfix(loss=f"{window_loss / max(1, window_clips):.4f}",
                                    lr=f"{scheduler.current * cfg.optim.branch_lr_mult:.2e}",
                                    clips_s=f"{window_clips * env.world_size / max(elapsed, 1e-9):.1f}",
                                    epoch=epoch, refresh=False)
                    bar.update(1)
                if log is not None and (step % max(1, cfg.train.log_every) == 0 or batch_idx + 1 >= limit):
                    log.log({"kind": "train", "step": step, "epoch": epoch,
                             "loss": window_loss / max(1, window_clips),
                             "lr": scheduler.value(step - 1) * cfg.optim.branch_lr_mult,
                             "clips_per_second": window_clips * env.world_size / max(time.perf_counter() - t_window, 1e-9)})
                    window_loss, window_clips, t_window = 0.0, 0, time.perf_counter()
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                    save_checkpoint(epoch, batch_idx + 1)
                if _any_rank(stop.signum is not None, env):
                    save_checkpoint(epoch, batch_idx + 1)
                    status = "interrupted"
                    break
                if cfg.train.max_steps and step >= cfg.train.max_steps:
                    save_checkpoint(epoch, batch_idx + 1)
                    status = "max_steps"
                    break
            if status != "finished":
                break
            epoch += 1
            batch_in_epoch = 0
            if env.is_main:
                write_bad_files(datasets.train, out, epoch)
            save_checkpoint(epoch, 0)
            due = cfg.train.eval_every and epoch % cfg.train.eval_every == 0 and epoch < cfg.optim.epochs
            if due:
                metrics = run_eval(f"epoch {epoch}")
        if bar is not None:
            bar.close()

    if status == "interrupted":
        if env.is_main:
            print(f"stopped at step {step}; checkpoint saved to {ckpt_path}; run the same command again "
                  "to resume", file=sys.stderr)
        return TrainResult(status, out, step, epoch, {}, train_seconds, trainable)

    metrics = run_eval("final")
    if env.is_main:
        model.save_pretrained(out / "model", clip_path=_clip_reference(cfg))
        _write_preprocess(out / "model", cfg)
        if log is not None:
            records = log.read()
            if any(r.get("kind") == "train" for r in records):
                plot_training_curves(records, out / "training_curves.png", title=f"{model.method} on "
                                     f"{len(class_names)} classes")
            log.close()
        summary = {"status": status, "method": model.method, "step": step, "epoch": epoch,
                   "trainable_params": trainable, "train_seconds": train_seconds,
                   "skipped_steps": skipped, **{k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy",
                                                                        "num_videos")}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    barrier()
    return TrainResult(status, out, step, epoch, metrics, train_seconds, trainable)


def _clip_reference(cfg: Config) -> str | None:
    """Refer to the CLIP file instead of copying it, unless it is a built-in encoder."""
    if cfg.model.method == "full-finetune" or not cfg.model.clip or cfg.model.clip.startswith("builtin:"):
        return None
    return cfg.model.clip


def _write_preprocess(model_dir: Path, cfg: Config) -> None:
    """Record the test-time preprocessing beside the weights, for ``dist-video predict``."""
    meta_path = model_dir / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocess"] = {
        "num_frames": cfg.model.dist.num_frames, "sampling": cfg.data.sampling, "interval": cfg.data.interval,
        "crop_size": cfg.data.crop_size, "test_scale": cfg.data.test_scale, "num_views": cfg.data.num_views,
        "num_crops": cfg.data.num_crops, "mean": cfg.data.mean, "std": cfg.data.std,
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
