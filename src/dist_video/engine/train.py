"""The training loop: the paper's recipe on one CPU or many GPUs, and never losing a run.

Exact resumption rests on three things: the data order and every sample's augmentation are
functions of (seed, epoch, position) only (see :mod:`dist_video.engine.data`); checkpoints
hold the optimizer, scheduler, scaler and RNG states; and the position inside the epoch is
saved, so a resumed run continues with the very next batch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..classifier import bf16_supported, resolve_clip_dtype
from ..config import Config, config_to_dict, save_config
from ..data.mixup import MixupCutmix, soft_target_cross_entropy
from .builder import attach_head, build_classifier, load_clip_for
from .checkpoint import (check_output_dir, cuda_rng_state, load_training_state, rng_state, save_training_state,
                         set_rng_state)
from .data import TrainLoader, build_datasets, clips_on_device, train_batches_per_epoch, write_bad_files
from .distributed import DistEnv, all_gather_objects, barrier, cleanup_distributed, setup_distributed
from .evaluate import evaluate
from .metrics import MetricLog, plot_training_curves
from .optim import CosineSchedule, build_optimizer

__all__ = ["train", "TrainResult", "NonFiniteLossError", "resolve_precision", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"

logger = logging.getLogger(__name__)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast for the trainable part (``None``: full precision)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    """Autocast dtype for the trainable part on ``device``: ``auto`` -> bf16 where the device
    computes in bf16 natively (GPUs of compute capability 8.0+, CPUs with AVX-512 BF16/AMX),
    else fp16 on GPUs (with loss scaling: a GradScaler), else fp32 (``None``)."""
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
        logger.warning("\n%s received: saving a checkpoint at the next step, then stopping (press Ctrl-C again "
                       "to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _update_flags(update_loss: torch.Tensor, stopping: bool, env: DistEnv) -> tuple[bool, bool]:
    """(the update's loss is finite on every process, a stop signal reached some process): the
    one host synchronisation of an update (after one reduction across processes)."""
    nonfinite = (~torch.isfinite(update_loss)).to(torch.float32)
    flags = torch.stack([nonfinite, torch.full_like(nonfinite, 1.0 if stopping else 0.0)])  # no host->device copy
    if env.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = flags.tolist()
    return nonfinite == 0.0, stop > 0.0


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
    if env.is_main:
        check_output_dir(out)
        check_output_dir(out / "checkpoints")
    barrier()

    torch.manual_seed(cfg.train.seed)
    datasets = build_datasets(cfg, splits=("train", "val"), progress=progress and env.is_main,
                              verbose=env.is_main)
    clip = load_clip_for(cfg.model) if not cfg.model.init else None
    # CLIP's "auto" precision is decided for the device the model will run on, not this host's CPU.
    clip_dtype = _DTYPE_NAMES[resolve_clip_dtype(cfg.model.clip_dtype, env.device)]
    model = build_classifier(replace(cfg.model, clip_dtype=clip_dtype), clip)
    model = attach_head(model, cfg.model, datasets.class_names).to(env.device)
    if cfg.model.init_from:  # e.g. Kinetics-710 -> Kinetics-400: weights, head rows by class name
        from ..label_maps import init_from
        model = init_from(model, cfg.model.init_from)
    run = _Run(cfg, env, model, datasets, out, progress)
    resume_path = _resume_path(resume, run.ckpt_path)
    if resume_path is not None and resume_path.is_file():
        run.restore(resume_path)
    run.log_start()
    status = run.train_epochs()
    if status == "interrupted":
        if env.is_main:
            logger.warning("stopped at step %d; checkpoint saved to %s; run the same command again to resume",
                           run.pos.step, run.ckpt_path)
        return run.result(status, {})
    return run.finish(status)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _resume_path(resume: bool | str | os.PathLike, last: Path) -> Path | None:
    """The checkpoint to resume from (it may not exist yet), or None to start over."""
    if isinstance(resume, (str, os.PathLike)):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return path
    return last if resume else None


@dataclass
class _Position:
    """Where a run is, and what it has counted: saved in every checkpoint, restored on resume."""

    epoch: int = 0
    step: int = 0  # optimizer updates so far
    batch_in_epoch: int = 0  # the batch of ``epoch`` the loop starts from
    skipped: int = 0  # updates skipped for a non-finite loss
    train_seconds: float = 0.0


class _Window:
    """The clips and loss since the last training log record. The loss stays on the device
    until it is read (:attr:`mean_loss`), so adding to it never waits for the device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.clips, self.start = 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, clips: int) -> None:
        """``loss_sum``: the loss summed over ``clips`` clips (a 0-dim tensor)."""
        self.loss = self.loss + loss_sum
        self.clips += clips

    @property
    def mean_loss(self) -> float:
        return float(self.loss) / max(1, self.clips)

    def clips_per_second(self, world_size: int) -> float:
        return self.clips * world_size / max(time.perf_counter() - self.start, 1e-9)


