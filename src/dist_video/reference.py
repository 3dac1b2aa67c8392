"""The plain paper form of DiST: a deliberately naive forward pass that the tests compare the
package against.

Written from ``docs/method.md`` step by step, in the authors' sequence-first layout (tokens x
batch*frames x channels) with ``torch.nn.functional`` calls only (``conv3d`` for every
convolution, ``multi_head_attention_forward`` for attention, nearest-neighbour
``interpolate`` for the upsampling), reading the weights by the authors' checkpoint names
(OpenAI's ``visual.*`` and ``dist_net.*``, see :mod:`dist_video.authors_keys`). No speed
trick, no fold, no memory saving, and no code shared with :mod:`dist_video.dist`: the
training form (:mod:`dist_video.dist`) and the inference form (each part's ``fuse()``) are
checked against it, and it is checked against the authors' own outputs (the official-tiny
fixture in ``tests/assets``). LayerNorm epsilon is 1e-5 throughout, as in the release.

``weights``: a flat dict of tensors, e.g. :func:`dist_video.checkpoints.read_official_state_dict`
of an authors' file, or ``{**clip.state_dict(), **branch_to_official_state_dict(branch_sd)}``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .authors_keys import BRANCH_PREFIX, LAYER_PARTS

__all__ = ["dist_forward", "clip_visual_layers", "temporal_block", "dist_layer", "adaptive_pooling", "quick_gelu"]

Weights = Mapping[str, torch.Tensor]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def layer_norm(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], 1e-5)


def linear(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    return F.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])


def conv3d(x: torch.Tensor, w: Weights, prefix: str, **kw) -> torch.Tensor:
    return F.conv3d(x, w[prefix + ".weight"], w[prefix + ".bias"], **kw)


def same_padding(w: Weights, prefix: str) -> tuple[int, int, int]:
    """The padding that keeps a Conv3d's output the size of its input (odd kernels)."""
    return tuple(k // 2 for k in w[prefix + ".weight"].shape[2:])


def mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Weights, prefix: str, heads: int) -> torch.Tensor:
    """Sequence-first multi-head attention: q Lq x S x C, k/v Lk x S x C -> Lq x S x C."""
    c = q.shape[-1]
    out, _ = F.multi_head_attention_forward(
        q, k, v, c, heads, w[prefix + ".in_proj_weight"], w[prefix + ".in_proj_bias"], None, None,
        False, 0.0, w[prefix + ".out_proj.weight"], w[prefix + ".out_proj.bias"], training=False,
        need_weights=False)
    return out


