"""AdamW parameter groups and the per-step cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch

from ..classifier import VideoClassifier
from ..config import OptimConfig

__all__ = ["parameter_groups", "build_optimizer", "CosineSchedule"]


def parameter_groups(model: VideoClassifier, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters in four groups: {pre-trained CLIP, new} x {decay, no decay}.

    The model says which parameters get no weight decay (``model.no_weight_decay()``, timm's
    convention). New parameters (the DiST branch, adapters, a linear head) get
    ``branch_lr_mult`` times the learning rate; CLIP's own weights (only trained by
    ``full-finetune``) get the base rate. Each group carries ``lr_scale``, which
    :class:`CosineSchedule` multiplies in."""
    no_decay = model.no_weight_decay()
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = not name.startswith("clip.")
        decay = name not in no_decay
        groups.setdefault((new, decay), []).append(p)
        names.setdefault((new, decay), []).append(name)
    out = []
    for (new, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "param_names": names[(new, decay)],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": cfg.branch_lr_mult if new else 1.0,
            "group_name": f"{'new' if new else 'clip'}-{'decay' if decay else 'no_decay'}",
        })
    return out


def build_optimizer(model: VideoClassifier, cfg: OptimConfig, lr: float) -> torch.optim.AdamW | None:
    """AdamW over :func:`parameter_groups`; ``None`` when nothing is trainable."""
    groups = parameter_groups(model, cfg)
    if not groups:
        return None
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return adamw(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where the parameters' device has one (CPU and CUDA:
    one pass over each tensor instead of several), else the default multi-tensor implementation."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


class CosineSchedule:
    """Learning rate per optimizer update: linear warm-up from ``start_lr`` to ``lr`` over
    ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``. Each group's rate is
    this value times its ``lr_scale``."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, lr: float, total_steps: int,
                 warmup_steps: int, start_lr: float, min_lr: float):
        self.optimizer = optimizer
        self.lr, self.total_steps, self.warmup_steps = lr, max(1, total_steps), max(0, warmup_steps)
        self.start_lr, self.min_lr = start_lr, min_lr
        self.step_count = 0
        self._apply()

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.lr - self.start_lr) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, progress)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        if self.optimizer is None:
            return
        lr = self.value(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    @property
    def current(self) -> float:
        return self.value(self.step_count)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
