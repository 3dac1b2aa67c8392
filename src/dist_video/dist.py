"""The DiST branch: temporal stem, one :class:`DiSTLayer` per selected CLIP block, adaptive
pooling; each part's training form and, beside it, its inference form.

Notation (see ``docs/method.md``): B clips of T dense frames; the frozen CLIP sees
T' = T / alpha sparse frames, each as N + 1 tokens (N = g*g patches + a class token) of width
D. C_t is the temporal width, C_i the integration width, E the CLIP embedding width.

Inside the integration branch tokens are kept batch-first per frame, ``B*T' x (N+1) x C_i``
(frame index fastest within a clip), which is how CLIP returns them.

Parameter names follow the authors' release inside each part (``linear_fuse``, ``cls_token``,
``ffn``, ``temporal_ffn``, ``adapooling_nets`` ...); their per-layer lists (``temporal_nets``,
``input_linears``, ``integration2temporal_nets``, ``temporal2integration_nets``,
``integration_nets``) are the parts of ``layers.<i>`` here: :mod:`dist_video.authors_keys`
maps one onto the other.

Each part's inference form sits beside it: ``part.fuse(dtype, ...)`` returns a module of
buffers that computes the same function in ``eval()`` mode, its folds done once (see
:mod:`dist_video.folding`). The fused layers hand each other scaled temporal features and
carried biases: :class:`FusedSeam` is that contract. :mod:`dist_video.reference` is the plain
paper form the tests compare both against.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .clip import MLP, QUICK_GELU_SCALE, LayerNorm, MultiheadAttention, QuickGELU, quick_gelu, quick_gelu_backward
from .folding import Buffers, add_present, f64, fold_norm, linear, normalize, scaled

__all__ = [
    "DiSTConfig",
    "PRESETS",
    "PatchStem",
    "TemporalBlock",
    "IntegrationToTemporal",
    "TemporalToIntegration",
    "IntegrationBlock",
    "DiSTLayer",
    "CrossAttention",
    "AdaptivePooling",
    "DiSTBranch",
    "FusedDiSTBranch",
    "FusedSeam",
    "CARRIED_SCALE",
    "onednn_fusion_available",
    "CHECKPOINTING_MODES",
    "checkpointing_mode",
]


@dataclass
class DiSTConfig:
    """Sizes of the DiST branch (symbols as in ``docs/method.md``; the defaults are the
    published K400 ViT-B/16 8+16f setting). The temporal stem's spatial patch is always CLIP's
    patch size P, so it is not a field.
    """

    #: T, the dense frames per clip that the temporal branch sees (published: 16, 32 or 64).
    num_frames: int = 16
    #: alpha, the sparse-sampling factor: CLIP sees every alpha-th frame, T' = T / alpha (published: 2).
    alpha: int = 2
    #: C_t, the temporal branch's channels (published: 96).
    temporal_dim: int = 96
    #: C_i, the integration branch's width; attention heads are C_i / 64 (published: 384).
    integration_dim: int = 384
    #: k_s, the temporal stem's kernel in time (odd; published: 5).
    stem_kernel: int = 5
    #: k, the kernel in time of the temporal blocks and of the integration blocks' TFFN (odd; published: 3).
    temporal_kernel: int = 3
    #: r_t, a temporal block's hidden channels over C_t (published: 1).
    temporal_mlp_ratio: float = 1.0
    #: r_i, an integration block's FFN hidden width over C_i (published: 1).
    integration_mlp_ratio: float = 1.0
    #: r_it, an integration block's TFFN hidden width over C_i (published: 0.25).
    integration_temporal_mlp_ratio: float = 0.25
    #: K, the adaptive-pooling layers (published: 4 for Kinetics-400, 2 for Something-Something v2).
    pooling_layers: int = 4
    #: The CLIP blocks the branch reads, one DiST layer each, strictly increasing; ``None`` = all
    #: of them, resolved against the CLIP model when the branch is built (published: all).
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

    ``x = QuickGELU(x + conv(1,3,3)(QuickGELU(conv(k,1,1)(LN_c(x)))))``, through
    :class:`_TemporalBlockFunction` (three activations kept for backward instead of six).
    """

    def __init__(self, dim: int, kernel: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln = LayerNorm(dim)
        self.temporal_net = nn.Sequential(OrderedDict([
            ("c_fc1", nn.Conv3d(dim, hidden, (kernel, 1, 1), padding=(kernel // 2, 0, 0))),
            ("gelu1", QuickGELU()),
            ("c_fc2", nn.Conv3d(hidden, dim, (1, 3, 3), padding=(0, 1, 1))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # the compute dtype: the stem's output follows autocast
        c1, c2 = self.temporal_net.c_fc1, self.temporal_net.c_fc2
        return _TemporalBlockFunction.apply(
            x, self.ln.weight.to(dtype), self.ln.bias.to(dtype), self.ln.eps, c1.weight.to(dtype),
            c1.bias.to(dtype), c1.padding, c2.weight.to(dtype), c2.bias.to(dtype), c2.padding)

    def fuse(self, dtype: torch.dtype, input_scaled: bool, onednn: bool) -> _FusedTemporalBlock:
        """The inference form on features carried scaled (see :class:`FusedSeam`): it returns
        ``s * block(x)`` for an input ``s * x`` (``input_scaled``) or ``x``. ``onednn``: each
        convolution fused with its SiLU or its residual add (see :func:`onednn_fusion_available`)."""
        return _FusedTemporalBlock(self, dtype, input_scaled, onednn)


def onednn_fusion_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused convolution + pointwise calls run here (tried once on a tiny
    input: some builds and CPUs refuse them)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    x = torch.zeros(1, 2, 1, 1, 1, dtype=dtype)
    w = torch.zeros(2, 2, 1, 1, 1, dtype=dtype)
    try:
        torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0, 0], [1, 1, 1], [1, 1, 1], 1, "swish", [], "")
        torch.ops.mkldnn._convolution_pointwise.binary(x, x, w, None, [0, 0, 0], [1, 1, 1], [1, 1, 1], 1, "add",
                                                       1.0, None, [], "")
    except RuntimeError:
        return False
    return True


class _FusedTemporalBlock(Buffers):
    """:meth:`TemporalBlock.fuse`: LayerNorm (scale-invariant: the input's scale goes into its
    epsilon), conv + SiLU, conv + residual add, SiLU; QuickGELU's factors in the convolutions."""

    def __init__(self, block: TemporalBlock, dtype: torch.dtype, input_scaled: bool, onednn: bool):
        super().__init__()
        s = CARRIED_SCALE
        c1, c2 = block.temporal_net.c_fc1, block.temporal_net.c_fc2
        self.input_scaled, self.onednn = input_scaled, onednn
        self.eps = block.ln.eps * (s * s if input_scaled else 1.0)  # LN(s x; s^2 eps) = LN(x; eps)
        self.pad_1, self.pad_2 = list(c1.padding), list(c2.padding)
        self.keep(dtype, ln_weight=block.ln.weight, ln_bias=block.ln.bias, weight_1=f64(c1.weight) * s,
                  bias_1=scaled(c1.bias, s), weight_2=c2.weight, bias_2=scaled(c2.bias, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C_t x T x g x g (times s if ``input_scaled``) -> s * block(x), same shape."""
        y = F.layer_norm(x.permute(0, 2, 3, 4, 1), x.shape[1:2], self.ln_weight, self.ln_bias, self.eps)
        y = y.permute(0, 4, 1, 2, 3)
        # oneDNN's fused calls run eagerly on CPUs only: a trace or an export records the portable kernels
        onednn = self.onednn and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        if onednn:
            h = torch.ops.mkldnn._convolution_pointwise(y, self.weight_1, self.bias_1, self.pad_1, [1, 1, 1],
                                                        [1, 1, 1], 1, "swish", [], "")
        else:
            h = F.silu(F.conv3d(y, self.weight_1, self.bias_1, padding=self.pad_1), inplace=True)
        if not self.input_scaled:
            z = F.conv3d(h, self.weight_2, self.bias_2, padding=self.pad_2).add_(x, alpha=CARRIED_SCALE)
        elif onednn:
            z = torch.ops.mkldnn._convolution_pointwise.binary(h, x, self.weight_2, self.bias_2, self.pad_2,
                                                               [1, 1, 1], [1, 1, 1], 1, "add", 1.0, None, [], "")
        else:
            z = F.conv3d(h, self.weight_2, self.bias_2, padding=self.pad_2).add_(x)
        return F.silu(z, inplace=True)


class PatchStem(nn.Conv3d):
    """The temporal stem: Conv3d(3 -> C_t, kernel (k_s, P, P), stride (1, P, P), padding
    (k_s // 2, 0, 0)) on B x 3 x T x H x W -> B x C_t x T x g x g.

    Same parameters as ``nn.Conv3d`` (checkpoints load unchanged), computed as k_s matrix
    products over non-overlapping patches: the stride equals the spatial kernel, so the
    convolution is a patch embedding summed over k_s shifted frames. Much faster than
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
        # (T + k - 1) x B x N x 3P^2, time-major with zero frames before and after: one strided
        # copy (with the cast) from the video into the padded buffer.
        patches = video.new_empty(t + k - 1, b, g1 * g2, c * p * p, dtype=dtype)
        patches[:k // 2].zero_()
        patches[k // 2 + t:].zero_()
        src = video[..., :g1 * p, :g2 * p].unflatten(4, (g2, p)).unflatten(3, (g1, p))  # B x 3 x T x g x P x g x P
        patches[k // 2:k // 2 + t].view(t, b, g1, g2, c, p, p).copy_(src.permute(2, 0, 3, 5, 1, 4, 6))
        weight = self.weight.to(dtype).permute(2, 0, 1, 3, 4).reshape(k, self.out_channels, c * p * p)
        bias = None if self.bias is None else self.bias.to(dtype)
        rows = t * b * g1 * g2
        with torch.autocast(video.device.type, enabled=False):
            # time tap dt of every clip at once: a contiguous T*B*N x 3P^2 view, one matrix product
            y = F.linear(patches[0:t].view(rows, -1), weight[0], bias)
            for dt in range(1, k):
                y = torch.addmm(y, patches[dt:dt + t].view(rows, -1), weight[dt].t())
        y = y.view(t, b, g1 * g2, self.out_channels).transpose(0, 1).contiguous()  # B x T x N x C_t
        return y.view(b, t, g1, g2, self.out_channels).permute(0, 4, 1, 2, 3)  # B x C_t x T x g x g

    def fuse(self, dtype: torch.dtype) -> _FusedStem:
        """The inference form: one matrix product of every frame's patches with the k_s time
        taps' weights, the taps' outputs then summed k_s frames apart."""
        return _FusedStem(self, dtype)


class _FusedStem(Buffers):
    """:meth:`PatchStem.fuse`. B x 3 x T x H x W -> B x C_t x T x g x g."""

    def __init__(self, stem: PatchStem, dtype: torch.dtype):
        super().__init__()
        k, p = stem.kernel_size[0], stem.kernel_size[1]
        self.kernel, self.patch_size, self.dim = k, p, stem.out_channels
        self.keep(dtype, weight=f64(stem.weight).permute(2, 0, 1, 3, 4).reshape(k * stem.out_channels, -1),
                  bias=stem.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        k, p, dim = self.kernel, self.patch_size, self.dim
        g1, g2 = h // p, w // p
        patches = video[..., :g1 * p, :g2 * p].unflatten(4, (g2, p)).unflatten(3, (g1, p))  # B x 3 x T x g x P x g x P
        patches = patches.permute(0, 2, 3, 5, 1, 4, 6).to(self.weight.dtype).reshape(-1, c * p * p)  # B*T*N x 3P^2
        taps = torch.mm(patches, self.weight.t()).view(b, t, g1 * g2, k, dim)  # tap dt of every input frame
        out = taps[:, :, :, k // 2] + self.bias
        for dt in range(k):  # output frame f reads input frame f + dt - k//2 (zeros outside the clip)
            shift = dt - k // 2
            if shift != 0 and abs(shift) < t:
                lo, hi = max(0, -shift), min(t, t - shift)
                out[:, lo:hi] += taps[:, lo + shift:hi + shift, :, dt]
        return out.view(b, t, g1, g2, dim).permute(0, 4, 1, 2, 3)


class IntegrationToTemporal(nn.Module):
    """Integration tokens -> temporal features: Linear(C_i -> C_t) on the patch tokens,
    upsampled x alpha in time and added to the temporal features.
    x_t: B x C_t x T x g x g, m: B*T' x (N+1) x C_i -> B x C_t x T x g x g."""

    def __init__(self, integration_dim: int, temporal_dim: int, alpha: int):
        super().__init__()
        self.alpha = alpha
        self.linear_fuse = nn.Linear(integration_dim, temporal_dim)

    def forward(self, x_t: torch.Tensor, m: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, c_t, t, g1, g2 = x_t.shape
        x = self.linear_fuse(m[:, 1:])  # B*T' x N x C_t: the class token dropped
        # B x C_t x T' x 1 x g x g
        x = x.reshape(b, t // self.alpha, 1, grid[0], grid[1], c_t).permute(0, 5, 1, 2, 3, 4)
        # Nearest-neighbour upsampling in time by broadcasting: each of a sparse frame's alpha
        # dense frames gets the same update, without an upsampled copy.
        return (x_t.view(b, c_t, t // self.alpha, self.alpha, g1, g2) + x).reshape(b, c_t, t, g1, g2)

    def fuse(self, dtype: torch.dtype, held_bias: torch.Tensor | None) -> _FusedIntegrationToTemporal:
        """The inference form on tokens that hold ``held_bias`` (the temporal->integration bias,
        see :class:`FusedSeam`), its output joining features carried scaled by s:
        ``s (W (m - b_held) + b) = (s W) m + s (b - W b_held)``."""
        return _FusedIntegrationToTemporal(self, dtype, held_bias)


class _FusedIntegrationToTemporal(Buffers):
    """:meth:`IntegrationToTemporal.fuse`, on all N+1 tokens (a contiguous product), the class
    tokens dropped after. x_t: B x C_t x T x g x g (scaled), m: B*T'*(N+1) x C_i -> like x_t."""

    def __init__(self, i2t: IntegrationToTemporal, dtype: torch.dtype, held_bias: torch.Tensor | None):
        super().__init__()
        self.alpha = i2t.alpha
        fuse = i2t.linear_fuse
        shift = None if held_bias is None else -(f64(fuse.weight) @ f64(held_bias))
        self.keep(dtype, weight=f64(fuse.weight) * CARRIED_SCALE,
                  bias=scaled(add_present(fuse.bias, shift), CARRIED_SCALE))

    def forward(self, x_t: torch.Tensor, m: torch.Tensor, length: int) -> torch.Tensor:
        b, c_t, t, g1, g2 = x_t.shape
        a = self.alpha
        x = linear(m, self.weight, self.bias).view(b, t // a, length, c_t)[:, :, 1:]
        x = x.reshape(b, t // a, 1, g1, g2, c_t).permute(0, 5, 1, 2, 3, 4)  # B x C_t x T' x 1 x g x g
        return (x_t.view(b, c_t, t // a, a, g1, g2) + x).view(b, c_t, t, g1, g2)


class TemporalToIntegration(nn.Module):
    """Temporal features -> integration tokens: Conv3d(C_t -> C_i, kernel/stride (alpha,1,1)),
    with a learnable per-frame class token in front, added to the integration tokens.
    m: B*T' x (N+1) x C_i, x_t: B x C_t x T x g x g -> B*T' x (N+1) x C_i.

    Kernel and stride are (alpha, 1, 1), so the convolution is one linear map of each
    position's alpha frames' features (same parameters and values), computed as a matrix
    product on the channels-last temporal features instead of a convolution plus a permuted
    copy."""

    def __init__(self, temporal_dim: int, integration_dim: int, alpha: int, sparse_frames: int):
        super().__init__()
        self.linear_fuse = nn.Conv3d(temporal_dim, integration_dim, kernel_size=(alpha, 1, 1),
                                     stride=(alpha, 1, 1))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, sparse_frames, integration_dim))

    def forward(self, m: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        b, c_t, t, g1, g2 = x_t.shape
        conv = self.linear_fuse
        a = conv.kernel_size[0]
        # B x T' x N x (alpha*C_t), frame-major within a position: one copy of the features
        pairs = x_t.permute(0, 2, 3, 4, 1).reshape(b, t // a, a, g1 * g2, c_t).transpose(2, 3)
        pairs = pairs.reshape(b, t // a, g1 * g2, a * c_t)
        weight = conv.weight.flatten(2).transpose(1, 2).reshape(conv.out_channels, a * c_t)  # C_i x alpha*C_t
        x = F.linear(pairs, weight, conv.bias)  # B x T' x N x C_i
        cls = self.cls_token[0].unsqueeze(2).to(x.dtype).expand(b, t // a, 1, -1)  # B x T' x 1 x C_i
        return m + torch.cat([cls, x], dim=2).flatten(0, 1)

    def fuse(self, dtype: torch.dtype) -> _FusedTemporalToIntegration:
        """The inference form on features carried scaled by s (the weights divide it out) and
        tokens that already hold the convolution's bias (see :class:`FusedSeam`): the class
        tokens swap it for theirs."""
        return _FusedTemporalToIntegration(self, dtype)


class _FusedTemporalToIntegration(Buffers):
    """:meth:`TemporalToIntegration.fuse`: one product over every token, accumulated into m in
    place, a zero row standing for each class token. m: B*T'*(N+1) x C_i, x_t: B x C_t x T x g x g."""

    def __init__(self, t2i: TemporalToIntegration, dtype: torch.dtype):
        super().__init__()
        conv = t2i.linear_fuse
        self.alpha = conv.kernel_size[0]
        c_i = conv.out_channels
        self.keep(dtype, weight=f64(conv.weight).flatten(2).transpose(1, 2).reshape(c_i, -1) / CARRIED_SCALE,
                  class_tokens=add_present(t2i.cls_token[0, 0], None if conv.bias is None else -f64(conv.bias)))

    def forward(self, m: torch.Tensor, x_t: torch.Tensor, length: int) -> torch.Tensor:
        b, c_t, t, g1, g2 = x_t.shape
        a = self.alpha
        pairs = x_t.new_empty(b, t // a, length, a * c_t)
        pairs[:, :, 0].zero_()
        src = x_t.permute(0, 2, 3, 4, 1).reshape(b, t // a, a, g1 * g2, c_t).transpose(2, 3)
        pairs[:, :, 1:].view(b, t // a, g1 * g2, a, c_t).copy_(src)
        m.addmm_(pairs.view(-1, a * c_t), self.weight.t())
        m.view(b, t // a, length, -1)[:, :, 0] += self.class_tokens
        return m


class IntegrationBlock(nn.Module):
    """``res = FFN(LN(m)) + TFFN(LN'(m))`` on B*T' x (N+1) x C_i.

    TFFN treats the N+1 tokens of a frame as positions and mixes each position over time:
    1x1x1 conv C_i -> C_i*r, conv (k,1,1), QuickGELU, 1x1x1 conv back. Token-last, the 1x1x1
    convolutions are linear maps and the (k,1,1) convolution one matrix product over k
    time-shifted copies (same parameters and values as the convolutions, no layout change).
    """

    def __init__(self, dim: int, mlp_ratio: float, temporal_mlp_ratio: float, kernel: int,
                 sparse_frames: int):
        super().__init__()
        t_hidden = int(dim * temporal_mlp_ratio)
        self.sparse_frames = sparse_frames
        self.ffn = MLP(dim, int(dim * mlp_ratio))
        self.temporal_ffn = nn.Sequential(OrderedDict([
            ("c_fc1", nn.Conv3d(dim, t_hidden, kernel_size=1)),
            ("c_fc2", nn.Conv3d(t_hidden, t_hidden, (kernel, 1, 1), padding=(kernel // 2, 0, 0))),
            ("gelu1", QuickGELU()),
            ("c_proj", nn.Conv3d(t_hidden, dim, kernel_size=1)),
        ]))
        self.ln = LayerNorm(dim)
        self.ln_temporal = LayerNorm(dim)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ln(m), residual=self.temporal_mix(self.ln_temporal(m)))

    def temporal_mix(self, y: torch.Tensor) -> torch.Tensor:
        """TFFN: B*T' x (N+1) x C_i -> B*T' x (N+1) x C_i."""
        bt, length, _ = y.shape
        t = self.sparse_frames
        fc1, fc2, proj = self.temporal_ffn.c_fc1, self.temporal_ffn.c_fc2, self.temporal_ffn.c_proj
        h = F.linear(y, fc1.weight.flatten(1), fc1.bias).view(bt // t, t, length, -1)  # B x T' x (N+1) x C_h
        k = fc2.kernel_size[0]
        padded = F.pad(h, (0, 0, 0, 0, k // 2, k // 2))  # zero frames before and after
        shifted = torch.cat([padded[:, dt:dt + t] for dt in range(k)], dim=-1)  # B x T' x (N+1) x k*C_h
        conv_weight = fc2.weight.flatten(2).permute(0, 2, 1).reshape(fc2.out_channels, -1)  # C_h x k*C_h
        h = self.temporal_ffn.gelu1(F.linear(shifted, conv_weight, fc2.bias))
        return F.linear(h, proj.weight.flatten(1), proj.bias).view_as(y)

    def fuse(self, dtype: torch.dtype, extra_bias: torch.Tensor | None = None) -> _FusedIntegrationBlock:
        """The inference form: ``FFN(LN(m)) + TFFN(LN'(m)) + extra_bias`` with each LayerNorm's
        affine folded into the map after it (one normalisation when both epsilons agree) and
        one merged output bias (``extra_bias``: the next layer's, see :class:`FusedSeam`)."""
        return _FusedIntegrationBlock(self, dtype, extra_bias)


class _FusedIntegrationBlock(Buffers):
    """:meth:`IntegrationBlock.fuse`. m: B*T' x (N+1) x C_i -> B*T'*(N+1) x C_i."""

    def __init__(self, block: IntegrationBlock, dtype: torch.dtype, extra_bias: torch.Tensor | None):
        super().__init__()
        tffn = block.temporal_ffn
        s = QUICK_GELU_SCALE
        self.sparse_frames = block.sparse_frames
        self.eps, self.eps_temporal = block.ln.eps, block.ln_temporal.eps
        self.kernel = tffn.c_fc2.kernel_size[0]
        fc1_w, fc1_b = fold_norm(block.ln_temporal, tffn.c_fc1.weight.flatten(1), tffn.c_fc1.bias)
        fc2 = tffn.c_fc2
        self.keep(dtype, tffn_in_weight=fc1_w, tffn_in_bias=fc1_b,
                  tffn_conv_weight=f64(fc2.weight).flatten(2).permute(0, 2, 1).reshape(fc2.out_channels, -1) * s,
                  tffn_conv_bias=scaled(fc2.bias, s),
                  tffn_out_weight=f64(tffn.c_proj.weight).flatten(1) / s,
                  out_bias=add_present(tffn.c_proj.bias, block.ffn.c_proj.bias, extra_bias))
        self.ffn = block.ffn.fuse(dtype, norm=block.ln, proj_bias=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        bt, length, c = m.shape
        t, k = self.sparse_frames, self.kernel
        x = m.view(-1, c)
        n = normalize(x, self.eps)
        n_temporal = n if self.eps_temporal == self.eps else normalize(x, self.eps_temporal)
        h = linear(n_temporal, self.tffn_in_weight, self.tffn_in_bias).view(bt // t, t, length, -1)
        padded = F.pad(h, (0, 0, 0, 0, k // 2, k // 2))  # zero frames before and after: B x (T'+k-1) x (N+1) x C_h
        shifted = torch.cat([padded[:, dt:dt + t] for dt in range(k)], dim=-1).view(bt * length, -1)
        h = F.silu(linear(shifted, self.tffn_conv_weight, self.tffn_conv_bias), inplace=True)
        out = linear(h, self.tffn_out_weight, self.out_bias)  # TFFN + every output bias
        return self.ffn(n, residual=out)


# ---------------------------------------------------------------------------- the inference form's seam
#: s: the fused layers carry the temporal features multiplied by s (see :class:`FusedSeam`).
CARRIED_SCALE = QUICK_GELU_SCALE


@dataclass(frozen=True)
class FusedSeam:
    """The contract between consecutive fused DiST layers, written once: what a layer's
    inference form receives from the one before it (the training form hands over plain values).

    - Temporal features arrive multiplied by s = :data:`CARRIED_SCALE` (1.702) in every layer
      but the first (which reads the stem's output): ``QuickGELU(z) = silu(s z) / s``, so a
      fused temporal block ending in SiLU hands over ``s * x_t``. Its LayerNorm takes the scale
      into its epsilon, the integration->temporal map multiplies its output by s and the
      temporal->integration map divides it out.
    - Biases: the input map's bias and the temporal->integration convolution's bias of layer
      i+1 (:meth:`DiSTLayer.carried_bias`) ride in layer i's integration-block output bias, so
      ``res`` arrives holding them; the first layer's input map adds them itself. The tokens
      ``m`` thus hold the convolution's bias before it runs: the integration->temporal map
      subtracts it and the class tokens swap it for theirs.

    ``first``: this is the first layer; ``next_bias``: what this layer's integration block adds
    for the next layer (None after the last)."""

    first: bool
    next_bias: torch.Tensor | None

    @staticmethod
    def thread(layers: Sequence[DiSTLayer]) -> list[FusedSeam]:
        """One seam per layer, in order."""
        carried = [layer.carried_bias() for layer in layers[1:]]
        return [FusedSeam(i == 0, bias) for i, bias in enumerate([*carried, None])]


class DiSTLayer(nn.Module):
    """One selected CLIP layer of DiST (``docs/method.md``, step 3):

    1. temporal block: ``x_t = TemporalBlock(x_t)``;
    2. input map: ``m = Linear(D -> C_i)(CLIP tokens) + res``;
    3. integration -> temporal: ``x_t_new = x_t + upsample(Linear(C_i -> C_t)(patch tokens of m))``
       (not in the last layer: nothing reads the temporal features after it);
    4. temporal -> integration: ``m = m + [cls_token; Conv3d(alpha,1,1)(x_t)]``, from the
       ``x_t`` before step 3's update;
    5. integration block: ``res = FFN(LN(m)) + TFFN(LN'(m))``.

    x_t: B x C_t x T x g x g; clip_tokens: B*T' x (N+1) x D; res: B*T' x (N+1) x C_i or 0
    -> (x_t_new, m, res).
    """

    def __init__(self, config: DiSTConfig, clip_width: int, updates_temporal: bool = True):
        super().__init__()
        c_t, c_i, t_sparse = config.temporal_dim, config.integration_dim, config.sparse_frames
        self.temporal_block = TemporalBlock(c_t, config.temporal_kernel, config.temporal_mlp_ratio)
        self.input_linear = nn.Linear(clip_width, c_i)
        # The last layer's integration -> temporal map feeds nothing. Its weights exist in the
        # authors' checkpoints, so they are kept, but frozen and not computed.
        self.integration_to_temporal = IntegrationToTemporal(c_i, c_t, config.alpha)
        self.integration_to_temporal.requires_grad_(updates_temporal)
        self.updates_temporal = updates_temporal
        self.temporal_to_integration = TemporalToIntegration(c_t, c_i, config.alpha, t_sparse)
        self.integration_block = IntegrationBlock(c_i, config.integration_mlp_ratio,
                                                  config.integration_temporal_mlp_ratio, config.temporal_kernel,
                                                  t_sparse)

    def forward(self, x_t: torch.Tensor, clip_tokens: torch.Tensor, res: torch.Tensor | float, grid: tuple[int, int],
                recompute_block: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``recompute_block``: the integration block keeps only its input for backward."""
        x_t = self.temporal_block(x_t)
        m = self.input_linear(clip_tokens) + res  # B*T' x (N+1) x C_i
        x_t_new = self.integration_to_temporal(x_t, m, grid) if self.updates_temporal else x_t
        m = self.temporal_to_integration(m, x_t)
        block = self.integration_block
        res = checkpoint(block, m, use_reentrant=False) if recompute_block else block(m)
        return x_t_new, m, res

    def carried_bias(self) -> torch.Tensor | None:
        """The biases this layer's inference form receives inside ``res`` (see :class:`FusedSeam`):
        the input map's plus the temporal->integration convolution's (float64)."""
        return add_present(self.input_linear.bias, self.temporal_to_integration.linear_fuse.bias)

    def fuse(self, dtype: torch.dtype, seam: FusedSeam, onednn: bool) -> _FusedDiSTLayer:
        """The inference form, on the terms of ``seam`` (scaled temporal features, carried biases)."""
        return _FusedDiSTLayer(self, dtype, seam, onednn)


class _FusedDiSTLayer(Buffers):
    """:meth:`DiSTLayer.fuse`: the five steps of :class:`DiSTLayer` on the terms of a :class:`FusedSeam`."""

    def __init__(self, layer: DiSTLayer, dtype: torch.dtype, seam: FusedSeam, onednn: bool):
        super().__init__()
        self.temporal_block = layer.temporal_block.fuse(dtype, input_scaled=not seam.first, onednn=onednn)
        self.keep(dtype, input_weight=layer.input_linear.weight,
                  input_bias=layer.carried_bias() if seam.first else None)
        self.updates_temporal = layer.updates_temporal
        if self.updates_temporal:
            held = layer.temporal_to_integration.linear_fuse.bias
            self.integration_to_temporal = layer.integration_to_temporal.fuse(dtype, held)
        self.temporal_to_integration = layer.temporal_to_integration.fuse(dtype)
        self.integration_block = layer.integration_block.fuse(dtype, seam.next_bias)

    def forward(self, x_t: torch.Tensor, tokens: torch.Tensor, res: torch.Tensor | None, batch: int
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x_t: B x C_t x T x g x g (scaled); tokens: B*T' x (N+1) x D; res: B*T'*(N+1) x C_i
        or None -> (next x_t or None after the last layer, m, res)."""
        x_t = self.temporal_block(x_t)
        frames, length, width = tokens.shape
        tokens = tokens.reshape(-1, width).to(self.input_weight.dtype)
        if res is None:
            m = linear(tokens, self.input_weight, self.input_bias)
        else:
            m = res.addmm_(tokens, self.input_weight.t())
        x_t_next = self.integration_to_temporal(x_t, m, length) if self.updates_temporal else None
        m = self.temporal_to_integration(m, x_t, length)
        res = self.integration_block(m.view(frames, length, m.shape[-1]))
        return x_t_next, m, res


class CrossAttention(nn.Module):
    """``attn(LN(q), LN(kv), LN(kv))``: one LayerNorm shared by query, key and value.
    query: S x Lq x C, kv: S x Lk x C -> S x Lq x C."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(dim, heads)
        self.ln_1 = LayerNorm(dim)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(self.ln_1(query), kv=self.ln_1(kv))

    def fuse(self, dtype: torch.dtype) -> _FusedCrossAttention:
        """The inference form for a few queries against many tokens that arrive normalised
        without affine, keys and values never formed: the query projection folded into the key
        projection (``q_h . k_j = n_q^T (W_q_h^T W_k_h) n_j + const``, the constant cancels in
        the softmax) and the value projection into the output projection (``W_o concat_h(W_v_h
        z_h + b_v_h) + b_o = sum_h (W_o_h W_v_h) z_h + (W_o b_v + b_o)``, the attention weights
        summing to one)."""
        return _FusedCrossAttention(self, dtype)


class _FusedCrossAttention(Buffers):
    """:meth:`CrossAttention.fuse`. query: S x Lq x C, normalized: S x Lk x C -> S x Lq x C."""

    def __init__(self, cross: CrossAttention, dtype: torch.dtype):
        super().__init__()
        attn, ln = cross.attn, cross.ln_1
        c = attn.in_proj_weight.shape[1]
        heads = self.heads = attn.heads
        d = c // heads
        self.eps = ln.eps
        w, b = attn.in_proj_weight, attn.in_proj_bias
        w_q, b_q = fold_norm(ln, w[:c], b[:c])
        w_k, _ = fold_norm(ln, w[c:2 * c], None)  # q . b_k is the same for every key: it cancels
        w_v, b_v = fold_norm(ln, w[2 * c:], b[2 * c:])
        w_q, b_q = w_q * d ** -0.5, b_q * d ** -0.5
        # scores of head h: (n_q W_q_h^T + b_q_h) W_k_h n_j = (n_q M_h^T + u_h) . n_j
        wq_h, wk_h = w_q.view(heads, d, c), w_k.view(heads, d, c)
        query_key = torch.einsum("hdi,hdj->hji", wq_h, wk_h).reshape(heads * c, c)  # H*C x C
        query_key_bias = torch.einsum("hd,hdj->hj", b_q.view(heads, d), wk_h).reshape(heads * c)
        # output: sum_h W_o_h (W_v_h z_h + b_v_h) + b_o, z_h the attention-weighted normalised tokens
        w_o = f64(attn.out_proj.weight)
        value_out = torch.einsum("ohd,hdj->ohj", w_o.view(c, heads, d), w_v.view(heads, d, c)).reshape(c, heads * c)
        self.keep(dtype, query_key=query_key, query_key_bias=query_key_bias, value_out=value_out,
                  out_bias=add_present(attn.out_proj.bias, w_o @ b_v))

    def forward(self, query: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
        s, lq, c = query.shape
        u = linear(normalize(query, self.eps).view(-1, c), self.query_key, self.query_key_bias)
        scores = u.view(s, lq * self.heads, c) @ normalized.transpose(1, 2)  # S x Lq*H x Lk
        z = torch.softmax(scores, dim=-1) @ normalized  # S x Lq*H x C
        return linear(z.view(s * lq, -1), self.value_out, self.out_bias).view(s, lq, c)


class AdaptivePooling(nn.Module):
    """One adaptive-pooling layer: per-frame queries attend to their frame's tokens, then the
    video query attends to the per-frame queries (+ a temporal position embedding)."""

    def __init__(self, dim: int, sparse_frames: int):
        super().__init__()
        heads = dim // 64
        self.spatial_transformer = CrossAttention(dim, heads)
        self.output_map_spatial_cls_token = MLP(dim, 4 * dim)
        self.ln_out_spat_cls_token = LayerNorm(dim)
        self.temporal_transformer = CrossAttention(dim, heads)
        self.positional_embedding = nn.Parameter(torch.zeros(1, sparse_frames, dim))
        self.output_map_cls_token = MLP(dim, 4 * dim)
        self.ln_out_temp_cls_token = LayerNorm(dim)

    def forward(self, feat: torch.Tensor, video_query: torch.Tensor, frame_query: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """feat: B*T' x (N+1) x C_i; video_query: B x 1 x C_i; frame_query: B*T' x 1 x C_i."""
        frame_query = frame_query + self.spatial_transformer(frame_query, feat)
        frame_query = self.output_map_spatial_cls_token(self.ln_out_spat_cls_token(frame_query), residual=frame_query)
        b = video_query.shape[0]
        frames = frame_query.reshape(b, -1, frame_query.shape[-1])  # B x T' x C_i
        frames = frames + self.positional_embedding.to(frames.dtype)
        video_query = video_query + self.temporal_transformer(video_query, frames)
        video_query = self.output_map_cls_token(self.ln_out_temp_cls_token(video_query), residual=video_query)
        return video_query, frame_query

    def fuse(self, dtype: torch.dtype) -> _FusedPooling:
        """The inference form, on tokens normalised without affine (one normalisation shared by
        every pooling layer, see :meth:`DiSTBranch.fuse`)."""
        return _FusedPooling(self, dtype)


class _FusedPooling(Buffers):
    """:meth:`AdaptivePooling.fuse`."""

    def __init__(self, pooling: AdaptivePooling, dtype: torch.dtype):
        super().__init__()
        self.spatial = pooling.spatial_transformer.fuse(dtype)
        self.spatial_mlp = pooling.output_map_spatial_cls_token.fuse(dtype, norm=pooling.ln_out_spat_cls_token)
        self.spatial_mlp_eps = pooling.ln_out_spat_cls_token.eps
        self.temporal = pooling.temporal_transformer.fuse(dtype)
        self.temporal_mlp = pooling.output_map_cls_token.fuse(dtype, norm=pooling.ln_out_temp_cls_token)
        self.temporal_mlp_eps = pooling.ln_out_temp_cls_token.eps
        self.keep(dtype, positional_embedding=pooling.positional_embedding[0])

    def forward(self, normalized: torch.Tensor, video_query: torch.Tensor, frame_query: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """normalized: B*T' x (N+1) x C_i; video_query: B x 1 x C_i; frame_query: B*T' x 1 x C_i."""
        c = frame_query.shape[-1]
        frame_query = frame_query + self.spatial(frame_query, normalized)
        frame_query = self.spatial_mlp(normalize(frame_query, self.spatial_mlp_eps),
                                       residual=frame_query.view(-1, c)).view_as(frame_query)
        frames = frame_query.view(video_query.shape[0], -1, c) + self.positional_embedding  # B x T' x C_i
        video_query = video_query + self.temporal(video_query, normalize(frames, self.temporal.eps))
        video_query = self.temporal_mlp(normalize(video_query, self.temporal_mlp_eps),
                                        residual=video_query.view(-1, c)).view_as(video_query)
        return video_query, frame_query


#: What ``DiSTBranch.activation_checkpointing`` recomputes in backward instead of storing:
#: ``off``: nothing; ``selective``: the stem, the integration blocks and the pooling layers;
#: ``full``: the stem, every whole layer and the pooling layers (``benchmarks/README.md``
#: has what each saves and costs).
CHECKPOINTING_MODES = ("off", "selective", "full")


def checkpointing_mode(value: bool | str) -> str:
    """An ``activation_checkpointing`` setting as one of :data:`CHECKPOINTING_MODES`
    (False = "off", True = "full"); anything else is a ``ValueError``."""
    mode = {False: "off", True: "full"}.get(value, value) if isinstance(value, (bool, str)) else value
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing must be true, false or one of "
                         f"{', '.join(CHECKPOINTING_MODES)}, got {value!r}")
    return mode


def _call(fn, *args):
    return fn(*args)


def _checkpointed(fn, *args):
    # Keep only fn's inputs for backward and recompute the rest (the stem keeps the video
    # instead of its patches, a layer its inputs, a pooling layer its queries).
    return checkpoint(fn, *args, use_reentrant=False)


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
        c_i, t_sparse = config.integration_dim, config.sparse_frames
        self.alpha = config.alpha
        self.patch_size = clip_patch_size
        # B x 3 x T x H x W -> B x C_t x T x g x g; the spatial patch equals CLIP's.
        self.temporal_stem = PatchStem(config.temporal_dim, clip_patch_size, config.stem_kernel)
        self.layers = nn.ModuleList([DiSTLayer(config, clip_width, updates_temporal=i < n - 1) for i in range(n)])
        self.adapooling_nets = nn.ModuleList(
            [AdaptivePooling(c_i, t_sparse) for _ in range(config.pooling_layers)])
        self.proj_spatial_cls_token = nn.Linear(clip_width, c_i)
        self.ln_post = LayerNorm(c_i)
        self.proj = nn.Parameter(torch.empty(c_i, embed_dim))
        self.aggregated_cls_token = nn.Parameter(torch.zeros(1, 1, c_i))  # the video query
        self.aggregated_spatial_cls_token = nn.Parameter(torch.zeros(1, 1, c_i))  # per-frame query
        self.reset_parameters()
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
        for layer in self.layers:
            nn.init.trunc_normal_(layer.temporal_to_integration.cls_token, std=0.02)
        for m in self.adapooling_nets:
            nn.init.trunc_normal_(m.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.aggregated_cls_token, std=0.02)
        nn.init.trunc_normal_(self.aggregated_spatial_cls_token, std=0.02)
        nn.init.normal_(self.proj, std=self.config.integration_dim ** -0.5)

    def forward(self, video: torch.Tensor, clip_layers: dict[int, torch.Tensor]) -> torch.Tensor:
        """video: B x 3 x T x H x W; clip_layers: {layer: B*T' x (N+1) x D} -> B x E."""
        b, _, t, h, w = video.shape
        if t != self.config.num_frames:
            raise ValueError(f"the DiST branch was built for {self.config.num_frames} dense frames, "
                             f"got a clip of {t}")
        grid = (h // self.patch_size, w // self.patch_size)
        dtype = self.proj.dtype
        device = video.device.type
        mode = checkpointing_mode(self.activation_checkpointing)
        run = _call if mode == "off" else _checkpointed  # the stem and the pooling layers
        run_layer = _checkpointed if mode == "full" else _call
        # A checkpointed stem keeps its input for backward: cast it to the compute dtype first
        # (the stem would cast it the same way), so that is a bf16 video, not float32.
        video_dtype = torch.get_autocast_dtype(device) if mode != "off" and torch.is_autocast_enabled(device) else dtype
        x_t = run(self.temporal_stem, video.to(video_dtype))  # B x C_t x T x g x g
        res: torch.Tensor | float = 0.0
        for layer, index in zip(self.layers, self.selected_layers):
            tokens = clip_layers[index]
            if not torch.is_autocast_enabled(device):
                tokens = tokens.to(dtype)
            x_t, m, res = run_layer(layer, x_t, tokens, res, grid, mode == "selective")
        feat = res + m  # B*T' x (N+1) x C_i

        video_query = self.aggregated_cls_token.expand(b, 1, -1).to(feat.dtype)
        frame_query = self.aggregated_spatial_cls_token.expand(feat.shape[0], 1, -1).to(feat.dtype)
        for pooling in self.adapooling_nets:
            video_query, frame_query = run(pooling, feat, video_query, frame_query)

        last = clip_layers[self.selected_layers[-1]]
        cls_mean = last[:, 0].to(dtype).view(b, -1, last.shape[-1]).mean(dim=1)  # B x D
        z = self.ln_post(video_query[:, 0] + self.proj_spatial_cls_token(cls_mean))
        return z @ self.proj

    def fuse(self, dtype: torch.dtype, onednn: bool = False) -> FusedDiSTBranch:
        """The inference form: each part's :meth:`fuse`, the layers threaded by :class:`FusedSeam`,
        ``ln_post``'s affine folded into the projection. ``onednn``: fused oneDNN convolutions in
        the temporal blocks (only where :func:`onednn_fusion_available`)."""
        return FusedDiSTBranch(self, dtype, onednn)


class FusedDiSTBranch(Buffers):
    """:meth:`DiSTBranch.fuse`. video: B x 3 x T x H x W, clip_layers ``{layer: B*T' x (N+1) x D}``
    -> B x E (not normalised)."""

    def __init__(self, branch: DiSTBranch, dtype: torch.dtype, onednn: bool):
        super().__init__()
        self.num_frames, self.alpha, self.patch_size = branch.config.num_frames, branch.alpha, branch.patch_size
        self.selected_layers = list(branch.selected_layers)
        self.stem = branch.temporal_stem.fuse(dtype)
        layers = list(branch.layers)
        self.layers = nn.ModuleList([layer.fuse(dtype, seam, onednn)
                                     for layer, seam in zip(layers, FusedSeam.thread(layers))])
        pooling_eps = {p.spatial_transformer.ln_1.eps for p in branch.adapooling_nets}
        if len(pooling_eps) > 1:
            raise ValueError(f"cannot fuse pooling layers whose LayerNorm epsilons differ: {sorted(pooling_eps)}")
        self.pooling_eps = pooling_eps.pop() if pooling_eps else 1e-5
        self.pooling = nn.ModuleList([p.fuse(dtype) for p in branch.adapooling_nets])
        post_w, post_b = fold_norm(branch.ln_post, branch.proj.t(), None)
        self.eps_post = branch.ln_post.eps
        cls_map = branch.proj_spatial_cls_token
        self.keep(dtype, video_query=branch.aggregated_cls_token[0, 0],
                  frame_query=branch.aggregated_spatial_cls_token[0, 0], cls_weight=cls_map.weight,
                  cls_bias=cls_map.bias, post_weight=post_w, post_bias=post_b)

    def forward(self, video: torch.Tensor, clip_layers: dict[int, torch.Tensor]) -> torch.Tensor:
        b, _, t, h, w = video.shape
        if t != self.num_frames:
            raise ValueError(f"the DiST branch was built for {self.num_frames} dense frames, got a clip of {t}")
        x_t = self.stem(video)  # B x C_t x T x g x g
        res: torch.Tensor | None = None
        for layer, index in zip(self.layers, self.selected_layers):
            x_t, m, res = layer(x_t, clip_layers[index], res, b)
        length, c = clip_layers[self.selected_layers[0]].shape[1], m.shape[-1]
        feat = res.add_(m).view(-1, length, c)  # B*T' x (N+1) x C_i
        normalized = normalize(feat, self.pooling_eps)
        video_query = self.video_query.expand(b, 1, c)
        frame_query = self.frame_query.expand(feat.shape[0], 1, c)
        for pooling in self.pooling:
            video_query, frame_query = pooling(normalized, video_query, frame_query)
        last = clip_layers[self.selected_layers[-1]]
        cls_mean = last[:, 0].to(feat.dtype).view(b, -1, last.shape[-1]).mean(dim=1)  # B x D
        y = linear(cls_mean, self.cls_weight, self.cls_bias).add_(video_query[:, 0])
        return linear(normalize(y, self.eps_post), self.post_weight, self.post_bias)
