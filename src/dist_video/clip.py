"""CLIP in plain PyTorch: a vision transformer and a text transformer.

The module layout (and so the state-dict keys) follows OpenAI's CLIP release:
``visual.*`` for the image tower and ``transformer.*``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``text_projection`` for the text tower, plus
``logit_scale``. Every other checkpoint format is converted into this layout by
:mod:`dist_video.clip_loaders`.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` with batch-first
tensors. The image tower can return the token sequences of chosen transformer blocks, which
is what the DiST branch reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .folding import ACTIVATIONS, Buffers, accumulate, f64, fold_norm, linear, normalize, scaled

__all__ = [
    "CLIPConfig",
    "CLIP",
    "VisionTransformer",
    "FusedVisionTower",
    "Transformer",
    "ResidualAttentionBlock",
    "MultiheadAttention",
    "QuickGELU",
    "MLP",
    "add_linear",
    "resize_positional_embedding",
    "QUICK_GELU_SCALE",
    "quick_gelu",
    "quick_gelu_backward",
    "LayerNorm",
    "make_activation",
    "ARCHITECTURES",
    "clip_config_for_architecture",
]


#: QuickGELU(x) = x sigmoid(1.702 x) = silu(1.702 x) / 1.702.
QUICK_GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """QuickGELU out of place: one allocation, one fused SiLU pass and a division."""
    return F.silu(x * QUICK_GELU_SCALE, inplace=True).div_(QUICK_GELU_SCALE)


def quick_gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad times d/dx [x sigmoid(1.702 x)] = silu'(1.702 x): PyTorch's fused SiLU backward,
    one pass instead of six elementwise kernels."""
    return torch.ops.aten.silu_backward(grad, x * QUICK_GELU_SCALE)


class _QuickGELUFunction(torch.autograd.Function):
    """x * sigmoid(1.702 x), saving only x for backward (the plain expression saves three
    tensors): the same values, a third of the activation memory."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return quick_gelu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return quick_gelu_backward(grad, x)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by OpenAI's CLIP: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuickGELUFunction.apply(x)


def make_activation(name: str) -> nn.Module:
    """Activation module by name: ``quick_gelu``, ``gelu`` (erf) or ``gelu_tanh``."""
    name = name.lower().replace("-", "_")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}: expected 'quick_gelu', 'gelu' or 'gelu_tanh'")


def add_linear(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, scale: float = 1.0) -> torch.Tensor:
    """``residual + linear(scale * x)`` on 2-D tensors, the residual as the matrix product's
    accumulator instead of a separate pass."""
    out = torch.addmm(residual, x, linear.weight.t(), alpha=scale)
    # a float32 bias would make the in-place add convert all of out
    return out if linear.bias is None else out.add_(linear.bias.to(out.dtype))


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` (OpenAI's names ``c_fc``, ``gelu``, ``c_proj``), optionally
    added to a residual. x: ... x C_in -> ... x C_out (``residual``: ... x C_out).

    QuickGELU(z) = silu(1.702 z) / 1.702, so with QuickGELU the two factors are the scales of
    the matrix products around a SiLU: one pass over the hidden activations instead of three,
    the same values and gradients."""

    def __init__(self, width: int, hidden: int, act: str = "quick_gelu", out_width: int | None = None):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(act)
        self.c_proj = nn.Linear(hidden, out_width or width)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        fc = self.c_fc
        if isinstance(self.gelu, QuickGELU):
            scale = QUICK_GELU_SCALE
            h = F.silu(torch.mm(x, fc.weight.t()) * scale if fc.bias is None else
                       torch.addmm(fc.bias, x, fc.weight.t(), beta=scale, alpha=scale))
        else:
            scale = 1.0
            h = self.gelu(fc(x))
        proj = self.c_proj
        if residual is not None:
            return add_linear(residual.reshape(h.shape[0], -1), h, proj, 1 / scale).view(*lead, -1)
        out = (torch.mm(h, proj.weight.t()) / scale if proj.bias is None else
               torch.addmm(proj.bias, h, proj.weight.t(), alpha=1 / scale))
        return out.view(*lead, -1)

    def fuse(self, dtype: torch.dtype, norm: nn.LayerNorm | None = None, proj_bias: bool = True) -> _FusedMLP:
        """The inference form, with the LayerNorm ``norm`` before it (if any) folded into ``c_fc``
        and QuickGELU's factors into both maps; ``proj_bias=False`` leaves ``c_proj``'s bias out
        (the caller adds it with others of its own)."""
        return _FusedMLP(self, dtype, norm, proj_bias)