class _Run:
    """One training run: the model, optimizer, schedule and data, and the loop's parts
    (:meth:`restore`, :meth:`train_epochs` with :meth:`forward_backward` and
    :meth:`optimizer_step`, :meth:`log_step`, :meth:`save_checkpoint`, :meth:`finish`)."""

    def __init__(self, cfg: Config, env: DistEnv, model, datasets, out: Path, progress: bool):
        self.cfg, self.env, self.model, self.datasets, self.out = cfg, env, model, datasets, out
        self.progress = progress
        self.class_names = datasets.class_names
        self.amp_dtype = resolve_precision(cfg.train.precision, env.device)
        self.trainable = sum(p.numel() for _, p in model.trainable_parameters())
        self.ckpt_path = out / "checkpoints" / CHECKPOINT_NAME
        if env.is_main:
            # Rough checkpoint size (trainable weights + 2 Adam moments) to check disk space up front.
            need = 4 * self.trainable * 3 + (sum(p.numel() for p in model.clip.parameters()) * 4
                                             if model.trains_clip else 0)
            check_output_dir(self.ckpt_path.parent, need_bytes=2 * need + (64 << 20))
            save_config(cfg, out / "config.yaml")

        self.accumulation = _accumulation(cfg, env)
        self.global_batch = cfg.train.batch_size * env.world_size * self.accumulation
        batches_per_epoch = train_batches_per_epoch(datasets.train, cfg, env.world_size)
        self.updates_per_epoch = batches_per_epoch // self.accumulation
        if self.updates_per_epoch < 1:
            raise ValueError(f"the training set ({len(datasets.train) * cfg.data.clips_per_video} clips) is smaller "
                             f"than one update of {self.global_batch} clips (batch_size x processes x accumulation)")
        total_steps = self.updates_per_epoch * cfg.optim.epochs
        self.total_steps_run = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
        lr = cfg.optim.lr * (self.global_batch / cfg.optim.base_batch_size if cfg.optim.scale_lr else 1.0)

        self.optimizer = build_optimizer(model, cfg.optim, lr)
        self.scheduler = CosineSchedule(self.optimizer, lr, total_steps,
                                        round(cfg.optim.warmup_epochs * self.updates_per_epoch),
                                        cfg.optim.warmup_start_lr, cfg.optim.min_lr)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.amp_dtype == torch.float16 else None
        self.mixer = MixupCutmix(mixup_alpha=cfg.augment.mixup_alpha, cutmix_alpha=cfg.augment.cutmix_alpha,
                                 prob=cfg.augment.mix_prob, switch_prob=cfg.augment.switch_prob,
                                 label_smoothing=cfg.augment.label_smoothing, num_classes=len(self.class_names))
        self.log = MetricLog(out / "metrics.jsonl", out / "tensorboard") if env.is_main else None
        self.pos = _Position()
        self.loader: TrainLoader | None = None
        self._postfix_due = 0.0  # when the progress bar next shows the loss
        self.ddp_model = model  # wrapped for several processes when training starts
        self.forward_model = model  # self.ddp_model, compiled with train.compile

    # ------------------------------------------------------------------ resume
    def restore(self, path: Path) -> None:
        """Continue from a training checkpoint: weights, optimizer, schedule, scaler, RNGs, position."""
        state = load_training_state(path)
        _check_resume_compatible(state["config"], self.cfg, path)
        model = self.model
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if model.trains_clip or not k.startswith("clip.")]
        if missing or unexpected:
            raise ValueError(f"{path}: model weights do not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.env.device, self.env.rank)
        self.pos = _Position(epoch=state["epoch"], step=state["step"], batch_in_epoch=state["batch_in_epoch"],
                             skipped=state["extra"].get("skipped_steps", 0),
                             train_seconds=state["extra"].get("train_seconds", 0.0))
        if self.log is not None:
            self.log.truncate_after(self.pos.step)
        if self.env.is_main:
            logger.info("resumed from %s: epoch %d, step %d", path, self.pos.epoch, self.pos.step)

    def save_checkpoint(self, at_epoch: int, at_batch: int) -> None:
        """Save the state to continue from batch ``at_batch`` of epoch ``at_epoch`` (main process;
        every process's CUDA generator is gathered into it)."""
        cuda_states = all_gather_objects(cuda_rng_state(self.env.device))
        if self.env.is_main:
            save_training_state(self.ckpt_path, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, scaler=self.scaler, epoch=at_epoch, step=self.pos.step,
                                batch_in_epoch=at_batch, config=config_to_dict(self.cfg),
                                extra={"skipped_steps": self.pos.skipped, "train_seconds": self.pos.train_seconds},
                                rng=rng_state(cuda_states))
        barrier()

    # ------------------------------------------------------------------ the loop
    def train_epochs(self) -> str:
        """Train until the last epoch (``finished``), ``max_steps`` or a stop signal (``interrupted``)."""
        cfg, env, pos = self.cfg, self.env, self.pos
        if env.distributed and self.optimizer is not None:
            self.ddp_model = DistributedDataParallel(self.model,
                                                     device_ids=[env.device] if env.device.type == "cuda" else None)
        # the same module and parameters, compiled around DDP so that its gradient all-reduce
        # overlaps the compiled backward
        compiled = self.optimizer is not None and cfg.train.compile
        self.forward_model = torch.compile(self.ddp_model) if compiled else self.ddp_model
        status = "finished"
        bar = None
        with _StopFlag() as stop:
            if self.optimizer is None:
                if env.is_main:
                    logger.info("nothing to train (no trainable parameters): evaluating only")
                pos.epoch = cfg.optim.epochs
            elif self.progress and env.is_main:
                from tqdm import tqdm
                bar = tqdm(total=self.total_steps_run, initial=pos.step, unit="step", dynamic_ncols=True,
                           mininterval=0.5 if sys.stderr.isatty() else 10.0)
            while pos.epoch < cfg.optim.epochs and status == "finished":
                status = self._train_epoch(stop, bar)
                if status != "finished":
                    break
                pos.epoch += 1
                pos.batch_in_epoch = 0
                if env.is_main:
                    write_bad_files(self.datasets.train, self.out, pos.epoch)
                self.save_checkpoint(pos.epoch, 0)
                if cfg.train.eval_every and pos.epoch % cfg.train.eval_every == 0 and pos.epoch < cfg.optim.epochs:
                    self.evaluate(f"epoch {pos.epoch}")
            if bar is not None:
                bar.close()
        return status

    def _train_epoch(self, stop: _StopFlag, bar) -> str:
        """The rest of epoch ``pos.epoch`` from batch ``pos.batch_in_epoch``: ``finished`` at its end,
        else ``interrupted`` or ``max_steps`` (a checkpoint saved).

        The host waits for the device once per optimizer update (:func:`_update_flags`: is the
        loss finite, did a stop signal arrive), never per micro-batch; the loss is read for the
        logs and the progress bar only."""
        cfg, env, pos = self.cfg, self.env, self.pos
        self.ddp_model.train()
        if self.loader is None:  # one loader for the run: its workers persist across epochs
            self.loader = TrainLoader(self.datasets.train, cfg, env)
        loader = self.loader.epoch(pos.epoch, start_batch=pos.batch_in_epoch)
        window = _Window()
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.updates_per_epoch * self.accumulation
        update_loss, update_clips = None, 0  # this update's micro-batches: loss x clips summed, on the device
        for batch_idx, batch in enumerate(loader, start=pos.batch_in_epoch):
            if batch_idx >= limit:
                break
            t0 = time.perf_counter()
            boundary = (batch_idx + 1) % self.accumulation == 0
            loss = self.forward_backward(batch, batch_idx, sync=boundary)
            clips = batch["video"].shape[0]
            update_loss = loss * clips if update_loss is None else update_loss + loss * clips
            update_clips += clips
            pos.train_seconds += time.perf_counter() - t0
            if not boundary:
                continue
            t1 = time.perf_counter()
            finite, stopping = _update_flags(update_loss, stop.signum is not None, env)
            if finite:
                self.optimizer_step()
                window.add(update_loss, update_clips)
            else:
                self.skip_update(update_loss / update_clips, batch_idx)
            update_loss, update_clips = None, 0
            pos.train_seconds += time.perf_counter() - t1
            if finite:
                self.log_step(window, bar, last=batch_idx + 1 >= limit)
                if cfg.train.checkpoint_every_steps and pos.step % cfg.train.checkpoint_every_steps == 0:
                    self.save_checkpoint(pos.epoch, batch_idx + 1)
            if stopping:
                self.save_checkpoint(pos.epoch, batch_idx + 1)
                return "interrupted"
            if cfg.train.max_steps and pos.step >= cfg.train.max_steps:
                self.save_checkpoint(pos.epoch, batch_idx + 1)
                return "max_steps"
        return "finished"

    def forward_backward(self, batch: dict, batch_idx: int, *, sync: bool) -> torch.Tensor:
        """Mix, forward and backward one batch (gradients accumulate; with several processes they
        are averaged only when ``sync``). Returns the loss (a detached 0-dim tensor on the
        device: reading it would make the host wait for the device)."""
        cfg, env, pos = self.cfg, self.env, self.pos
        video = clips_on_device(batch, self.datasets.train.transform, env.device)  # uint8 from the workers
        labels = batch["label"].to(env.device, non_blocking=True)
        gen = torch.Generator().manual_seed(hash((cfg.train.seed, pos.epoch, batch_idx, env.rank)) & 0x7FFFFFFF)
        video, targets = self.mixer(video, labels, generator=gen)
        ddp = self.ddp_model
        ctx = ddp.no_sync() if not sync and isinstance(ddp, DistributedDataParallel) else nullcontext()
        with ctx:
            with autocast_context(env.device, self.amp_dtype):
                logits = self.forward_model(video)
            loss = soft_target_cross_entropy(logits.float(), targets)
            scaled = loss / self.accumulation
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        return loss.detach()

    def skip_update(self, loss: torch.Tensor, batch_idx: int) -> None:
        """The update ending at ``batch_idx`` had a non-finite loss: with ``train.nonfinite_loss``
        ``skip``, drop its gradients and count it; otherwise raise :class:`NonFiniteLossError`."""
        cfg, pos = self.cfg, self.pos
        if cfg.train.nonfinite_loss != "skip":
            last = (f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.is_file()
                    else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss)}) at step {pos.step + 1} (epoch {pos.epoch}, batch "
                f"{batch_idx}); stopping ({last}). Lower optim.lr, or set "
                "train.nonfinite_loss=skip to skip such steps")
        pos.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.env.is_main:
            logger.warning("non-finite loss at step %d (epoch %d, batch %d): skipped (%d so far)",
                           pos.step + 1, pos.epoch, batch_idx, pos.skipped)

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients (unscaled, clipped), then advance the schedule."""
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.cfg.optim.grad_clip:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pos.step += 1

    # ------------------------------------------------------------------ logging
    def log_start(self) -> None:
        if self.env.is_main:
            cfg, env = self.cfg, self.env
            logger.info("%s: %s trainable parameters; %d training clips, %d classes; %d updates/epoch of %d clips "
                        "(%d x %d process(es) x %d accumulation); device %s, autocast %s", self.model.method,
                        f"{self.trainable:,}", len(self.datasets.train), len(self.class_names),
                        self.updates_per_epoch, self.global_batch, cfg.train.batch_size, env.world_size,
                        self.accumulation, env.device, self.amp_dtype or "off")

    def log_step(self, window: _Window, bar, *, last: bool) -> None:
        """After an update: the progress bar, and a training record every ``train.log_every``
        updates and at the end of the epoch (the window then starts again)."""
        cfg, step = self.cfg, self.pos.step
        if bar is not None:
            now = time.monotonic()
            if now >= self._postfix_due:  # reading the loss waits for the device: only now and then
                self._postfix_due = now + bar.mininterval
                bar.set_postfix(loss=f"{window.mean_loss:.4f}",
                                lr=f"{self.scheduler.current * cfg.optim.branch_lr_mult:.2e}",
                                clips_s=f"{window.clips_per_second(self.env.world_size):.1f}",
                                epoch=self.pos.epoch, refresh=False)
            bar.update(1)
        if self.log is not None and (step % max(1, cfg.train.log_every) == 0 or last):
            self.log.log({"kind": "train", "step": step, "epoch": self.pos.epoch, "loss": window.mean_loss,
                          "lr": self.scheduler.value(step - 1) * cfg.optim.branch_lr_mult,
                          "clips_per_second": window.clips_per_second(self.env.world_size)})
            window.reset()

    def evaluate(self, tag: str) -> dict:
        metrics = evaluate(self.model, self.datasets.val, self.env, class_names=self.class_names,
                           batch_size=self.cfg.eval.batch_size, workers=self.cfg.data.workers,
                           amp_dtype=self.amp_dtype, out_dir=self.out / "eval", video_paths=self.datasets.val_paths,
                           progress=self.progress)
        if self.log is not None:
            self.log.log({"kind": "eval", "step": self.pos.step, "epoch": self.pos.epoch, "top1": metrics["top1"],
                          "top5": metrics["top5"], "mean_class_accuracy": metrics["mean_class_accuracy"]})
            logger.info("[%s] top-1 %.2f%%  top-5 %.2f%%  mean class %.2f%%  (%d videos)", tag,
                        100 * metrics["top1"], 100 * metrics["top5"], 100 * metrics["mean_class_accuracy"],
                        metrics["num_videos"])
        return metrics

    # ------------------------------------------------------------------ the end
    def result(self, status: str, metrics: dict) -> TrainResult:
        return TrainResult(status, self.out, self.pos.step, self.pos.epoch, metrics, self.pos.train_seconds,
                           self.trainable)

    def finish(self, status: str) -> TrainResult:
        """Evaluate, save the model (with its test-time preprocessing), plot and summarise."""
        metrics = self.evaluate("final")
        if self.env.is_main:
            model, out, pos = self.model, self.out, self.pos
            model.save_pretrained(out / "model", clip_path=_clip_reference(self.cfg),
                                  metadata={"preprocess": _preprocess(self.cfg)})
            if self.log is not None:
                records = self.log.read()
                if any(r.get("kind") == "train" for r in records):
                    plot_training_curves(records, out / "training_curves.png", title=f"{model.method} on "
                                         f"{len(self.class_names)} classes")
                self.log.close()
            summary = {"status": status, "method": model.method, "step": pos.step, "epoch": pos.epoch,
                       "trainable_params": self.trainable, "train_seconds": pos.train_seconds,
                       "skipped_steps": pos.skipped,
                       **{k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy", "num_videos")}}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return self.result(status, metrics)


def _clip_reference(cfg: Config) -> str | None:
    """Refer to the CLIP file instead of copying it, unless it is a built-in encoder."""
    if cfg.model.method == "full-finetune" or not cfg.model.clip or cfg.model.clip.startswith("builtin:"):
        return None
    return cfg.model.clip


def _preprocess(cfg: Config) -> dict:
    """The test-time preprocessing a model records beside its weights, for ``dist-video predict``."""
    return {
        "num_frames": cfg.model.dist.num_frames, "sampling": cfg.data.sampling, "interval": cfg.data.interval,
        "crop_size": cfg.data.crop_size, "test_scale": cfg.data.test_scale, "num_views": cfg.data.num_views,
        "num_crops": cfg.data.num_crops, "mean": cfg.data.mean, "std": cfg.data.std,
    }
