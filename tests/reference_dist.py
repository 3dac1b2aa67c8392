"""An independent, deliberately naive DiST forward pass used as a test oracle.

Written from ``reference/DiST.md`` in the sequence-first layout (tokens, batch*frames,
channels) with ``torch.nn.functional.multi_head_attention_forward``, reading weights by the
authors' checkpoint names (``dist_net.*``). It shares no code with ``dist_video.dist``. It is
checked against the authors' own outputs (official-tiny) and then used to check the package
on sizes and options the fixture does not cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def layer_norm(x, w, prefix):
    return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], 1e-5)


def linear(x, w, prefix):
    return F.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])


def conv3d(x, w, prefix, **kw):
    return F.conv3d(x, w[prefix + ".weight"], w[prefix + ".bias"], **kw)


def mha(q, k, v, w, prefix, heads):
    """Sequence-first multi-head attention: q Lq x S x C, k/v Lk x S x C."""
    c = q.shape[-1]
    out, _ = F.multi_head_attention_forward(
        q, k, v, c, heads, w[prefix + ".in_proj_weight"], w[prefix + ".in_proj_bias"], None, None,
        False, 0.0, w[prefix + ".out_proj.weight"], w[prefix + ".out_proj.bias"], training=False,
        need_weights=False)
    return out


def clip_block(x, w, prefix, heads):
    """OpenAI residual block on L x N x D."""
    h = layer_norm(x, w, prefix + ".ln_1")
    x = x + mha(h, h, h, w, prefix + ".attn", heads)
    h = layer_norm(x, w, prefix + ".ln_2")
    return x + linear(quick_gelu(linear(h, w, prefix + ".mlp.c_fc")), w, prefix + ".mlp.c_proj")


def clip_visual_layers(frames, w, heads):
    """frames N x 3 x H x W -> list of every block's output, each L x N x D."""
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


def dist_forward(video, w, *, alpha, selected_layers, clip_heads):
    """video B x 3 x T x H x W; w: OpenAI CLIP keys + ``dist_net.*`` keys -> B x E."""
    b, _, t, h, wd = video.shape
    ts = t // alpha
    sparse = video[:, :, ::alpha].permute(0, 2, 1, 3, 4).reshape(b * ts, 3, h, wd)
    layers = clip_visual_layers(sparse, w, clip_heads)
    p = w["visual.conv1.weight"].shape[-1]
    g = h // p
    d = "dist_net."
    stem = w[d + "temporal_stem.weight"]
    xt = F.conv3d(video, stem, w[d + "temporal_stem.bias"], stride=(1, p, p),
                  padding=(stem.shape[2] // 2, 0, 0))
    res = 0.0
    for idx, layer in enumerate(selected_layers):
        # temporal block
        tn = f"{d}temporal_nets.{idx}"
        k = w[tn + ".temporal_net.c_fc1.weight"].shape[2]
        y = layer_norm(xt.permute(0, 2, 3, 4, 1), w, tn + ".ln").permute(0, 4, 1, 2, 3)
        y = quick_gelu(conv3d(y, w, tn + ".temporal_net.c_fc1", padding=(k // 2, 0, 0)))
        y = conv3d(y, w, tn + ".temporal_net.c_fc2", padding=(0, 1, 1))
        xt = quick_gelu(xt + y)
        # m = Linear(F) + res, sequence-first: (N+1) x B*T' x C_i
        m = linear(layers[layer], w, f"{d}input_linears.{idx}") + res
        # integration -> temporal
        z = linear(m[1:], w, f"{d}integration2temporal_nets.{idx}.linear_fuse")  # N x BT' x C_t
        z = z.view(g * g, b, ts, -1).permute(1, 3, 2, 0).reshape(b, -1, ts, g, g)
        z = F.interpolate(z, scale_factor=(alpha, 1, 1), mode="nearest")
        xt_new = xt + z
        # temporal -> integration
        tin = f"{d}temporal2integration_nets.{idx}"
        u = F.conv3d(xt, w[tin + ".linear_fuse.weight"], w[tin + ".linear_fuse.bias"],
                     stride=(alpha, 1, 1))  # B x C_i x T' x g x g
        u = u.flatten(3).permute(3, 0, 2, 1)  # N x B x T' x C_i
        u = torch.cat([w[tin + ".cls_token"].expand(1, b, ts, -1), u], 0).flatten(1, 2)
        m = m + u
        # integration block
        ib = f"{d}integration_nets.{idx}"
        ffn = linear(quick_gelu(linear(layer_norm(m, w, ib + ".ln"), w, ib + ".ffn.c_fc")), w, ib + ".ffn.c_proj")
        kt = w[ib + ".temporal_ffn.c_fc2.weight"].shape[2]
        v = layer_norm(m, w, ib + ".ln_temporal")  # L x BT' x C
        L = v.shape[0]
        v = v.view(L, b, ts, -1).permute(1, 3, 2, 0).unsqueeze(-1)  # B x C x T' x L x 1
        v = conv3d(v, w, ib + ".temporal_ffn.c_fc1")
        v = quick_gelu(conv3d(v, w, ib + ".temporal_ffn.c_fc2", padding=(kt // 2, 0, 0)))
        v = conv3d(v, w, ib + ".temporal_ffn.c_proj")
        v = v.squeeze(-1).permute(3, 0, 2, 1).reshape(L, b * ts, -1)
        res = ffn + v
        xt = xt_new
    feat = res + m
    ci = feat.shape[-1]
    heads = ci // 64
    video_q = w[d + "aggregated_cls_token"].expand(1, b, ci)
    frame_q = w[d + "aggregated_spatial_cls_token"].expand(1, b * ts, ci)
    i = 0
    while f"{d}adapooling_nets.{i}.positional_embedding" in w:
        ap = f"{d}adapooling_nets.{i}"
        lq = lambda x: layer_norm(x, w, ap + ".spatial_transformer.ln_1")  # noqa: E731
        frame_q = frame_q + mha(lq(frame_q), lq(feat), lq(feat), w, ap + ".spatial_transformer.attn", heads)
        frame_q = frame_q + linear(quick_gelu(linear(layer_norm(frame_q, w, ap + ".ln_out_spat_cls_token"),
                                                     w, ap + ".output_map_spatial_cls_token.c_fc")),
                                   w, ap + ".output_map_spatial_cls_token.c_proj")
        frames = frame_q[0].reshape(b, ts, ci) + w[ap + ".positional_embedding"]
        frames = frames.permute(1, 0, 2)  # T' x B x C
        lt = lambda x: layer_norm(x, w, ap + ".temporal_transformer.ln_1")  # noqa: E731
        video_q = video_q + mha(lt(video_q), lt(frames), lt(frames), w, ap + ".temporal_transformer.attn", heads)
        video_q = video_q + linear(quick_gelu(linear(layer_norm(video_q, w, ap + ".ln_out_temp_cls_token"),
                                                     w, ap + ".output_map_cls_token.c_fc")),
                                   w, ap + ".output_map_cls_token.c_proj")
        i += 1
    last = layers[selected_layers[-1]][0]  # BT' x D (class tokens)
    cls_mean = last.view(b, ts, -1).mean(1)
    z = layer_norm(video_q[0] + linear(cls_mean, w, d + "proj_spatial_cls_token"), w, d + "ln_post")
    return z @ w[d + "proj"]