def mlp(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    return linear(quick_gelu(linear(x, w, prefix + ".c_fc")), w, prefix + ".c_proj")


def clip_block(x: torch.Tensor, w: Weights, prefix: str, heads: int) -> torch.Tensor:
    """OpenAI's residual block on L x N x D."""
    h = layer_norm(x, w, prefix + ".ln_1")
    x = x + mha(h, h, h, w, prefix + ".attn", heads)
    return x + mlp(layer_norm(x, w, prefix + ".ln_2"), w, prefix + ".mlp")


def clip_visual_layers(frames: torch.Tensor, w: Weights, heads: int) -> list[torch.Tensor]:
    """Step 1, the frozen CLIP: frames N x 3 x H x W -> every block's output, each L x N x D."""
    x = F.conv2d(frames, w["visual.conv1.weight"], stride=w["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).permute(0, 2, 1)
    cls = w["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + w["visual.positional_embedding"]
    x = layer_norm(x, w, "visual.ln_pre").permute(1, 0, 2)
    outs, i = [], 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in w:
        x = clip_block(x, w, f"visual.transformer.resblocks.{i}", heads)
        outs.append(x)
        i += 1
    return outs


def layer_prefix(part: str, index: int) -> str:
    """The authors' prefix of a layer's part (``temporal_block`` of layer 2 -> ``dist_net.temporal_nets.2``)."""
    theirs = next(name for name, ours in LAYER_PARTS.items() if ours == part)
    return f"{BRANCH_PREFIX}{theirs}.{index}"


def temporal_block(x_t: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    """``QuickGELU(x_t + conv(1,3,3)(QuickGELU(conv(k,1,1)(LN_c(x_t)))))`` on B x C_t x T x g x g."""
    y = layer_norm(x_t.permute(0, 2, 3, 4, 1), w, prefix + ".ln").permute(0, 4, 1, 2, 3)
    fc1, fc2 = prefix + ".temporal_net.c_fc1", prefix + ".temporal_net.c_fc2"
    y = quick_gelu(conv3d(y, w, fc1, padding=same_padding(w, fc1)))
    return quick_gelu(x_t + conv3d(y, w, fc2, padding=same_padding(w, fc2)))


def integration_block(m: torch.Tensor, w: Weights, prefix: str, batch: int) -> torch.Tensor:
    """``FFN(LN(m)) + TFFN(LN'(m))`` on (N+1) x B*T' x C_i, TFFN as 3D convolutions over
    B x C_i x T' x (N+1) x 1 (each token position mixed over time)."""
    ffn = mlp(layer_norm(m, w, prefix + ".ln"), w, prefix + ".ffn")
    length, frames, _ = m.shape
    v = layer_norm(m, w, prefix + ".ln_temporal")
    v = v.view(length, batch, frames // batch, -1).permute(1, 3, 2, 0).unsqueeze(-1)  # B x C x T' x L x 1
    tffn = prefix + ".temporal_ffn"
    v = conv3d(v, w, tffn + ".c_fc1")
    v = quick_gelu(conv3d(v, w, tffn + ".c_fc2", padding=same_padding(w, tffn + ".c_fc2")))
    v = conv3d(v, w, tffn + ".c_proj")
    return ffn + v.squeeze(-1).permute(3, 0, 2, 1).reshape(length, frames, -1)


def dist_layer(x_t: torch.Tensor, tokens: torch.Tensor, res: torch.Tensor | float, w: Weights, index: int,
               alpha: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3 for layer ``index``: x_t B x C_t x T x g x g, CLIP tokens (N+1) x B*T' x D, res
    (N+1) x B*T' x C_i or 0 -> (x_t for the next layer, m, res)."""
    b, _, t, g, _ = x_t.shape
    ts = t // alpha
    x_t = temporal_block(x_t, w, layer_prefix("temporal_block", index))
    m = linear(tokens, w, layer_prefix("input_linear", index)) + res
    # integration -> temporal: the patch tokens, upsampled x alpha in time
    z = linear(m[1:], w, layer_prefix("integration_to_temporal", index) + ".linear_fuse")  # N x B*T' x C_t
    z = z.view(g * g, b, ts, -1).permute(1, 3, 2, 0).reshape(b, -1, ts, g, g)
    x_t_new = x_t + F.interpolate(z, scale_factor=(alpha, 1, 1), mode="nearest")
    # temporal -> integration, from x_t before the update above, a class token per frame in front
    t2i = layer_prefix("temporal_to_integration", index)
    u = F.conv3d(x_t, w[t2i + ".linear_fuse.weight"], w[t2i + ".linear_fuse.bias"], stride=(alpha, 1, 1))
    u = u.flatten(3).permute(3, 0, 2, 1)  # N x B x T' x C_i
    u = torch.cat([w[t2i + ".cls_token"].expand(1, b, ts, -1), u], 0).flatten(1, 2)
    m = m + u
    res = integration_block(m, w, layer_prefix("integration_block", index), b)
    return x_t_new, m, res


def adaptive_pooling(feat: torch.Tensor, video_q: torch.Tensor, frame_q: torch.Tensor, w: Weights, prefix: str,
                     batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4, one pooling layer: feat (N+1) x B*T' x C_i, video_q 1 x B x C_i, frame_q 1 x B*T' x C_i."""
    c = feat.shape[-1]
    heads = c // 64
    spatial, temporal = prefix + ".spatial_transformer", prefix + ".temporal_transformer"
    q, kv = layer_norm(frame_q, w, spatial + ".ln_1"), layer_norm(feat, w, spatial + ".ln_1")
    frame_q = frame_q + mha(q, kv, kv, w, spatial + ".attn", heads)
    frame_q = frame_q + mlp(layer_norm(frame_q, w, prefix + ".ln_out_spat_cls_token"), w,
                            prefix + ".output_map_spatial_cls_token")
    frames = frame_q[0].reshape(batch, -1, c) + w[prefix + ".positional_embedding"]
    frames = frames.permute(1, 0, 2)  # T' x B x C_i
    q, kv = layer_norm(video_q, w, temporal + ".ln_1"), layer_norm(frames, w, temporal + ".ln_1")
    video_q = video_q + mha(q, kv, kv, w, temporal + ".attn", heads)
    video_q = video_q + mlp(layer_norm(video_q, w, prefix + ".ln_out_temp_cls_token"), w,
                            prefix + ".output_map_cls_token")
    return video_q, frame_q


def dist_forward(video: torch.Tensor, w: Weights, *, alpha: int, selected_layers: Sequence[int],
                 clip_heads: int) -> torch.Tensor:
    """video B x 3 x T x H x W; w: OpenAI CLIP keys + ``dist_net.*`` keys -> B x E (before normalisation)."""
    b, _, t, h, wd = video.shape
    ts = t // alpha
    sparse = video[:, :, ::alpha].permute(0, 2, 1, 3, 4).reshape(b * ts, 3, h, wd)
    layers = clip_visual_layers(sparse, w, clip_heads)
    p = w["visual.conv1.weight"].shape[-1]
    d = BRANCH_PREFIX
    stem = w[d + "temporal_stem.weight"]  # step 2
    x_t = F.conv3d(video, stem, w[d + "temporal_stem.bias"], stride=(1, p, p), padding=(stem.shape[2] // 2, 0, 0))
    res = 0.0
    for index, layer in enumerate(selected_layers):
        x_t, m, res = dist_layer(x_t, layers[layer], res, w, index, alpha)
    feat = res + m
    c = feat.shape[-1]
    video_q = w[d + "aggregated_cls_token"].expand(1, b, c)
    frame_q = w[d + "aggregated_spatial_cls_token"].expand(1, b * ts, c)
    i = 0
    while f"{d}adapooling_nets.{i}.positional_embedding" in w:
        video_q, frame_q = adaptive_pooling(feat, video_q, frame_q, w, f"{d}adapooling_nets.{i}", b)
        i += 1
    cls_mean = layers[selected_layers[-1]][0].view(b, ts, -1).mean(1)  # step 5: B x D
    z = layer_norm(video_q[0] + linear(cls_mean, w, d + "proj_spatial_cls_token"), w, d + "ln_post")
    return z @ w[d + "proj"]
