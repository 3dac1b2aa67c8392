"""What every inference form is made with: folds computed in float64, buffers in the compute
dtype, and the few kernels they run.

Each training module (:mod:`dist_video.clip`, :mod:`dist_video.dist`) has a ``fuse(dtype, ...)``
method beside its ``forward`` that returns its inference form: an ``nn.Module`` whose tensors
are :class:`Buffers` (no parameters), computing the same function in ``eval()`` mode without
autograd with every algebraic simplification done once, when the form is made. The folds
used across parts:

- a LayerNorm's affine folded into the linear map after it (:func:`fold_norm`):
  ``LN(x) W^T + b = n(x) (W diag(gamma))^T + (W beta + b)``, ``n`` the normalisation without
  affine (:func:`normalize`);
- biases that reach the same sum merged into one (:func:`add_present`);
- QuickGELU's factor: ``QuickGELU(z) = silu(1.702 z) / 1.702``, so 1.702 goes into the weights
  before it and 1/1.702 into the weights after it (:func:`scaled`).

Folds are computed in float64 (:func:`f64`) and rounded once to the compute dtype
(:meth:`Buffers.keep`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["f64", "fold_norm", "scaled", "add_present", "Buffers", "linear", "accumulate", "normalize",
           "ACTIVATIONS"]


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor detached in float64 (None stays None): folds are computed in float64."""
    return None if t is None else t.detach().to(torch.float64)


def fold_norm(ln: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A LayerNorm's affine folded into the linear map after it (float64): W: C_out x C ->
    ``(W diag(gamma), W beta + b)``."""
    weight, bias = f64(weight), f64(bias)
    if ln.bias is not None:
        shift = weight @ f64(ln.bias)
        bias = shift if bias is None else bias + shift
    if ln.weight is not None:
        weight = weight * f64(ln.weight)
    return weight, bias


def scaled(t: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """``scale * t`` in float64 (None stays None)."""
    return None if t is None else f64(t) * scale


def add_present(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    """The float64 sum of the tensors that are not None (None if all are)."""
    present = [f64(t) for t in tensors if t is not None]
    return sum(present[1:], present[0]) if present else None


class Buffers(nn.Module):
    """A module whose tensors are buffers (saved in ``state_dict``, moved by ``.to()``)."""

    def keep(self, dtype: torch.dtype, **tensors: torch.Tensor | None) -> None:
        """Each tensor rounded once to ``dtype`` and registered as a buffer of that name."""
        for name, t in tensors.items():
            self.register_buffer(name, None if t is None else t.detach().to(dtype).contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` on a 2-D x, bias as the product's accumulator."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def accumulate(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """``out += x W^T + b`` in place (2-D)."""
    out.addmm_(x, weight.t())
    return out if bias is None else out.add_(bias)


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension without affine."""
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


#: The activations of an inference-form MLP by name (QuickGELU is folded into ``silu``).
ACTIVATIONS = {"silu": lambda h: F.silu(h, inplace=True), "gelu": F.gelu,
               "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}
