"""The inference form of a video classifier, made once: :func:`fuse_dist` / :func:`fuse_frames`.

The training modules (:mod:`dist_video.clip`, :mod:`dist_video.dist`) read like the paper. The
modules here compute the same function as the trained model in ``eval()`` mode without
autograd, with every algebraic simplification that an inference pass allows done once, when
the fused model is made, into buffers in the compute dtype:

- LayerNorm affines folded into the linear map after them: ``LN(x) W^T + b = n(x) (W
  diag(gamma))^T + (W beta + b)``, ``n`` the normalisation without affine. Where two maps read
  the same LayerNorm input (an integration block's FFN and TFFN), it is normalised once.
- Biases merged: the input map's and the temporal->integration convolution's biases ride in the
  previous integration block's output bias; the FFN's and TFFN's output biases are one.
- QuickGELU's factor: ``QuickGELU(z) = silu(1.702 z) / 1.702``, so 1.702 goes into the
  weights before it and 1/1.702 into the weights after it. The temporal features are carried
  scaled by 1.702 from block to block (LayerNorm's epsilon and the fusion maps absorb it).
- Pooling without keys or values: the query projection is folded into the key projection
  (``q_h . k_j = n_q^T (W_q_h^T W_k_h) n_j + const``, the constant cancels in the softmax) and
  the value projection into the output projection (``W_o concat_h(W_v_h z_h + b_v_h) + b_o =
  sum_h (W_o_h W_v_h) z_h + (W_o b_v + b_o)``, the attention weights summing to one).
- On CPUs with oneDNN, each temporal convolution runs fused with its SiLU or its residual add.
- Residual sums accumulate in place into the output of the matrix product that makes them.

A fused model is an ordinary ``nn.Module``: no parameter, no global state, no dependence on
grad mode; it can be pickled, moved with ``.to(device)``, traced with ``torch.jit.trace`` or
exported with ``torch.export``. It does not follow later changes of the model it was made
from: fuse again after training.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import MLP, QUICK_GELU_SCALE, QuickGELU, resize_positional_embedding
from .dist import DiSTBranch, DiSTLayer

__all__ = ["FusedVisionTower", "FusedDiSTBranch", "FusedHead", "FusedDiSTModel", "FusedFrameModel", "fuse_dist",
           "fuse_frames", "onednn_fusion_available", "average_frames"]

S = QUICK_GELU_SCALE


# ---------------------------------------------------------------------------- folding helpers
def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """Folds are computed in float64 and rounded once to the compute dtype."""
    return None if t is None else t.detach().to(torch.float64)


def _fold_norm(ln: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A LayerNorm's affine folded into the linear map after it (float64): W: C_out x C ->
    ``(W diag(gamma), W beta + b)``."""
    weight, bias = _f64(weight), _f64(bias)
    if ln.bias is not None:
        shift = weight @ _f64(ln.bias)
        bias = shift if bias is None else bias + shift
    if ln.weight is not None:
        weight = weight * _f64(ln.weight)
    return weight, bias


