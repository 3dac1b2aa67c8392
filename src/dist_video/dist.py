"""The DiST branch: temporal encoder, integration blocks and adaptive pooling.

Notation (see ``reference/DiST.md``): B clips of T dense frames; the frozen CLIP sees
T' = T / alpha sparse frames, each as N + 1 tokens (N = g*g patches + a class token) of width
D. C_t is the temporal width, C_i the integration width, E the CLIP embedding width.

Inside the integration branch tokens are kept batch-first per frame, ``B*T' x (N+1) x C_i``
(frame index fastest within a clip), which is how CLIP returns them.

Parameter names mirror the authors' release (``input_linears``, ``integration_nets``,
``adapooling_nets`` ...), except that their ``temporal_stem`` / ``temporal_nets`` live here in
:class:`TemporalEncoder` as ``temporal_encoder.stem`` / ``temporal_encoder.blocks``;
:mod:`dist_video.checkpoints` maps one onto the other.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .clip import (QUICK_GELU_SCALE, LayerNorm, MultiheadAttention, QuickGELU, mlp_without_autograd, quick_gelu,
                   quick_gelu_backward)

# Every QuickGELU here acts on a fresh output of a linear layer or a sum, so without autograd
# (inference) it may overwrite its input: ``QuickGELU(inplace=True)``.

_inference_cache: dict | None = None  # active inside cached_inference_weights()


@contextmanager
def cached_inference_weights():
    """Inside this context the inference (no-autograd) paths compute the weights they derive
    from parameters once and reuse them: casts to the compute dtype, LayerNorm affines folded
    into the following linear maps, merged biases. Without it they are derived on every call,
    which on one clip costs about a tenth of the branch's time on a 2-core CPU. Parameters must
    not change inside the context (as with ``torch.nn.utils.parametrize.cached``); evaluation
    and prediction loops use it. Nested contexts share the outer cache."""
    global _inference_cache
    outer = _inference_cache
    if outer is None:
        _inference_cache = {}
    try:
        yield
    finally:
        if outer is None:
            _inference_cache = None


def _derived(owner: nn.Module, tag: str, dtype: torch.dtype, make):
    """``make()`` (tensors derived from ``owner``'s parameters for inference, in ``dtype``),
    cached per (owner, tag, dtype) inside :func:`cached_inference_weights` and never while
    autograd records."""
    if _inference_cache is None or torch.is_grad_enabled():
        return make()
    key = (id(owner), tag, dtype)
    hit = _inference_cache.get(key)
    if hit is None or hit[0] is not owner:  # the owner is kept, so its id cannot be reused
        hit = _inference_cache[key] = (owner, make())
    return hit[1]


def _cast(t: torch.Tensor | None, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor | None:
    """``scale * t`` in ``dtype`` (the product in t's own precision), or None."""
    if t is None:
        return None
    return (t * scale if scale != 1.0 else t).to(dtype)

__all__ = [
    "DiSTConfig",
    "PRESETS",
    "TemporalBlock",
    "TemporalEncoder",
    "IntegrationToTemporal",
    "TemporalToIntegration",
    "IntegrationBlock",
    "CrossAttention",
    "AdaptivePooling",
    "DiSTBranch",
    "CHECKPOINTING_MODES",
    "checkpointing_mode",
    "cached_inference_weights",
]


@dataclass
class DiSTConfig:
    """Sizes of the DiST branch.

    ``selected_layers`` lists the CLIP blocks the branch reads (``None`` = all of them; it is
    resolved against the CLIP model when the branch is built). The temporal stem's spatial
    patch is always CLIP's patch size, so it is not a field.
    """

    num_frames: int = 16
    alpha: int = 2
    temporal_dim: int = 96
    integration_dim: int = 384
    stem_kernel: int = 5
    temporal_kernel: int = 3
    temporal_mlp_ratio: float = 1.0
    integration_mlp_ratio: float = 1.0
    integration_temporal_mlp_ratio: float = 0.25
    pooling_layers: int = 4
    selected_layers: list[int] | None = None

    def __post_init__(self):
        if self.num_frames % self.alpha:
            raise ValueError(f"num_frames ({self.num_frames}) must be a multiple of alpha ({self.alpha})")
        if self.integration_dim % 64:
            raise ValueError(f"integration_dim ({self.integration_dim}) must be a multiple of 64 "
                             "(attention heads are integration_dim / 64)")
        if self.temporal_kernel % 2 == 0 or self.stem_kernel % 2 == 0:
            raise ValueError("stem_kernel and temporal_kernel must be odd")
        if self.selected_layers is not None:
            self.selected_layers = [int(i) for i in self.selected_layers]
            if not self.selected_layers:
                raise ValueError("selected_layers must not be empty")
            if sorted(set(self.selected_layers)) != self.selected_layers:
                raise ValueError(f"selected_layers must be strictly increasing, got {self.selected_layers}")

    @property
    def sparse_frames(self) -> int:
        """T': the number of frames that go through CLIP."""
        return self.num_frames // self.alpha

    def resolve_layers(self, clip_layers: int) -> list[int]:
        """The selected CLIP blocks, checked against a CLIP with ``clip_layers`` blocks."""
        layers = list(range(clip_layers)) if self.selected_layers is None else list(self.selected_layers)
        bad = [i for i in layers if not 0 <= i < clip_layers]
        if bad:
            raise ValueError(f"selected_layers {bad} out of range for a CLIP with {clip_layers} blocks")
        return layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiSTConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DiSTConfig fields {unknown}; valid: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiSTConfig":
        """A published setting, e.g. ``k400-vit-b16-8+16f`` (see :data:`PRESETS`)."""
        if name not in PRESETS:
            import difflib
            near = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"unknown DiST preset {name!r}{hint} Known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _published_presets() -> dict[str, dict]:
    presets = {}
    for dataset, pooling in (("k400", 4), ("ssv2", 2)):
        for sparse in (8, 16, 32):
            presets[f"{dataset}-vit-b16-{sparse}+{2 * sparse}f"] = dict(
                num_frames=2 * sparse, alpha=2, pooling_layers=pooling, selected_layers=None)
        presets[f"{dataset}-vit-l14-32+64f"] = dict(
            num_frames=64, alpha=2, pooling_layers=pooling, selected_layers=None)
    return presets


#: Published settings (Qing et al., ICCV 2023). Every preset uses all CLIP blocks
#: (``selected_layers=None``), C_t = 96, C_i = 384, stem kernel 5, temporal kernel 3.
PRESETS: dict[str, dict] = _published_presets()


_fused_conv_failed = False  # set if oneDNN refused a fused call on this machine: plain kernels from then on


def _fused_conv_available(x: torch.Tensor) -> bool:
    return (not _fused_conv_failed and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _try_fused(call):
    """Run a fused oneDNN call; None if this build or CPU refuses it (remembered)."""
    global _fused_conv_failed
    try:
        return call()
    except RuntimeError:
        _fused_conv_failed = True
        return None


def _conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> torch.Tensor:
    """``silu(conv3d(x))`` (stride 1), one oneDNN call with the SiLU fused where available."""
    if _fused_conv_available(x):
        out = _try_fused(lambda: torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1, "swish", [], ""))
        if out is not None:
            return out
    return F.silu(F.conv3d(x, weight, bias, padding=padding), inplace=True)


def _conv_add(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              padding) -> torch.Tensor:
    """``conv3d(x) + other`` (stride 1), one oneDNN call with the add fused where available."""
    if _fused_conv_available(x):
        out = _try_fused(lambda: torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1, "add", 1.0, None, [], ""))
        if out is not None:
            return out
    return F.conv3d(x, weight, bias, padding=padding).add_(other)


class _TemporalBlockFunction(torch.autograd.Function):
    """A :class:`TemporalBlock` with its own backward that keeps the block input and the two
    pre-activations (plus the LayerNorm statistics) and recomputes the two convolution inputs
    (the LayerNorm output and the first QuickGELU's output, elementwise passes) instead of
    storing them: three saved activations instead of six. Inputs are in the compute dtype;
    x: B x C_t x T x g x g (channels-last in practice) -> same."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, w1, b1, pad1, w2, b2, pad2):
        with torch.autocast(x.device.type, enabled=False):
            c = x.shape[1]
            y, mean, rstd = torch.native_layer_norm(x.permute(0, 2, 3, 4, 1), (c,), ln_weight, ln_bias, eps)
            h1 = F.conv3d(y.permute(0, 4, 1, 2, 3), w1, b1, padding=pad1)  # the first pre-activation
            z = F.conv3d(quick_gelu(h1), w2, b2, padding=pad2).add_(x)  # the second
        ctx.save_for_backward(x, mean, rstd, h1, z, ln_weight, ln_bias, w1, w2)
        ctx.eps, ctx.pad1, ctx.pad2 = eps, pad1, pad2
        ctx.has_bias = (b1 is not None, b2 is not None)
        return quick_gelu(z)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, h1, z, ln_weight, ln_bias, w1, w2 = ctx.saved_tensors
        c = x.shape[1]
        conv_backward = torch.ops.aten.convolution_backward
        with torch.autocast(x.device.type, enabled=False):
            grad_z = quick_gelu_backward(grad, z)
            g1 = quick_gelu(h1)  # recomputed: c_fc2's input
            grad_g1, grad_w2, grad_b2 = conv_backward(
                grad_z, g1, w2, [w2.shape[0]] if ctx.has_bias[1] else None, [1, 1, 1], list(ctx.pad2), [1, 1, 1],
                False, [0, 0, 0], 1, [True, True, ctx.has_bias[1]])
            del g1
            grad_h1 = quick_gelu_backward(grad_g1, h1)
            del grad_g1
            x_last = x.permute(0, 2, 3, 4, 1)
            y = torch.native_layer_norm(x_last, (c,), ln_weight, ln_bias, ctx.eps)[0]  # recomputed: c_fc1's input
            grad_y, grad_w1, grad_b1 = conv_backward(
                grad_h1, y.permute(0, 4, 1, 2, 3), w1, [w1.shape[0]] if ctx.has_bias[0] else None, [1, 1, 1],
                list(ctx.pad1), [1, 1, 1], False, [0, 0, 0], 1, [True, True, ctx.has_bias[0]])
            del y, grad_h1
            grad_x, grad_ln_w, grad_ln_b = torch.ops.aten.native_layer_norm_backward(
                grad_y.permute(0, 2, 3, 4, 1), x_last, (c,), mean, rstd, ln_weight, ln_bias,
                [True, ln_weight is not None, ln_bias is not None])
            grad_x = grad_x.permute(0, 4, 1, 2, 3).add_(grad_z)  # the residual
        return grad_x, grad_ln_w, grad_ln_b, None, grad_w1, grad_b1, None, grad_w2, grad_b2, None


class TemporalBlock(nn.Module):
    """One block of the temporal encoder, on B x C_t x T x g x g.

    ``x = QuickGELU(x + conv(1,3,3)(QuickGELU(conv(k,1,1)(LN_c(x)))))``.
    """

    def __init__(self, dim: int, kernel: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln = LayerNorm(dim)
        self.temporal_net = nn.Sequential(OrderedDict([
            ("c_fc1", nn.Conv3d(dim, hidden, (kernel, 1, 1), padding=(kernel // 2, 0, 0))),
            ("gelu1", QuickGELU(inplace=True)),
            ("c_fc2", nn.Conv3d(hidden, dim, (1, 3, 3), padding=(0, 1, 1))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._forward_autograd(x)
        return self.forward_scaled_no_grad(x, input_scaled=False).div_(QUICK_GELU_SCALE)

    def _forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """Training: through :class:`_TemporalBlockFunction`, which keeps three activations
        per block for backward instead of six (same values and gradients)."""
        dtype = x.dtype  # the compute dtype: the stem's output follows autocast
        c1, c2 = self.temporal_net.c_fc1, self.temporal_net.c_fc2
        return _TemporalBlockFunction.apply(
            x, self.ln.weight.to(dtype), self.ln.bias.to(dtype), self.ln.eps, c1.weight.to(dtype),
            c1.bias.to(dtype), c1.padding, c2.weight.to(dtype), c2.bias.to(dtype), c2.padding)

    def forward_scaled_no_grad(self, x: torch.Tensor, input_scaled: bool = True) -> torch.Tensor:
        """Inference on features carried scaled by s = 1.702 (QuickGELU's factor): returns
        ``s * forward(x)`` for an input ``s * x`` (``input_scaled``) or ``x``.

        QuickGELU(z) = silu(s z) / s, so with the factors moved into the convolutions' weights
        the block is: LayerNorm (scale-invariant: the input's scale goes into its epsilon),
        conv + SiLU, conv + residual add, SiLU, and its output is s times the block's. On CPUs
        with oneDNN each conv runs fused with its SiLU or its residual add (two passes over the
        features instead of five, and no division)."""
        s = QUICK_GELU_SCALE
        c1, c2 = self.temporal_net.c_fc1, self.temporal_net.c_fc2
        dtype = x.dtype
        ln_w, ln_b, w1, b1, w2, b2 = _derived(self, "scaled weights", dtype, lambda: (
            _cast(self.ln.weight, dtype), _cast(self.ln.bias, dtype), _cast(c1.weight, dtype, s),
            _cast(c1.bias, dtype, s), _cast(c2.weight, dtype), _cast(c2.bias, dtype, s)))
        eps = self.ln.eps * (s * s if input_scaled else 1.0)  # LN(s x; s^2 eps) = LN(x; eps)
        y = F.layer_norm(x.permute(0, 2, 3, 4, 1), x.shape[1:2], ln_w, ln_b, eps).permute(0, 4, 1, 2, 3)
        h = _conv_silu(y, w1, b1, c1.padding)  # s * QuickGELU(c_fc1(y))
        if input_scaled:
            z = _conv_add(h, x, w2, b2, c2.padding)  # s * (x + c_fc2(QuickGELU(c_fc1(y))))
        else:
            z = F.conv3d(h, w2, b2, padding=c2.padding).add_(x, alpha=s)
        return F.silu(z, inplace=True)


class PatchStem(nn.Conv3d):
    """The temporal stem: Conv3d(3 -> C_t, kernel (k_s, P, P), stride (1, P, P), padding
    (k_s // 2, 0, 0)) on B x 3 x T x H x W -> B x C_t x T x g x g.

    Same parameters as ``nn.Conv3d`` (checkpoints load unchanged), computed as k_s matrix
    products over non-overlapping patches: the stride equals the spatial kernel, so the
    convolution is a patch embedding summed over k_s shifted frames. About 3.5x faster than
    the generic 3D convolution (forward + backward) on CPUs, and only one copy of the patches
    is kept for backward."""

    def __init__(self, dim: int, patch_size: int, kernel: int):
        super().__init__(3, dim, kernel_size=(kernel, patch_size, patch_size), stride=(1, patch_size, patch_size),
                         padding=(kernel // 2, 0, 0))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        k, p = self.kernel_size[0], self.kernel_size[1]
        g1, g2 = h // p, w // p
        dtype = (torch.get_autocast_dtype(video.device.type) if torch.is_autocast_enabled(video.device.type)
                 else self.weight.dtype)
        # B x (T + k - 1) x N x 3P^2, zero frames before and after: one strided copy (with the
        # cast) from the video into the padded buffer.
        patches = video.new_empty(b, t + k - 1, g1 * g2, c * p * p, dtype=dtype)
        patches[:, :k // 2].zero_()
        patches[:, k // 2 + t:].zero_()
        src = video[..., :g1 * p, :g2 * p].unflatten(4, (g2, p)).unflatten(3, (g1, p))  # B x 3 x T x g x P x g x P
        patches[:, k // 2:k // 2 + t].view(b, t, g1, g2, c, p, p).copy_(src.permute(0, 2, 3, 5, 1, 4, 6))
        weight, bias = _derived(self, "patch weights", dtype, lambda: (
            self.weight.to(dtype).permute(2, 0, 1, 3, 4).reshape(k, self.out_channels, c * p * p),
            _cast(self.bias, dtype)))
        rows = t * g1 * g2
        outs = []
        with torch.autocast(video.device.type, enabled=False):
            for clip in patches:  # per clip, each time shift is a contiguous T*N x 3P^2 view: no copies
                y = torch.addmm(bias, clip[0:t].view(rows, -1), weight[0].t())
                for dt in range(1, k):
                    y = torch.addmm(y, clip[dt:dt + t].view(rows, -1), weight[dt].t())
                outs.append(y)
        y = torch.stack(outs)  # B x T*N x C_t
        return y.view(b, t, g1, g2, self.out_channels).permute(0, 4, 1, 2, 3)  # B x C_t x T x g x g


class TemporalEncoder(nn.Module):
    """The dense-frame 3D-conv network: a stem and one :class:`TemporalBlock` per selected layer.

    The blocks are interleaved with the integration branch by :class:`DiSTBranch`, so this
    module holds them but its ``stem`` is the only part called directly.
    """

    def __init__(self, dim: int, num_blocks: int, patch_size: int, stem_kernel: int,
                 kernel: int, mlp_ratio: float):
        super().__init__()
        # B x 3 x T x H x W -> B x C_t x T x g x g; the spatial patch equals CLIP's.
        self.stem = PatchStem(dim, patch_size, stem_kernel)
        self.blocks = nn.ModuleList([TemporalBlock(dim, kernel, mlp_ratio) for _ in range(num_blocks)])


class IntegrationToTemporal(nn.Module):
    """Integration tokens -> temporal features: Linear(C_i -> C_t) on the patch tokens,
    upsampled x alpha in time and added to the temporal features.
    x_t: B x C_t x T x g x g, m: B*T' x (N+1) x C_i -> B x C_t x T x g x g."""

    def __init__(self, integration_dim: int, temporal_dim: int, alpha: int):
        super().__init__()
        self.alpha = alpha
        self.linear_fuse = nn.Linear(integration_dim, temporal_dim)

    def forward(self, x_t: torch.Tensor, m: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
        return self._add_upsampled(x_t, self.linear_fuse(m[:, 1:]), batch, grid)  # class token dropped

    def forward_no_grad(self, x_t: torch.Tensor, m: torch.Tensor, batch: int, grid: tuple[int, int],
                        shift: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """Inference: ``forward(x_t, m - shift)`` for temporal features carried scaled
        (``x_t`` = scale * the features, and so is the result). ``shift``: C_i, a bias that m
        holds on every token, removed through the linear map's bias: ``W (m - s) + b =
        W m + (b - W s)``. The linear map runs on all N+1 tokens, a contiguous matrix, instead
        of copying the patch tokens out first."""
        fuse = self.linear_fuse

        def weights():
            bias = fuse.bias
            if shift is not None:
                w_shift = (fuse.weight * shift.to(fuse.weight.dtype)).sum(dim=1)  # elementwise: full precision
                bias = -w_shift if bias is None else bias - w_shift
            return _cast(fuse.weight, m.dtype, scale), _cast(bias, m.dtype, scale)

        weight, bias = _derived(self, f"weights, shifted, x{scale}", m.dtype, weights)
        bt, length, c_i = m.shape
        x2d = m.reshape(-1, c_i)
        x = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        return self._add_upsampled(x_t, x.view(bt, length, -1)[:, 1:], batch, grid)

    def _add_upsampled(self, x_t: torch.Tensor, x: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
        """x_t: B x C_t x T x g x g, x: B*T' x N x C_t -> x_t + x upsampled x alpha in time."""
        bt, _, c = x.shape
        x = x.reshape(batch, bt // batch, 1, grid[0], grid[1], c).permute(0, 5, 1, 2, 3, 4)  # B x C_t x T' x 1 x g x g
        b, c_t, t, g1, g2 = x_t.shape
        # Nearest-neighbour upsampling in time by broadcasting: each of a sparse frame's alpha
        # dense frames gets the same update, without an upsampled copy.
        return (x_t.view(b, c_t, t // self.alpha, self.alpha, g1, g2) + x).reshape(b, c_t, t, g1, g2)


class TemporalToIntegration(nn.Module):
    """Temporal features -> integration tokens: Conv3d(C_t -> C_i, kernel/stride (alpha,1,1)),
    with a learnable per-frame class token in front, added to the integration tokens.
    m: B*T' x (N+1) x C_i, x_t: B x C_t x T x g x g -> B*T' x (N+1) x C_i."""

    def __init__(self, temporal_dim: int, integration_dim: int, alpha: int, sparse_frames: int):
        super().__init__()
        self.linear_fuse = nn.Conv3d(temporal_dim, integration_dim, kernel_size=(alpha, 1, 1),
                                     stride=(alpha, 1, 1))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, sparse_frames, integration_dim))

    def patch_tokens(self, x_t: torch.Tensor) -> torch.Tensor:
        """The convolution, token-last: B x C_t x T x g x g -> B x T' x N x C_i.

        Kernel and stride are (alpha, 1, 1), so it is one linear map of each position's alpha
        frames' features (same parameters and values), computed as a matrix product on the
        channels-last temporal features instead of a convolution plus a permuted copy."""
        b, c_t, t, g1, g2 = x_t.shape
        conv = self.linear_fuse
        a = conv.kernel_size[0]
        # B x T' x N x (alpha*C_t), frame-major within a position: one copy of the features
        pairs = x_t.permute(0, 2, 3, 4, 1).reshape(b, t // a, a, g1 * g2, c_t).transpose(2, 3)
        pairs = pairs.reshape(b, t // a, g1 * g2, a * c_t)
        weight = conv.weight.flatten(2).transpose(1, 2).reshape(conv.out_channels, a * c_t)  # C_i x alpha*C_t
        return F.linear(pairs, weight, conv.bias)

    def forward(self, m: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        x = self.patch_tokens(x_t)  # B x T' x N x C_i
        b, t, _, c = x.shape
        cls = self.cls_token[0].unsqueeze(2).to(x.dtype)  # 1 x T' x 1 x C_i
        return m + torch.cat([cls.expand(b, t, 1, c), x], dim=2).flatten(0, 1)

    def add_no_grad(self, m: torch.Tensor, x_t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Inference: ``forward(m, x_t)`` in place, for an m that already holds the
        convolution's bias on every token (the DiST branch adds it with the input linear
        map's). The product accumulates straight into m: the features are laid out with a zero
        row for each class token, so one matrix product covers every token, and the class
        tokens then get ``cls_token - bias``. m: B*T' x (N+1) x C_i (contiguous) -> m; ``x_t``
        may be carried scaled (scale * the temporal features)."""
        b, c_t, t, g1, g2 = x_t.shape
        conv = self.linear_fuse
        a = conv.kernel_size[0]
        _, length, c_i = m.shape
        dtype = m.dtype
        pairs = x_t.new_empty(b, t // a, length, a * c_t, dtype=dtype)  # B x T' x (N+1) x alpha*C_t
        pairs[:, :, 0].zero_()
        src = x_t.permute(0, 2, 3, 4, 1).reshape(b, t // a, a, g1 * g2, c_t).transpose(2, 3)
        pairs[:, :, 1:].view(b, t // a, g1 * g2, a, c_t).copy_(src)
        def weights():
            cls = self.cls_token[0, 0]  # T' x C_i, one per frame
            if conv.bias is not None:
                cls = cls - conv.bias.to(cls.dtype)
            weight = conv.weight.flatten(2).transpose(1, 2).reshape(c_i, a * c_t)
            return _cast(weight, dtype, 1 / scale), cls.to(dtype)

        weight, cls = _derived(self, f"weights, class tokens, /{scale}", dtype, weights)
        m.view(-1, c_i).addmm_(pairs.view(-1, a * c_t), weight.t())
        m.view(b, t // a, length, c_i)[:, :, 0] += cls
        return m


class IntegrationBlock(nn.Module):
    """``res = FFN(LN(m)) + TFFN(LN'(m))`` on B*T' x (N+1) x C_i.

    TFFN treats the N+1 tokens of a frame as positions and mixes each position over time:
    1x1x1 conv C_i -> C_i*r, conv (k,1,1), QuickGELU, 1x1x1 conv back.
    """

    def __init__(self, dim: int, mlp_ratio: float, temporal_mlp_ratio: float, kernel: int,
                 sparse_frames: int):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        t_hidden = int(dim * temporal_mlp_ratio)
        self.sparse_frames = sparse_frames
        self.ffn = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(dim, hidden)),
            ("gelu", QuickGELU(inplace=True)),
            ("c_proj", nn.Linear(hidden, dim)),
        ]))
        self.temporal_ffn = nn.Sequential(OrderedDict([
            ("c_fc1", nn.Conv3d(dim, t_hidden, kernel_size=1)),
            ("c_fc2", nn.Conv3d(t_hidden, t_hidden, (kernel, 1, 1), padding=(kernel // 2, 0, 0))),
            ("gelu1", QuickGELU(inplace=True)),
            ("c_proj", nn.Conv3d(t_hidden, dim, kernel_size=1)),
        ]))
        self.ln = LayerNorm(dim)
        self.ln_temporal = LayerNorm(dim)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.forward_no_grad(m)
        return self.ffn(self.ln(m)) + self.temporal_mix(self.ln_temporal(m))

    def forward_no_grad(self, m: torch.Tensor, extra_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Inference, ``forward(m) + extra_bias`` with fewer passes over the tokens.

        m: B*T' x (N+1) x C_i -> B*T' x (N+1) x C_i (``extra_bias``: C_i or None, added at no
        cost: the DiST branch passes the next layer's input biases). Both LayerNorms read the
        same m, so it is normalised once and each affine is folded into the linear map after
        it: ``LN(m) W^T + b = n (W diag(gamma))^T + (W beta + b)``. TFFN's output, created
        with both output biases, accumulates the FFN's."""
        bt, length, c = m.shape
        dtype = m.dtype
        x = m.reshape(-1, c)
        fc, fc1 = self.ffn.c_fc, self.temporal_ffn.c_fc1
        shared = self.ln.eps == self.ln_temporal.eps

        def weights():
            if shared:
                folded = (*_fold_layer_norm(self.ln, fc.weight, fc.bias, dtype),
                          *_fold_layer_norm(self.ln_temporal, fc1.weight.flatten(1), fc1.bias, dtype))
            else:
                folded = (fc.weight.to(dtype), _cast(fc.bias, dtype), fc1.weight.flatten(1).to(dtype),
                          _cast(fc1.bias, dtype))
            out_bias = _sum_biases(self.temporal_ffn.c_proj.bias, self.ffn.c_proj.bias, extra_bias, dtype=dtype)
            return (*folded, self.ffn.c_proj.weight.to(dtype), out_bias)

        fc_w, fc_b, fc1_w, fc1_b, proj_w, out_bias = _derived(
            self, "folded weights" + (", extra bias" if extra_bias is not None else ""), dtype, weights)
        if shared:
            n = n_temporal = F.layer_norm(x, (c,), None, None, self.ln.eps)  # one normalisation
        else:
            n, n_temporal = self.ln(x), self.ln_temporal(x)
        h = torch.addmm(fc1_b, n_temporal, fc1_w.t()) if fc1_b is not None else n_temporal @ fc1_w.t()
        out = self._temporal_conv_mlp(h.view(bt, length, -1), out_bias)  # B*T'*(N+1) x C_i
        out = mlp_without_autograd(n, fc_w, fc_b, self.ffn.gelu, proj_w, None, residual=out, overwrite_residual=True)
        return out.view(bt, length, c)

    def temporal_mix(self, y: torch.Tensor) -> torch.Tensor:
        """TFFN on B*T' x (N+1) x C_i, token-last: the 1x1x1 convolutions are linear layers and
        the (k,1,1) convolution one matrix product over k time-shifted copies, so no layout
        change is needed (same parameters and values as the convolutions)."""
        fc1 = self.temporal_ffn.c_fc1
        h = F.linear(y, fc1.weight.flatten(1), fc1.bias)  # B*T' x (N+1) x C_h
        return self._temporal_conv_mlp(h, self.temporal_ffn.c_proj.bias).view_as(y)

    def _temporal_conv_mlp(self, h: torch.Tensor, proj_bias: torch.Tensor | None) -> torch.Tensor:
        """TFFN after its first linear map: conv (k,1,1), QuickGELU, 1x1x1 conv (with
        ``proj_bias``). h: B*T' x (N+1) x C_h -> B*T'*(N+1) x C_i."""
        bt, length, _ = h.shape
        t = self.sparse_frames
        fc2, proj = self.temporal_ffn.c_fc2, self.temporal_ffn.c_proj
        h = h.view(bt // t, t, length, -1)  # B x T' x (N+1) x C_h
        k = fc2.kernel_size[0]
        padded = F.pad(h, (0, 0, 0, 0, k // 2, k // 2))  # zero frames before and after
        shifted = torch.cat([padded[:, dt:dt + t] for dt in range(k)], dim=-1)  # B x T' x (N+1) x k*C_h

        def weights(dtype):  # the (k,1,1) conv as C_h x k*C_h, the 1x1x1 conv as C_i x C_h
            return (fc2.weight.flatten(2).permute(0, 2, 1).reshape(fc2.out_channels, -1).to(dtype),
                    _cast(fc2.bias, dtype), proj.weight.flatten(1).to(dtype))

        if not torch.is_grad_enabled():
            dtype = h.dtype
            w2, b2, wp = _derived(self, "temporal conv weights", dtype, lambda: weights(dtype))
            return mlp_without_autograd(shifted, w2, b2, self.temporal_ffn.gelu1, wp,
                                        _cast(proj_bias, dtype)).view(-1, proj.out_channels)
        w2, b2, wp = weights(fc2.weight.dtype)
        h = self.temporal_ffn.gelu1(F.linear(shifted, w2, b2))
        return F.linear(h, wp, proj_bias).view(-1, proj.out_channels)


def _sum_biases(*biases: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The sum of the given biases (``None`` entries skipped; ``None`` if all are), in
    ``dtype``, summed in their own precision first."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    total = present[0]
    for b in present[1:]:
        total = total + b.to(total.dtype)
    return total.to(dtype)


def _fold_layer_norm(ln: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A LayerNorm's affine folded into the linear map after it: ``LN(x) W^T + b =
    norm(x) (W diag(gamma))^T + (W beta + b)``, norm without affine. W: C_out x C -> the folded
    (W', b') in ``dtype``, computed in the parameters' precision."""
    if ln.weight is not None:
        weight_folded = weight * ln.weight
    else:
        weight_folded = weight
    if ln.bias is not None:
        shift = (weight * ln.bias).sum(dim=1)  # W beta, elementwise so autocast leaves it in full precision
        bias = shift if bias is None else bias + shift
    return weight_folded.to(dtype), _cast(bias, dtype)


class CrossAttention(nn.Module):
    """``attn(LN(q), LN(kv), LN(kv))``: one LayerNorm shared by query, key and value."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(dim, heads)
        self.ln_1 = LayerNorm(dim)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # query: S x Lq x C, kv: S x Lk x C -> S x Lq x C
        return self.attn(self.ln_1(query), kv=self.ln_1(kv))

    def forward_normalized(self, query: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
        """Inference: ``forward(query, kv)`` from ``normalized``, kv normalised without the
        affine (S x Lk x C; several layers share it), for a few queries (Lq << Lk).

        Keys and values are never formed. LayerNorm's affine is folded into their projections
        (W_k', b_k', W_v', b_v'); then per head h, ``q_h . k_j = (W_k'_h^T q_h) . n_j + q_h . b_k'_h``,
        where the last term is the same for every key and cancels in the softmax, and
        ``sum_j a_j v_j = W_v'_h (sum_j a_j n_j) + b_v'_h`` since the weights sum to one. That is
        two products of the queries with ``normalized`` instead of projecting all Lk tokens
        (on DiST's pooling: ~60x fewer multiply-accumulates)."""
        s, lq, c = query.shape
        attn = self.attn
        heads = attn.heads
        d = c // heads
        dtype = normalized.dtype
        w, b = attn.in_proj_weight, attn.in_proj_bias
        w_q, b_q, w_k, w_v, b_v, w_o, b_o = _derived(self, "folded weights", dtype, lambda: (
            w[:c].to(dtype), _cast(b[:c], dtype), _fold_layer_norm(self.ln_1, w[c:2 * c], None, dtype)[0],
            *_fold_layer_norm(self.ln_1, w[2 * c:], b[2 * c:], dtype),
            attn.out_proj.weight.to(dtype), _cast(attn.out_proj.bias, dtype)))
        q = F.linear(self.ln_1(query), w_q, b_q)  # S x Lq x C
        q = q.view(s, lq, heads, d) * d ** -0.5
        u = torch.einsum("slhd,hdc->slhc", q, w_k.view(heads, d, c))  # W_k'_h^T q_h
        scores = u.reshape(s, lq * heads, c) @ normalized.transpose(1, 2)  # S x Lq*H x Lk
        z = torch.softmax(scores, dim=-1).to(dtype) @ normalized  # S x Lq*H x C
        out = torch.einsum("slhc,hdc->slhd", z.view(s, lq, heads, c), w_v.view(heads, d, c)) + b_v.view(heads, d)
        return F.linear(out.reshape(s, lq, c), w_o, b_o)


def _mlp(dim: int, ratio: float = 4.0) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(dim, int(dim * ratio))),
        ("gelu", QuickGELU(inplace=True)),
        ("c_proj", nn.Linear(int(dim * ratio), dim)),
    ]))


class AdaptivePooling(nn.Module):
    """One adaptive-pooling layer: per-frame queries attend to their frame's tokens, then the
    video query attends to the per-frame queries (+ a temporal position embedding)."""

    def __init__(self, dim: int, sparse_frames: int):
        super().__init__()
        heads = dim // 64
        self.spatial_transformer = CrossAttention(dim, heads)
        self.output_map_spatial_cls_token = _mlp(dim)
        self.ln_out_spat_cls_token = LayerNorm(dim)
        self.temporal_transformer = CrossAttention(dim, heads)
        self.positional_embedding = nn.Parameter(torch.zeros(1, sparse_frames, dim))
        self.output_map_cls_token = _mlp(dim)
        self.ln_out_temp_cls_token = LayerNorm(dim)

    def forward(self, feat: torch.Tensor, video_query: torch.Tensor, frame_query: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """feat: B*T' x (N+1) x C_i; video_query: B x 1 x C_i; frame_query: B*T' x 1 x C_i."""
        frame_query = frame_query + self.spatial_transformer(frame_query, feat)
        frame_query = frame_query + self.output_map_spatial_cls_token(self.ln_out_spat_cls_token(frame_query))
        b = video_query.shape[0]
        frames = frame_query.reshape(b, -1, frame_query.shape[-1])  # B x T' x C_i
        frames = frames + self.positional_embedding.to(frames.dtype)
        video_query = video_query + self.temporal_transformer(video_query, frames)
        video_query = video_query + self.output_map_cls_token(self.ln_out_temp_cls_token(video_query))
        return video_query, frame_query

    def forward_no_grad(self, normalized: torch.Tensor, video_query: torch.Tensor, frame_query: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: ``forward(feat, ...)`` from ``normalized``, feat normalised without the
        LayerNorm affine (shared by all pooling layers, see
        :meth:`CrossAttention.forward_normalized`)."""
        spatial, temporal = self.spatial_transformer, self.temporal_transformer
        frame_query = frame_query + spatial.forward_normalized(frame_query, normalized)
        frame_query = _mlp_no_grad(self.output_map_spatial_cls_token, self.ln_out_spat_cls_token(frame_query),
                                   frame_query)
        b, c = video_query.shape[0], frame_query.shape[-1]
        frames = frame_query.reshape(b, -1, c) + self.positional_embedding.to(frame_query.dtype)  # B x T' x C_i
        frames = F.layer_norm(frames, (c,), None, None, temporal.ln_1.eps)
        video_query = video_query + temporal.forward_normalized(video_query, frames)
        video_query = _mlp_no_grad(self.output_map_cls_token, self.ln_out_temp_cls_token(video_query), video_query)
        return video_query, frame_query


def _mlp_no_grad(mlp: nn.Sequential, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + mlp(x)`` for a :func:`_mlp` without autograd (weights cast once per
    :func:`cached_inference_weights`)."""
    dtype = x.dtype
    fc_w, fc_b, proj_w, proj_b = _derived(mlp, "weights", dtype, lambda: (
        mlp.c_fc.weight.to(dtype), _cast(mlp.c_fc.bias, dtype), mlp.c_proj.weight.to(dtype),
        _cast(mlp.c_proj.bias, dtype)))
    return mlp_without_autograd(x, fc_w, fc_b, mlp.gelu, proj_w, proj_b, residual=residual)


def _call(fn, *args):
    return fn(*args)


#: What ``DiSTBranch.activation_checkpointing`` recomputes in backward instead of storing:
#: ``off``: nothing; ``selective``: the stem, the integration blocks and the pooling layers
#: (on ViT-B/16 8+16f: 114 instead of 198 MiB per clip for about 8% more step time); ``full``:
#: the stem, every whole layer and the pooling layers (69 MiB per clip, about 15% more time).
CHECKPOINTING_MODES = ("off", "selective", "full")


def checkpointing_mode(value: bool | str) -> str:
    """An ``activation_checkpointing`` setting as one of :data:`CHECKPOINTING_MODES`
    (False = "off", True = "full"); anything else is a ``ValueError``."""
    mode = {False: "off", True: "full"}.get(value, value) if isinstance(value, (bool, str)) else value
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing must be true, false or one of "
                         f"{', '.join(CHECKPOINTING_MODES)}, got {value!r}")
    return mode


class DiSTBranch(nn.Module):
    """The trainable part of DiST.

    Inputs: the dense clip B x 3 x T x H x W and CLIP's token sequences of the selected blocks
    (each B*T' x (N+1) x D). Output: the video embedding B x E (before normalisation).
    """

    def __init__(self, config: DiSTConfig, clip_width: int, clip_patch_size: int, embed_dim: int,
                 selected_layers: Sequence[int]):
        super().__init__()
        self.config = config
        self.selected_layers = list(selected_layers)
        n = len(self.selected_layers)
        c_t, c_i, t_sparse = config.temporal_dim, config.integration_dim, config.sparse_frames
        self.alpha = config.alpha
        self.patch_size = clip_patch_size

        self.temporal_encoder = TemporalEncoder(c_t, n, clip_patch_size, config.stem_kernel,
                                                config.temporal_kernel, config.temporal_mlp_ratio)
        self.input_linears = nn.ModuleList([nn.Linear(clip_width, c_i) for _ in range(n)])
        self.integration2temporal_nets = nn.ModuleList(
            [IntegrationToTemporal(c_i, c_t, config.alpha) for _ in range(n)])
        self.temporal2integration_nets = nn.ModuleList(
            [TemporalToIntegration(c_t, c_i, config.alpha, t_sparse) for _ in range(n)])
        self.integration_nets = nn.ModuleList([
            IntegrationBlock(c_i, config.integration_mlp_ratio, config.integration_temporal_mlp_ratio,
                             config.temporal_kernel, t_sparse) for _ in range(n)])
        self.adapooling_nets = nn.ModuleList(
            [AdaptivePooling(c_i, t_sparse) for _ in range(config.pooling_layers)])
        self.proj_spatial_cls_token = nn.Linear(clip_width, c_i)
        self.ln_post = LayerNorm(c_i)
        self.proj = nn.Parameter(torch.empty(c_i, embed_dim))
        self.aggregated_cls_token = nn.Parameter(torch.zeros(1, 1, c_i))  # the video query
        self.aggregated_spatial_cls_token = nn.Parameter(torch.zeros(1, 1, c_i))  # per-frame query
        self.reset_parameters()
        # The last layer's integration -> temporal update feeds nothing (the temporal features
        # are not read after the last layer). Its weights exist in the authors' checkpoints, so
        # they are kept, but frozen and not computed (no unused-parameter trouble under DDP).
        self.integration2temporal_nets[-1].requires_grad_(False)
        # Activations recomputed in backward instead of stored (see CHECKPOINTING_MODES).
        self.activation_checkpointing: bool | str = False

    def reset_parameters(self) -> None:
        """trunc-normal(0.02) weights, zero biases, unit LayerNorms, trunc-normal tokens/queries."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MultiheadAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.temporal2integration_nets:
            nn.init.trunc_normal_(m.cls_token, std=0.02)
        for m in self.adapooling_nets:
            nn.init.trunc_normal_(m.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.aggregated_cls_token, std=0.02)
        nn.init.trunc_normal_(self.aggregated_spatial_cls_token, std=0.02)
        nn.init.normal_(self.proj, std=self.config.integration_dim ** -0.5)

    @staticmethod
    def _checkpointed(fn, *args):
        # Keep only fn's inputs for backward and recompute the rest (the stem keeps the video
        # instead of its patches, a layer its inputs, a pooling layer its queries).
        return checkpoint(fn, *args, use_reentrant=False)

    def _layer(self, i: int, x_t: torch.Tensor, clip_tokens: torch.Tensor, res: torch.Tensor | float,
               batch: int, grid: tuple[int, int], recompute_block: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One selected layer. x_t: B x C_t x T x g x g; clip_tokens: B*T' x (N+1) x D;
        res: B*T' x (N+1) x C_i (or 0). Returns the updated (x_t, m, res). ``recompute_block``:
        the integration block keeps only its input for backward."""
        x_t = self.temporal_encoder.blocks[i](x_t)
        if not torch.is_autocast_enabled(clip_tokens.device.type):
            clip_tokens = clip_tokens.to(self.proj.dtype)
        m = self.input_linears[i](clip_tokens) + res  # B*T' x (N+1) x C_i
        last = i == len(self.selected_layers) - 1
        x_t_new = x_t if last else self.integration2temporal_nets[i](x_t, m, batch, grid)
        m = self.temporal2integration_nets[i](m, x_t)
        res = (self._checkpointed if recompute_block else _call)(self.integration_nets[i], m)
        return x_t_new, m, res

    def _input_weights(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's input linear weight (C_i x D) and its input biases: the input linear
        map's plus the temporal->integration convolution's (C_i), in ``dtype``."""
        linear = self.input_linears[i]
        return _derived(linear, "weight, input biases", dtype, lambda: (
            linear.weight.to(dtype),
            _sum_biases(linear.bias, self.temporal2integration_nets[i].linear_fuse.bias, dtype=dtype)))

    def _layers_no_grad(self, x_t: torch.Tensor, clip_layers: dict[int, torch.Tensor], batch: int,
                        grid: tuple[int, int]) -> torch.Tensor:
        """The selected layers without autograd: the same values as :meth:`_layer` with fewer
        passes over the integration tokens. Each layer's input biases (input linear map and
        temporal->integration) ride in the previous integration block's output bias, the
        input map accumulates into that output in place, and the temporal->integration product
        accumulates straight into the tokens. x_t: B x C_t x T x g x g -> B*T' x (N+1) x C_i."""
        dtype = x_t.dtype  # the compute dtype (the stem's output follows autocast)
        res: torch.Tensor | None = None  # the previous block's output + this layer's input biases
        last = len(self.selected_layers) - 1
        weight, bias = self._input_weights(0, dtype)
        for i, layer in enumerate(self.selected_layers):
            # The temporal features are carried scaled by QuickGELU's factor after the first
            # block (see TemporalBlock.forward_scaled_no_grad); the fusion maps absorb the scale.
            x_t = self.temporal_encoder.blocks[i].forward_scaled_no_grad(x_t, input_scaled=i > 0)
            tokens = clip_layers[layer]  # B*T' x (N+1) x D
            frames, length, width = tokens.shape
            tokens = tokens.reshape(-1, width).to(dtype)
            if res is None:
                m = torch.mm(tokens, weight.t()) if bias is None else torch.addmm(bias, tokens, weight.t())
            else:
                m = res.view(-1, weight.shape[0]).addmm_(tokens, weight.t())
            m = m.view(frames, length, -1)  # the tokens + the temporal->integration bias
            t2i = self.temporal2integration_nets[i]
            if i < last:
                x_t_next = self.integration2temporal_nets[i].forward_no_grad(
                    x_t, m, batch, grid, shift=t2i.linear_fuse.bias, scale=QUICK_GELU_SCALE)
            m = t2i.add_no_grad(m, x_t, scale=QUICK_GELU_SCALE)
            if i < last:  # the next layer's input biases ride in this block's output
                weight, bias = self._input_weights(i + 1, dtype)
                res = self.integration_nets[i].forward_no_grad(m, extra_bias=bias)
                x_t = x_t_next
            else:
                res = self.integration_nets[i].forward_no_grad(m)
        return res.add_(m)

    def forward(self, video: torch.Tensor, clip_layers: dict[int, torch.Tensor]) -> torch.Tensor:
        """video: B x 3 x T x H x W; clip_layers: {layer: B*T' x (N+1) x D} -> B x E."""
        b, _, t, h, w = video.shape
        if t != self.config.num_frames:
            raise ValueError(f"the DiST branch was built for {self.config.num_frames} dense frames, "
                             f"got a clip of {t}")
        grid = (h // self.patch_size, w // self.patch_size)
        dtype = self.proj.dtype
        mode = checkpointing_mode(self.activation_checkpointing) if torch.is_grad_enabled() else "off"
        run = _call if mode == "off" else self._checkpointed  # the stem and the pooling layers
        run_layer = self._checkpointed if mode == "full" else _call
        video_dtype = dtype
        if run is not _call:
            # A checkpointed stem keeps its input for backward: cast it to the compute dtype
            # first (the stem would cast it the same way), so that is a bf16 video, not float32.
            device = video.device.type
            if torch.is_autocast_enabled(device):
                video_dtype = torch.get_autocast_dtype(device)
        x_t = run(self.temporal_encoder.stem, video.to(video_dtype))  # B x C_t x T x g x g
        if torch.is_grad_enabled():
            res: torch.Tensor | float = 0.0
            for i, layer in enumerate(self.selected_layers):
                x_t, m, res = run_layer(self._layer, i, x_t, clip_layers[layer], res, b, grid, mode == "selective")
            feat = res + m  # B*T' x (N+1) x C_i
        else:
            feat = self._layers_no_grad(x_t, clip_layers, b, grid)

        video_query = self.aggregated_cls_token.expand(b, 1, -1).to(feat.dtype)
        frame_query = self.aggregated_spatial_cls_token.expand(feat.shape[0], 1, -1).to(feat.dtype)
        eps = set() if torch.is_grad_enabled() else {p.spatial_transformer.ln_1.eps for p in self.adapooling_nets}
        if len(eps) == 1:  # without autograd: one normalisation for every pooling layer
            normalized = F.layer_norm(feat, feat.shape[-1:], None, None, eps.pop())
            for pooling in self.adapooling_nets:
                video_query, frame_query = pooling.forward_no_grad(normalized, video_query, frame_query)
        else:
            for pooling in self.adapooling_nets:
                video_query, frame_query = run(pooling, feat, video_query, frame_query)

        last = clip_layers[self.selected_layers[-1]]
        cls_mean = last[:, 0].to(dtype).view(b, -1, last.shape[-1]).mean(dim=1)  # B x D
        z = self.ln_post(video_query[:, 0] + self.proj_spatial_cls_token(cls_mean))
        return z @ self.proj