class _FusedMLP(Buffers):
    """:meth:`MLP.fuse`: QuickGELU becomes SiLU between the scaled maps."""

    def __init__(self, mlp: MLP, dtype: torch.dtype, norm: nn.LayerNorm | None, proj_bias: bool):
        super().__init__()
        c_fc, act, c_proj = mlp.c_fc, mlp.gelu, mlp.c_proj
        fc_w, fc_b = fold_norm(norm, c_fc.weight, c_fc.bias) if norm is not None else (f64(c_fc.weight),
                                                                                        f64(c_fc.bias))
        proj_w, proj_b = f64(c_proj.weight), f64(c_proj.bias) if proj_bias else None
        if isinstance(act, QuickGELU):
            self.act = "silu"
            s = QUICK_GELU_SCALE
            fc_w, fc_b, proj_w = fc_w * s, scaled(fc_b, s), proj_w / s
        elif isinstance(act, nn.GELU):
            self.act = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        else:
            raise TypeError(f"cannot fuse an MLP with activation {type(act).__name__}")
        self.keep(dtype, fc_weight=fc_w, fc_bias=fc_b, proj_weight=proj_w, proj_bias=proj_b)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: ... x C_in (normalised without affine when a norm was folded) -> ... x C_out;
        with ``residual`` (a fresh 2-D tensor nothing else reads, R x C_out) the result is
        accumulated into it in place and returned as that 2-D tensor."""
        h = ACTIVATIONS[self.act](linear(x.reshape(-1, x.shape[-1]), self.fc_weight, self.fc_bias))
        if residual is not None:
            return accumulate(residual, h, self.proj_weight, self.proj_bias)
        return linear(h, self.proj_weight, self.proj_bias).view(*x.shape[:-1], -1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that follows its input's dtype (weights cast to it). PyTorch's bf16/fp16
    kernels accumulate the statistics in float32, so this matches OpenAI's compute-in-fp32
    LayerNorm up to the final rounding, without two extra full-tensor casts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if torch.is_autocast_enabled(x.device.type):
            # Autocast would return float32 here and make every following elementwise op
            # (residual adds, activations) run in float32 until the next matrix product.
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class MultiheadAttention(nn.Module):
    """Multi-head attention with the parameter names of ``nn.MultiheadAttention``
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), batch-first, through fused SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Self-attention over x (N x L x D), or x attending to ``kv`` (N x S x D). -> N x L x D."""
        return self.out_proj(self.attend(x, kv, is_causal))

    def attend(self, x: torch.Tensor, kv: torch.Tensor | None = None,
               is_causal: bool = False) -> torch.Tensor:
        """The heads' outputs before ``out_proj``: N x L x D (heads concatenated)."""
        n, length, width = x.shape
        head_dim = width // self.heads
        if kv is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # N x L x 3D
            q, k, v = qkv.view(n, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            w, b = self.in_proj_weight, self.in_proj_bias
            q = F.linear(x, w[:width], b[:width]).view(n, length, self.heads, head_dim).transpose(1, 2)
            kv = F.linear(kv, w[width:], b[width:]).view(n, kv.shape[1], 2, self.heads, head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        # q: N x heads x L x D/heads; k, v: N x heads x S x D/heads
        if length <= 8 and not is_causal:
            # A few queries (DiST's pooling queries): two small matrix products. The fused
            # kernel's backward costs several times more here on CPUs.
            attn = torch.softmax((q * head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
            out = attn.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return out.transpose(1, 2).reshape(n, length, width)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). x: N x L x D."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "quick_gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(round(width * mlp_ratio)), act)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        heads = self.attn.attend(self.ln_1(x), is_causal=is_causal).view(-1, width)  # N*L x D
        x = add_linear(x.reshape(-1, width), heads, self.attn.out_proj)  # each residual accumulates its update
        return self.mlp(self.ln_2(x), residual=x).view(n, length, width)

    def fuse(self, dtype: torch.dtype) -> _FusedResidualAttentionBlock:
        """The inference form: both LayerNorm affines folded into the maps after them."""
        return _FusedResidualAttentionBlock(self, dtype)


class _FusedResidualAttentionBlock(Buffers):
    """:meth:`ResidualAttentionBlock.fuse`: ``x + attn(n(x))``, then ``+ mlp(n(x))``, ``n`` the
    normalisation without affine. x: N x L x D -> N x L x D."""

    def __init__(self, block: ResidualAttentionBlock, dtype: torch.dtype):
        super().__init__()
        attn = block.attn
        self.heads = attn.heads
        self.eps_1, self.eps_2 = block.ln_1.eps, block.ln_2.eps
        qkv_w, qkv_b = fold_norm(block.ln_1, attn.in_proj_weight, attn.in_proj_bias)
        self.keep(dtype, qkv_weight=qkv_w, qkv_bias=qkv_b, out_weight=attn.out_proj.weight,
                  out_bias=attn.out_proj.bias)
        self.mlp = block.mlp.fuse(dtype, norm=block.ln_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        d = width // self.heads
        qkv = linear(normalize(x, self.eps_1).view(-1, width), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # N x H x L x d
        heads = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, width)  # N*L x D
        x = linear(heads, self.out_weight, self.out_bias).add_(x.reshape(-1, width))  # a fresh tensor
        return self.mlp(normalize(x, self.eps_2), residual=x).view(n, length, width)


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (``resblocks.<i>``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, is_causal: bool = False,
                return_layers: Iterable[int] = (), stop_after_last: bool = False
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """x: N x L x D. Returns the output and ``{i: output of block i}`` for ``return_layers``.

        With ``stop_after_last`` the blocks after the last requested one are skipped (the
        returned final tensor is then that block's output)."""
        wanted = set(return_layers)
        last = max(wanted) if (wanted and stop_after_last) else self.layers - 1
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.resblocks):
            x = block(x, is_causal=is_causal)
            if i in wanted:
                kept[i] = x
            if i == last:
                break
        return x, kept


def resize_positional_embedding(pos: torch.Tensor, grid: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """A (1 + grid*grid) x D position embedding bicubically resized to (1 + grid_h*grid_w) x D
    (the class position kept)."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic",
                              align_corners=False).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)], dim=0)


class VisionTransformer(nn.Module):
    """CLIP's image tower. Images N x 3 x H x W -> embeddings N x E."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int | None, mlp_ratio: float = 4.0, act: str = "quick_gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.width = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act, eps)
        self.ln_post = LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if output_dim else None

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    def _positional_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1 + grid_h*grid_w) x D, bicubically resized when the input grid is not the trained one."""
        if grid_h == grid_w == self.grid_size:
            return self.positional_embedding
        return resize_positional_embedding(self.positional_embedding, self.grid_size, grid_h, grid_w)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch, class and position embeddings, then ``ln_pre``. N x 3 x H x W -> N x (1+g*g) x D."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # N x D x gh x gw
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # N x g*g x D
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._positional_embedding(grid_h, grid_w).to(x.dtype)
        return self.ln_pre(x)

    def forward_layers(self, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Token sequences after the given blocks: ``{i: N x (1+g*g) x D}``; later blocks are skipped."""
        _, kept = self.transformer(self.embed(images), return_layers=layers, stop_after_last=True)
        return kept

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class token of the final block's output -> embedding. N x L x D -> N x E."""
        x = self.ln_post(tokens[:, 0])
        return x @ self.proj if self.proj is not None else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self.transformer(self.embed(images))
        return self.pool(x)

    def fuse(self, dtype: torch.dtype, depth: int | None = None, pooled: bool = True) -> FusedVisionTower:
        """The inference form of the first ``depth`` blocks (default all); ``pooled``: with
        ``ln_post`` (its affine folded into the projection) and the projection."""
        return FusedVisionTower(self, dtype, depth, pooled)


class FusedVisionTower(Buffers):
    """:meth:`VisionTransformer.fuse`. Images N x 3 x H x W (normalised) ->
    :meth:`forward_layers` ``{i: N x (1+g*g) x D}`` / :meth:`forward` embeddings N x E."""

    def __init__(self, visual: VisionTransformer, dtype: torch.dtype, depth: int | None = None,
                 pooled: bool = True):
        super().__init__()
        depth = visual.num_layers if depth is None else depth
        self.patch_size, self.grid_size = visual.patch_size, visual.grid_size
        self.eps_pre = visual.ln_pre.eps
        self.keep(dtype, patch_weight=visual.conv1.weight, class_embedding=visual.class_embedding,
                  positional_embedding=visual.positional_embedding, ln_pre_weight=visual.ln_pre.weight,
                  ln_pre_bias=visual.ln_pre.bias)
        self.blocks = nn.ModuleList([b.fuse(dtype) for b in visual.transformer.resblocks[:depth]])
        self.pooled = pooled
        if pooled:  # ln_post's affine folded into the projection
            self.eps_post = visual.ln_post.eps
            if visual.proj is not None:
                proj_t, shift = fold_norm(visual.ln_post, visual.proj.t(), None)
                self.keep(dtype, post_weight=proj_t, post_bias=shift)
            else:
                self.keep(dtype, post_weight=torch.diag(f64(visual.ln_post.weight)), post_bias=visual.ln_post.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W -> N x (1+g*g) x D: patches, class token, positions, ``ln_pre``."""
        dtype = self.patch_weight.dtype
        x = F.conv2d(images.to(dtype), self.patch_weight, stride=self.patch_size)  # N x D x gh x gw
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = self.positional_embedding
        if (grid_h, grid_w) != (self.grid_size, self.grid_size):
            pos = resize_positional_embedding(pos, self.grid_size, grid_h, grid_w)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + pos
        return F.layer_norm(x, x.shape[-1:], self.ln_pre_weight, self.ln_pre_bias, self.eps_pre)

    def forward_layers(self, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Token sequences after the given blocks (no block after the last of them runs)."""
        x, kept = self.embed(images), {}
        for i, block in enumerate(self.blocks[:max(layers) + 1]):
            x = block(x)
            if i in layers:
                kept[i] = x
        return kept

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class token of the final block's output -> embedding. N x L x D -> N x E."""
        return linear(normalize(tokens[:, 0], self.eps_post), self.post_weight, self.post_bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W -> N x E (not normalised)."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.pool(x)


@dataclass
class CLIPConfig:
    """The sizes of a CLIP model. ``text_layers == 0`` means an image-only model."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    text_mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    vision_proj: bool = True  # False: image-only models whose embedding is ln_post(cls) itself

    def to_dict(self) -> dict:
        return asdict(self)


class CLIP(nn.Module):
    """CLIP with OpenAI's parameter layout.

    ``encode_image(N x 3 x H x W) -> N x E``; ``encode_text(C x L int64) -> C x E``;
    ``logit_scale`` is the log of the softmax temperature's inverse (a scalar parameter).
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.tokenizer = None  # the text tower's Tokenizer (dist_video.tokenizer), set by load_clip; None if unknown
        c = config
        self.visual = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.embed_dim if c.vision_proj else None,
                                        c.vision_mlp_ratio, c.act,
                                        c.layer_norm_eps)
        self.has_text = c.text_layers > 0
        if self.has_text:
            self.context_length = c.context_length
            self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads,
                                           c.text_mlp_ratio, c.act, c.layer_norm_eps)
            self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
            self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
            self.ln_final = LayerNorm(c.text_width, eps=c.layer_norm_eps)
            self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=c.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images N x 3 x H x W (normalised) -> N x E (not normalised)."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids C x L (end-of-text = the largest id of each row) -> C x E (not normalised)."""
        if not self.has_text:
            raise RuntimeError("this CLIP model has no text tower (an image-only checkpoint); "
                               "use a learnable linear head instead of class-name text")
        tokens = tokens.to(self.token_embedding.weight.device)
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed the context length "
                             f"{self.context_length}")
        dtype = self.text_projection.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding[:length].to(dtype)
        x, _ = self.transformer(x, is_causal=True)  # C x L x W
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # end-of-text token
        return self.ln_final(x) @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-text logits N x C."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        return self.logit_scale.exp() * image @ text.t()


#: OpenAI's CLIP ViT sizes, for building random-weight models of a known shape (benchmarks,
#: ``dist-video info``). Loading real weights never uses this table: sizes come from tensors.
ARCHITECTURES: dict[str, dict] = {
    "ViT-B/32": dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                     vision_heads=12, text_width=512, text_heads=8, text_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                     vision_heads=12, text_width=512, text_heads=8, text_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                     vision_heads=16, text_width=768, text_heads=12, text_layers=12),
}


def clip_config_for_architecture(name: str, *, text: bool = True) -> CLIPConfig:
    """The :class:`CLIPConfig` of an OpenAI architecture name (``ViT-B/16``, ``ViT-L/14``...)."""
    key = name.replace("-", "/", 2).replace("ViT/", "ViT-") if name not in ARCHITECTURES else name
    if key not in ARCHITECTURES:
        raise KeyError(f"unknown CLIP architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    cfg = dict(ARCHITECTURES[key])
    if not text:
        cfg["text_layers"] = 0
    return CLIPConfig(**cfg)