def _scaled(t: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return None if t is None else _f64(t) * scale


def _sum(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    present = [_f64(t) for t in tensors if t is not None]
    return sum(present[1:], present[0]) if present else None


class _Buffers(nn.Module):
    """A module whose tensors are buffers (saved in ``state_dict``, moved by ``.to()``)."""

    def keep(self, dtype: torch.dtype, **tensors: torch.Tensor | None) -> None:
        for name, t in tensors.items():
            self.register_buffer(name, None if t is None else t.detach().to(dtype).contiguous())


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` on a 2-D x, bias as the product's accumulator."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _accumulate(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """``out += x W^T + b`` in place (2-D)."""
    out.addmm_(x, weight.t())
    return out if bias is None else out.add_(bias)


_ACTIVATIONS = {"silu": lambda h: F.silu(h, inplace=True), "gelu": F.gelu,
                "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}


class _FusedMLP(_Buffers):
    """A :class:`~dist_video.clip.MLP`, with a LayerNorm before it folded into ``c_fc`` and
    QuickGELU's factors folded into both maps (QuickGELU becomes SiLU). ``proj_bias=False``:
    the caller adds ``c_proj``'s bias with others of its own."""

    def __init__(self, mlp: MLP, dtype: torch.dtype, norm: nn.LayerNorm | None = None, proj_bias: bool = True):
        super().__init__()
        c_fc, act, c_proj = mlp.c_fc, mlp.gelu, mlp.c_proj
        fc_w, fc_b = _fold_norm(norm, c_fc.weight, c_fc.bias) if norm is not None else (_f64(c_fc.weight),
                                                                                          _f64(c_fc.bias))
        proj_w, proj_b = _f64(c_proj.weight), _f64(c_proj.bias) if proj_bias else None
        if isinstance(act, QuickGELU):
            self.act = "silu"
            fc_w, fc_b, proj_w = fc_w * S, _scaled(fc_b, S), proj_w / S
        elif isinstance(act, nn.GELU):
            self.act = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        else:
            raise TypeError(f"cannot fuse an MLP with activation {type(act).__name__}")
        self.keep(dtype, fc_weight=fc_w, fc_bias=fc_b, proj_weight=proj_w, proj_bias=proj_b)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: ... x C_in (normalised without affine when a norm was folded) -> ... x C_out;
        with ``residual`` (a fresh 2-D tensor nothing else reads, R x C_out) the result is
        accumulated into it in place and returned as that 2-D tensor."""
        h = _ACTIVATIONS[self.act](_linear(x.reshape(-1, x.shape[-1]), self.fc_weight, self.fc_bias))
        if residual is not None:
            return _accumulate(residual, h, self.proj_weight, self.proj_bias)
        return _linear(h, self.proj_weight, self.proj_bias).view(*x.shape[:-1], -1)


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


# ---------------------------------------------------------------------------- CLIP image tower
class _FusedCLIPBlock(_Buffers):
    """A pre-norm transformer block: ``x + attn(LN_1(x))``, then ``+ mlp(LN_2(x))``, both
    LayerNorm affines folded into the maps after them. x: N x L x D -> N x L x D."""

    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__()
        attn = block.attn
        self.heads = attn.heads
        self.eps_1, self.eps_2 = block.ln_1.eps, block.ln_2.eps
        qkv_w, qkv_b = _fold_norm(block.ln_1, attn.in_proj_weight, attn.in_proj_bias)
        self.keep(dtype, qkv_weight=qkv_w, qkv_bias=qkv_b, out_weight=attn.out_proj.weight,
                  out_bias=attn.out_proj.bias)
        self.mlp = _FusedMLP(block.mlp, dtype, norm=block.ln_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        d = width // self.heads
        qkv = _linear(_normalize(x, self.eps_1).view(-1, width), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # N x H x L x d
        heads = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, width)  # N*L x D
        x = _linear(heads, self.out_weight, self.out_bias).add_(x.reshape(-1, width))  # a fresh tensor
        return self.mlp(_normalize(x, self.eps_2), residual=x).view(n, length, width)


class FusedVisionTower(_Buffers):
    """CLIP's image tower, or its first ``depth`` blocks. Images N x 3 x H x W (normalised) ->
    :meth:`forward_layers` ``{i: N x (1+g*g) x D}`` / :meth:`forward` embeddings N x E."""

    def __init__(self, visual: nn.Module, dtype: torch.dtype, depth: int | None = None, pooled: bool = True):
        super().__init__()
        depth = visual.num_layers if depth is None else depth
        self.patch_size, self.grid_size = visual.patch_size, visual.grid_size
        self.eps_pre = visual.ln_pre.eps
        self.keep(dtype, patch_weight=visual.conv1.weight, class_embedding=visual.class_embedding,
                  positional_embedding=visual.positional_embedding, ln_pre_weight=visual.ln_pre.weight,
                  ln_pre_bias=visual.ln_pre.bias)
        self.blocks = nn.ModuleList([_FusedCLIPBlock(b, dtype) for b in visual.transformer.resblocks[:depth]])
        self.pooled = pooled
        if pooled:  # ln_post's affine folded into the projection
            self.eps_post = visual.ln_post.eps
            if visual.proj is not None:
                proj_t, shift = _fold_norm(visual.ln_post, visual.proj.t(), None)
                self.keep(dtype, post_weight=proj_t, post_bias=shift)
            else:
                self.keep(dtype, post_weight=torch.diag(_f64(visual.ln_post.weight)), post_bias=visual.ln_post.bias)

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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W -> N x E (not normalised)."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return _linear(_normalize(x[:, 0], self.eps_post), self.post_weight, self.post_bias)


# ---------------------------------------------------------------------------- the DiST branch
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


class _FusedStem(_Buffers):
    """The temporal stem, Conv3d(3 -> C_t, kernel (k_s, P, P), stride (1, P, P), padding
    (k_s // 2, 0, 0)), as one matrix product of every frame's patches with the k_s time taps'
    weights, the taps' outputs then summed k_s frames apart. B x 3 x T x H x W -> B x C_t x T x g x g."""

    def __init__(self, stem: nn.Conv3d, dtype: torch.dtype):
        super().__init__()
        k, p = stem.kernel_size[0], stem.kernel_size[1]
        self.kernel, self.patch_size, self.dim = k, p, stem.out_channels
        self.keep(dtype, weight=_f64(stem.weight).permute(2, 0, 1, 3, 4).reshape(k * stem.out_channels, -1),
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


class _FusedTemporalBlock(_Buffers):
    """A temporal block on features carried scaled by s = 1.702: returns ``s * block(x)`` for
    an input ``s * x`` (``input_scaled``) or ``x``. LayerNorm (scale-invariant: the input's
    scale goes into its epsilon), conv + SiLU, conv + residual add, SiLU."""

    def __init__(self, block: nn.Module, dtype: torch.dtype, input_scaled: bool, onednn: bool):
        super().__init__()
        c1, c2 = block.temporal_net.c_fc1, block.temporal_net.c_fc2
        self.input_scaled, self.onednn = input_scaled, onednn
        self.eps = block.ln.eps * (S * S if input_scaled else 1.0)  # LN(s x; s^2 eps) = LN(x; eps)
        self.pad_1, self.pad_2 = list(c1.padding), list(c2.padding)
        self.keep(dtype, ln_weight=block.ln.weight, ln_bias=block.ln.bias, weight_1=_f64(c1.weight) * S,
                  bias_1=_scaled(c1.bias, S), weight_2=c2.weight, bias_2=_scaled(c2.bias, S))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            z = F.conv3d(h, self.weight_2, self.bias_2, padding=self.pad_2).add_(x, alpha=S)
        elif onednn:
            z = torch.ops.mkldnn._convolution_pointwise.binary(h, x, self.weight_2, self.bias_2, self.pad_2,
                                                               [1, 1, 1], [1, 1, 1], 1, "add", 1.0, None, [], "")
        else:
            z = F.conv3d(h, self.weight_2, self.bias_2, padding=self.pad_2).add_(x)
        return F.silu(z, inplace=True)


class _FusedIntegrationBlock(_Buffers):
    """``FFN(LN(m)) + TFFN(LN'(m)) + extra`` with each LayerNorm's affine folded into the map
    after it (one normalisation when both epsilons agree) and one merged output bias.
    m: B*T' x (N+1) x C_i -> B*T'*(N+1) x C_i."""

    def __init__(self, block: nn.Module, dtype: torch.dtype, extra_bias: torch.Tensor | None):
        super().__init__()
        tffn = block.temporal_ffn
        self.sparse_frames = block.sparse_frames
        self.eps, self.eps_temporal = block.ln.eps, block.ln_temporal.eps
        self.kernel = tffn.c_fc2.kernel_size[0]
        fc1_w, fc1_b = _fold_norm(block.ln_temporal, tffn.c_fc1.weight.flatten(1), tffn.c_fc1.bias)
        fc2 = tffn.c_fc2
        self.keep(dtype, tffn_in_weight=fc1_w, tffn_in_bias=fc1_b,
                  tffn_conv_weight=_f64(fc2.weight).flatten(2).permute(0, 2, 1).reshape(fc2.out_channels, -1) * S,
                  tffn_conv_bias=_scaled(fc2.bias, S),
                  tffn_out_weight=_f64(tffn.c_proj.weight).flatten(1) / S,
                  out_bias=_sum(tffn.c_proj.bias, block.ffn.c_proj.bias, extra_bias))
        self.ffn = _FusedMLP(block.ffn, dtype, norm=block.ln, proj_bias=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        bt, length, c = m.shape
        t, k = self.sparse_frames, self.kernel
        x = m.view(-1, c)
        n = _normalize(x, self.eps)
        n_temporal = n if self.eps_temporal == self.eps else _normalize(x, self.eps_temporal)
        h = _linear(n_temporal, self.tffn_in_weight, self.tffn_in_bias).view(bt // t, t, length, -1)
        padded = F.pad(h, (0, 0, 0, 0, k // 2, k // 2))  # zero frames before and after: B x (T'+k-1) x (N+1) x C_h
        shifted = torch.cat([padded[:, dt:dt + t] for dt in range(k)], dim=-1).view(bt * length, -1)
        h = F.silu(_linear(shifted, self.tffn_conv_weight, self.tffn_conv_bias), inplace=True)
        out = _linear(h, self.tffn_out_weight, self.out_bias)  # TFFN + every output bias
        return self.ffn(n, residual=out)


class _FusedDiSTLayer(_Buffers):
    """One selected layer: temporal block, input map, integration->temporal,
    temporal->integration, integration block, on scaled temporal features. The input map's
    bias and the temporal->integration bias arrive inside ``res`` (the previous block's
    output) except in the first layer, and this block's output carries the next layer's."""

    def __init__(self, layer: DiSTLayer, dtype: torch.dtype, *, first: bool, onednn: bool,
                 next_input_bias: torch.Tensor | None):
        super().__init__()
        self.temporal_block = _FusedTemporalBlock(layer.temporal_block, dtype, input_scaled=not first, onednn=onednn)
        linear, i2t, t2i = layer.input_linear, layer.integration_to_temporal, layer.temporal_to_integration
        conv = t2i.linear_fuse
        self.alpha = conv.kernel_size[0]
        c_i = conv.out_channels
        self.keep(dtype, input_weight=linear.weight,
                  input_bias=_sum(linear.bias, conv.bias) if first else None,
                  # the features arrive scaled by s: the convolution divides it out
                  t2i_weight=_f64(conv.weight).flatten(2).transpose(1, 2).reshape(c_i, -1) / S,
                  # the tokens already hold the convolution's bias: the class tokens swap it for theirs
                  t2i_class_tokens=_sum(t2i.cls_token[0, 0], None if conv.bias is None else -_f64(conv.bias)))
        self.updates_temporal = layer.updates_temporal
        if self.updates_temporal:
            # i2t reads m without the temporal->integration bias: W (m - b_t2i) + b = W m + (b - W b_t2i);
            # its output joins features carried scaled by s.
            fuse = i2t.linear_fuse
            shift = None if conv.bias is None else -(_f64(fuse.weight) @ _f64(conv.bias))
            self.keep(dtype, i2t_weight=_f64(fuse.weight) * S, i2t_bias=_scaled(_sum(fuse.bias, shift), S))
        self.integration_block = _FusedIntegrationBlock(layer.integration_block, dtype, next_input_bias)

    def forward(self, x_t: torch.Tensor, tokens: torch.Tensor, res: torch.Tensor | None, batch: int
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x_t: B x C_t x T x g x g (scaled); tokens: B*T' x (N+1) x D; res: B*T'*(N+1) x C_i
        or None -> (next x_t or None after the last layer, m, res)."""
        x_t = self.temporal_block(x_t)
        frames, length, width = tokens.shape
        tokens = tokens.reshape(-1, width).to(self.input_weight.dtype)
        if res is None:
            m = _linear(tokens, self.input_weight, self.input_bias)
        else:
            m = res.addmm_(tokens, self.input_weight.t())
        c_i = m.shape[-1]
        b, c_t, t, g1, g2 = x_t.shape
        a = self.alpha
        x_t_next = None
        if self.updates_temporal:  # on all N+1 tokens (a contiguous product), class tokens dropped after
            x = _linear(m, self.i2t_weight, self.i2t_bias).view(b, t // a, length, c_t)[:, :, 1:]
            x = x.reshape(b, t // a, 1, g1, g2, c_t).permute(0, 5, 1, 2, 3, 4)  # B x C_t x T' x 1 x g x g
            x_t_next = (x_t.view(b, c_t, t // a, a, g1, g2) + x).view(b, c_t, t, g1, g2)
        # temporal->integration: one product over every token, a zero row standing for each class token
        pairs = x_t.new_empty(b, t // a, length, a * c_t)
        pairs[:, :, 0].zero_()
        src = x_t.permute(0, 2, 3, 4, 1).reshape(b, t // a, a, g1 * g2, c_t).transpose(2, 3)
        pairs[:, :, 1:].view(b, t // a, g1 * g2, a, c_t).copy_(src)
        m.addmm_(pairs.view(-1, a * c_t), self.t2i_weight.t())
        m.view(b, t // a, length, c_i)[:, :, 0] += self.t2i_class_tokens
        res = self.integration_block(m.view(frames, length, c_i))
        return x_t_next, m, res


class _FusedCrossAttention(_Buffers):
    """``attn(LN(q), LN(kv), LN(kv))`` for a few queries against many tokens that arrive
    normalised without affine; keys and values are never formed (see the module docstring).
    query: S x Lq x C, normalized: S x Lk x C -> S x Lq x C."""

    def __init__(self, cross: nn.Module, dtype: torch.dtype):
        super().__init__()
        attn, ln = cross.attn, cross.ln_1
        c = attn.in_proj_weight.shape[1]
        heads = self.heads = attn.heads
        d = c // heads
        self.eps = ln.eps
        w, b = attn.in_proj_weight, attn.in_proj_bias
        w_q, b_q = _fold_norm(ln, w[:c], b[:c])
        w_k, _ = _fold_norm(ln, w[c:2 * c], None)  # q . b_k is the same for every key: it cancels
        w_v, b_v = _fold_norm(ln, w[2 * c:], b[2 * c:])
        w_q, b_q = w_q * d ** -0.5, b_q * d ** -0.5
        # scores of head h: (n_q W_q_h^T + b_q_h) W_k_h n_j = (n_q M_h^T + u_h) . n_j
        wq_h, wk_h = w_q.view(heads, d, c), w_k.view(heads, d, c)
        query_key = torch.einsum("hdi,hdj->hji", wq_h, wk_h).reshape(heads * c, c)  # H*C x C
        query_key_bias = torch.einsum("hd,hdj->hj", b_q.view(heads, d), wk_h).reshape(heads * c)
        # output: sum_h W_o_h (W_v_h z_h + b_v_h) + b_o, z_h the attention-weighted normalised tokens
        w_o = _f64(attn.out_proj.weight)
        value_out = torch.einsum("ohd,hdj->ohj", w_o.view(c, heads, d), w_v.view(heads, d, c)).reshape(c, heads * c)
        self.keep(dtype, query_key=query_key, query_key_bias=query_key_bias, value_out=value_out,
                  out_bias=_sum(attn.out_proj.bias, w_o @ b_v))

    def forward(self, query: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
        s, lq, c = query.shape
        u = _linear(_normalize(query, self.eps).view(-1, c), self.query_key, self.query_key_bias)
        scores = u.view(s, lq * self.heads, c) @ normalized.transpose(1, 2)  # S x Lq*H x Lk
        z = torch.softmax(scores, dim=-1) @ normalized  # S x Lq*H x C
        return _linear(z.view(s * lq, -1), self.value_out, self.out_bias).view(s, lq, c)


class _FusedPooling(_Buffers):
    """One adaptive-pooling layer on tokens normalised without affine (shared by every layer)."""

    def __init__(self, pooling: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.spatial = _FusedCrossAttention(pooling.spatial_transformer, dtype)
        self.spatial_mlp = _FusedMLP(pooling.output_map_spatial_cls_token, dtype, norm=pooling.ln_out_spat_cls_token)
        self.spatial_mlp_eps = pooling.ln_out_spat_cls_token.eps
        self.temporal = _FusedCrossAttention(pooling.temporal_transformer, dtype)
        self.temporal_mlp = _FusedMLP(pooling.output_map_cls_token, dtype, norm=pooling.ln_out_temp_cls_token)
        self.temporal_mlp_eps = pooling.ln_out_temp_cls_token.eps
        self.keep(dtype, positional_embedding=pooling.positional_embedding[0])

    def forward(self, normalized: torch.Tensor, video_query: torch.Tensor, frame_query: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """normalized: B*T' x (N+1) x C_i; video_query: B x 1 x C_i; frame_query: B*T' x 1 x C_i."""
        c = frame_query.shape[-1]
        frame_query = frame_query + self.spatial(frame_query, normalized)
        frame_query = self.spatial_mlp(_normalize(frame_query, self.spatial_mlp_eps),
                                       residual=frame_query.view(-1, c)).view_as(frame_query)
        frames = frame_query.view(video_query.shape[0], -1, c) + self.positional_embedding  # B x T' x C_i
        video_query = video_query + self.temporal(video_query, _normalize(frames, self.temporal.eps))
        video_query = self.temporal_mlp(_normalize(video_query, self.temporal_mlp_eps),
                                        residual=video_query.view(-1, c)).view_as(video_query)
        return video_query, frame_query


class FusedDiSTBranch(_Buffers):
    """The DiST branch's inference form. video: B x 3 x T x H x W, clip_layers
    ``{layer: B*T' x (N+1) x D}`` -> B x E (not normalised)."""

    def __init__(self, branch: DiSTBranch, dtype: torch.dtype, onednn: bool):
        super().__init__()
        self.num_frames, self.alpha, self.patch_size = branch.config.num_frames, branch.alpha, branch.patch_size
        self.selected_layers = list(branch.selected_layers)
        self.stem = _FusedStem(branch.temporal_stem, dtype)
        layers = list(branch.layers)
        # each layer's input biases ride in the previous layer's integration-block output
        next_biases = [_sum(nxt.input_linear.bias, nxt.temporal_to_integration.linear_fuse.bias) for nxt in layers[1:]]
        self.layers = nn.ModuleList([
            _FusedDiSTLayer(layer, dtype, first=i == 0, onednn=onednn, next_input_bias=bias)
            for i, (layer, bias) in enumerate(zip(layers, [*next_biases, None]))])
        pooling_eps = {p.spatial_transformer.ln_1.eps for p in branch.adapooling_nets}
        if len(pooling_eps) > 1:
            raise ValueError(f"cannot fuse pooling layers whose LayerNorm epsilons differ: {sorted(pooling_eps)}")
        self.pooling_eps = pooling_eps.pop() if pooling_eps else 1e-5
        self.pooling = nn.ModuleList([_FusedPooling(p, dtype) for p in branch.adapooling_nets])
        post_w, post_b = _fold_norm(branch.ln_post, branch.proj.t(), None)
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
        normalized = _normalize(feat, self.pooling_eps)
        video_query = self.video_query.expand(b, 1, c)
        frame_query = self.frame_query.expand(feat.shape[0], 1, c)
        for pooling in self.pooling:
            video_query, frame_query = pooling(normalized, video_query, frame_query)
        last = clip_layers[self.selected_layers[-1]]
        cls_mean = last[:, 0].to(feat.dtype).view(b, -1, last.shape[-1]).mean(dim=1)  # B x D
        y = _linear(cls_mean, self.cls_weight, self.cls_bias).add_(video_query[:, 0])
        return _linear(_normalize(y, self.eps_post), self.post_weight, self.post_bias)


# ---------------------------------------------------------------------------- heads and models
class FusedHead(_Buffers):
    """A classifier head in ``dtype`` (float32 or wider): class-text embeddings (normalised, times CLIP's
    ``exp(logit_scale)``, against the normalised video embedding) or a linear layer.
    z: B x E -> B x C."""

    def __init__(self, kind: str | None, dtype: torch.dtype, *, text: torch.Tensor | None = None,
                 logit_scale: float | None = None, linear: nn.Linear | None = None):
        super().__init__()
        self.kind = kind
        if kind == "text":
            self.keep(dtype, weight=F.normalize(_f64(text), dim=-1) * math.exp(logit_scale), bias=None)
        elif kind == "linear":
            self.keep(dtype, weight=linear.weight, bias=linear.bias)
        elif kind is not None:
            raise ValueError(f"unknown head type {kind!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            raise RuntimeError("this model has no classifier head (set one on the model before fusing)")
        z = z.to(self.weight.dtype)
        if self.kind == "text":
            z = F.normalize(z, dim=-1)
        return F.linear(z, self.weight, self.bias)


def _head_of(model: nn.Module, dtype: torch.dtype) -> FusedHead:
    if model.head_type == "text":
        return FusedHead("text", dtype, text=model.class_embeddings, logit_scale=float(model.clip.logit_scale))
    if model.head_type == "linear":
        return FusedHead("linear", dtype, linear=model.head)
    return FusedHead(None, dtype)


class _FusedClassifier(nn.Module):
    """What the fused models share: ``forward(video) -> B x C`` through :meth:`encode_video`
    and the head, computed in the fused dtype whatever autocast context is around it; the
    embeddings and logits come out in float32 (or the fused dtype, if wider)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.method = model.method
        self.dtype = dtype
        self.output_dtype = torch.promote_types(dtype, torch.float32)
        self.class_names = list(model.class_names) if model.class_names is not None else None
        self.config = copy.deepcopy(model.config)
        self.head = _head_of(model, self.output_dtype)

    @property
    def num_classes(self) -> int | None:
        return None if self.head.kind is None else self.head.weight.shape[0]

    def text_head(self, text_embeddings: torch.Tensor, logit_scale: float) -> FusedHead:
        """A class-text head for this model (C x E class-text embeddings, e.g. from the model's
        ``encode_text``; ``logit_scale`` CLIP's, before ``exp``), in the model's output dtype on its
        device, made exactly as the model's own text head is. The model is left as it is: give the
        head to :meth:`classify` (several heads can share one model)."""
        device = next(self.buffers()).device
        return FusedHead("text", self.output_dtype, text=text_embeddings, logit_scale=logit_scale).to(device)

    def set_class_embeddings(self, text_embeddings: torch.Tensor, logit_scale: float,
                             class_names: Sequence[str] | None = None) -> "_FusedClassifier":
        """Use class-text embeddings (C x E, e.g. from the model's ``encode_text``) as the head."""
        self.head = self.text_head(text_embeddings, logit_scale)
        self.class_names = list(class_names) if class_names is not None else None
        return self

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W (normalised dense frames) -> B x E (not normalised)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(video.shape)}")
        with torch.autocast(video.device.type, enabled=False):
            return self.embed(video).to(self.output_dtype)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, embeddings: torch.Tensor, head: FusedHead | None = None) -> torch.Tensor:
        """Embeddings B x E (from :meth:`encode_video`) -> B x C class logits through ``head``
        (default: the model's own; or one from :meth:`text_head`), outside any autocast."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return (self.head if head is None else head)(embeddings)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W -> B x C class logits."""
        return self.classify(self.encode_video(video))


def _sparse_frames(video: torch.Tensor, alpha: int, dtype: torch.dtype) -> torch.Tensor:
    """B x 3 x T x H x W -> B*T' x 3 x H x W (every alpha-th frame, frame index fastest)."""
    return video[:, :, ::alpha].transpose(1, 2).flatten(0, 1).to(dtype)


class FusedDiSTModel(_FusedClassifier):
    """The inference form of :class:`~dist_video.model.DiSTVideoModel`: the frozen CLIP up to
    the last selected block and the DiST branch, fused."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, onednn: bool):
        super().__init__(model, dtype)
        self.selected_layers = list(model.selected_layers)
        self.alpha = model.config.alpha
        self.clip = FusedVisionTower(model.clip.visual, dtype, depth=max(self.selected_layers) + 1, pooled=False)
        self.branch = FusedDiSTBranch(model.branch, dtype, onednn)

    def clip_layers(self, video: torch.Tensor) -> dict[int, torch.Tensor]:
        """B x 3 x T x H x W -> {layer: B*T' x (N+1) x D} of the sparse frames."""
        return self.clip.forward_layers(_sparse_frames(video, self.alpha, self.dtype), self.selected_layers)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        return self.branch(video, self.clip_layers(video))


class FusedFrameModel(_FusedClassifier):
    """The inference form of the frame-averaging baselines (``frozen-mean``, ``full-finetune``,
    ``adapter``): CLIP on the sparse frames (with the adapter before each block, if any),
    frame embeddings averaged."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, adapters: nn.ModuleList | None = None):
        super().__init__(model, dtype)
        self.alpha = model.config.alpha
        self.sparse_frames = model.config.num_frames // model.config.alpha
        self.clip = FusedVisionTower(model.clip.visual, dtype)
        self.adapters = None if adapters is None else _frozen_copy(adapters, dtype)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        frames = _sparse_frames(video, self.alpha, self.dtype)
        if self.adapters is None:
            emb = self.clip(frames)
        else:
            p = self.clip.patch_size
            grid = (frames.shape[-2] // p, frames.shape[-1] // p)
            x = self.clip.embed(frames)
            for adapter, block in zip(self.adapters, self.clip.blocks):
                x = block(adapter(x, self.sparse_frames, grid))
            emb = _linear(_normalize(x[:, 0], self.clip.eps_post), self.clip.post_weight, self.clip.post_bias)
        return average_frames(emb, b)


def average_frames(embeddings: torch.Tensor, batch: int) -> torch.Tensor:
    """B*T' x E frame embeddings -> B x E, averaged in float32 (or wider)."""
    embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    return embeddings.view(batch, -1, embeddings.shape[-1]).mean(dim=1)


def _frozen_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` whose parameters are buffers of the same names (the
    same forward, nothing that requires grad)."""
    module = copy.deepcopy(module).to(dtype)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


def _resolve(model: nn.Module, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.device]:
    """The compute dtype (default: the frozen CLIP's, or float32 for a trained CLIP) and device."""
    device = model.clip.logit_scale.device
    return dtype or model.clip_dtype, device


def fuse_dist(model: nn.Module, dtype: torch.dtype | None = None, onednn: bool = True) -> FusedDiSTModel:
    """The inference form of a :class:`~dist_video.model.DiSTVideoModel` (see the module
    docstring). ``dtype``: the compute dtype (default: the frozen CLIP's); ``onednn``: use
    oneDNN's fused convolutions where they run (False for export to other runtimes)."""
    dtype, device = _resolve(model, dtype)
    fused = FusedDiSTModel(model, dtype, onednn and onednn_fusion_available(device, dtype))
    return fused.to(device).eval()


def fuse_frames(model: nn.Module, dtype: torch.dtype | None = None, adapters: nn.ModuleList | None = None
                ) -> FusedFrameModel:
    """The inference form of a frame-averaging baseline (``adapters``: the adapter baseline's)."""
    dtype, device = _resolve(model, dtype)
    return FusedFrameModel(model, dtype, adapters).to(device).eval()
