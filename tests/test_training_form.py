"""The training form: each module's kernels equal the paper's plain expression (values and
gradients), CLIP stays frozen, and activation checkpointing keeps less for the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_video import DiSTConfig, DiSTVideoModel


def test_training_step_leaves_clip_without_gradients(tiny_clip):
    clip = tiny_clip(width=64, layers=3)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    model.set_linear_head(5)
    model.train()
    assert not model.clip.training  # CLIP stays in eval mode
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable and all(n.startswith(("branch.", "head.")) for n in trainable)
    video = torch.randn(2, 3, 4, 64, 64)
    layers = model.clip_layers(video)
    assert all(not t.requires_grad and t.grad_fn is None for t in layers.values())  # no graph built
    assert sorted(layers) == [0, 1, 2]
    loss = torch.nn.functional.cross_entropy(model(video), torch.tensor([1, 3]))
    loss.backward()
    assert all(p.grad is None for p in model.clip.parameters())
    trained = [p for p in model.branch.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    # the only frozen branch weights: the last integration->temporal map, which feeds nothing
    frozen = [n for n, p in model.branch.named_parameters() if not p.requires_grad]
    assert frozen == ["layers.2.integration_to_temporal.linear_fuse.weight",
                      "layers.2.integration_to_temporal.linear_fuse.bias"]


def test_quick_gelu_memory_saving_backward_is_exact():
    from dist_video.clip import QuickGELU
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (x,))
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_activation_checkpointing_gives_the_same_gradients(tiny_clip):
    clip = tiny_clip(width=64, layers=3)
    torch.manual_seed(0)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    video = torch.randn(2, 3, 4, 64, 64)

    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(checkpointing)
        model.encode_video(video).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.branch.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert len(plain) > 50
    for mode in (True, "selective", "full"):
        checkpointed = grads(mode)
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="off, selective, full"):
        model.set_grad_checkpointing("some")


def test_patch_stem_equals_the_3d_convolution():
    from dist_video.dist import PatchStem

    torch.manual_seed(0)
    stem = PatchStem(24, patch_size=8, kernel=5)
    conv = torch.nn.Conv3d(3, 24, (5, 8, 8), stride=(1, 8, 8), padding=(2, 0, 0))
    conv.load_state_dict(stem.state_dict())  # same parameter names and shapes
    video = torch.randn(2, 3, 7, 35, 41)  # sides not multiples of the patch: the remainder is ignored
    torch.testing.assert_close(stem(video), conv(video), rtol=1e-5, atol=1e-5)
    video.requires_grad_(True)
    stem(video).square().sum().backward()
    g_stem = (stem.weight.grad.clone(), video.grad.clone())
    video.grad = None
    conv(video).square().sum().backward()
    torch.testing.assert_close(g_stem[0], conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_stem[1], video.grad, rtol=1e-4, atol=1e-4)


def test_temporal_ffn_as_matrix_products_equals_the_3d_convolutions():
    from dist_video.dist import IntegrationBlock

    torch.manual_seed(0)
    block = IntegrationBlock(64, 1.0, 0.25, kernel=3, sparse_frames=5).double()
    m = torch.randn(2 * 5, 7, 64, dtype=torch.float64, requires_grad=True)
    y = block.ln_temporal(m)
    ours = block.temporal_mix(y)
    # the authors' layout: B x C x T' x (N+1) x 1 through the Conv3d modules themselves
    conv_in = y.view(2, 5, 7, 64).permute(0, 3, 1, 2).unsqueeze(-1)
    theirs = block.temporal_ffn(conv_in).squeeze(-1).permute(0, 2, 3, 1).reshape(10, 7, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(ours.square().sum(), [m, block.temporal_ffn.c_fc2.weight], retain_graph=True)
    g_theirs = torch.autograd.grad(theirs.square().sum(), [m, block.temporal_ffn.c_fc2.weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_quick_gelu_gradient_and_short_query_attention():
    from dist_video.clip import MultiheadAttention, QuickGELU

    x = torch.randn(300, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(QuickGELU()(x).sum(), x)
    (expected,) = torch.autograd.grad((x * torch.sigmoid(1.702 * x)).sum(), x)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)

    torch.manual_seed(0)
    attn = MultiheadAttention(128, 2)
    q, kv = torch.randn(3, 2, 128), torch.randn(3, 9, 128)  # 2 queries: the explicit product path
    out = attn(q, kv=kv)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    heads = lambda t: t.view(3, -1, 2, 64).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(
        heads(q @ w[:128].t() + b[:128]), heads(kv @ w[128:256].t() + b[128:256]),
        heads(kv @ w[256:].t() + b[256:]))
    ref = attn.out_proj(ref.transpose(1, 2).reshape(3, 2, 128))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_temporal_block_backward_equals_autograd_of_the_plain_expression(channels_last):
    """The temporal block's own backward (three saved activations, the convolution inputs
    recomputed) gives the gradients of the written-out block, for the input and every
    parameter."""
    from dist_video.dist import TemporalBlock

    torch.manual_seed(6)
    block = TemporalBlock(8, 3, 1.5).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 6, 3, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()

    def plain(x):
        quick_gelu = lambda v: v * torch.sigmoid(1.702 * v)  # noqa: E731
        y = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 4, 1), (8,), block.ln.weight, block.ln.bias,
                                           block.ln.eps).permute(0, 4, 1, 2, 3)
        h = quick_gelu(block.temporal_net.c_fc1(y))
        return quick_gelu(x + block.temporal_net.c_fc2(h))

    ours, expected = block(x), plain(x)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    inputs = [x, *block.parameters()]
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    small = x[:1, :, :3].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(block, (small,))


def test_activation_checkpointing_modes_store_less(tiny_clip):
    """Bytes that autograd keeps for backward (outside the recomputed regions): each mode
    keeps less than the one before it."""
    clip = tiny_clip(width=64, layers=3)
    torch.manual_seed(0)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    video = torch.randn(2, 3, 4, 64, 64)
    layers = model.clip_layers(video)

    def stored_bytes(mode):
        model.set_grad_checkpointing(mode)
        seen: dict[int, int] = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.branch(video, layers).sum().backward()
        return sum(seen.values())

    off, selective, full = stored_bytes("off"), stored_bytes("selective"), stored_bytes("full")
    assert off > 1.5 * selective and selective > full > 0, (off, selective, full)


@pytest.mark.parametrize("alpha", [1, 2, 4])
@pytest.mark.parametrize("channels_last", [True, False])
def test_temporal_to_integration_matrix_product_equals_the_3d_convolution(alpha, channels_last):
    from dist_video.dist import TemporalToIntegration

    torch.manual_seed(4)
    t2i = TemporalToIntegration(6, 10, alpha, sparse_frames=8 // alpha).double()
    torch.nn.init.normal_(t2i.linear_fuse.bias)
    x_t = torch.randn(2, 8, 3, 5, 6, dtype=torch.float64).permute(0, 4, 1, 2, 3)  # B x C_t x T x g x g
    if not channels_last:
        x_t = x_t.contiguous()
    x_t.requires_grad_()
    m = torch.randn(2 * 8 // alpha, 1 + 3 * 5, 10, dtype=torch.float64)
    ours = t2i(m, x_t)
    conv = torch.nn.functional.conv3d(x_t, t2i.linear_fuse.weight, t2i.linear_fuse.bias, stride=(alpha, 1, 1))
    tokens = conv.flatten(3).permute(0, 2, 3, 1)  # B x T' x N x C_i
    cls = t2i.cls_token[0].unsqueeze(2).expand(2, -1, 1, -1)  # B x T' x 1 x C_i
    theirs = m + torch.cat([cls, tokens], dim=2).flatten(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.square().sum(), [x_t, t2i.linear_fuse.weight])
    g_theirs = torch.autograd.grad(theirs.square().sum(), [x_t, t2i.linear_fuse.weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_mlp_equals_the_plain_expression(act, bias, residual):
    """QuickGELU as a SiLU between scaled products (and the residual as the product's
    accumulator): the values and gradients of ``residual + c_proj(act(c_fc(x)))``."""
    from dist_video.clip import MLP

    torch.manual_seed(1)
    mlp = MLP(16, 40, act, out_width=12).double()
    if not bias:
        mlp.c_fc.bias, mlp.c_proj.bias = None, None
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gelu = (lambda z: z * torch.sigmoid(1.702 * z)) if act == "quick_gelu" else F.gelu
    expected = mlp.c_proj(gelu(mlp.c_fc(x))) + (r if residual else 0)
    out = mlp(x, residual=r if residual else None)
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs = [x, *mlp.parameters()] + ([r] if residual else [])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformer_block_equals_the_plain_expression(act):
    from dist_video.clip import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(128, 2, act=act).double()
    for p in block.parameters():  # non-zero biases and LayerNorm affines, so all terms count
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 7, 128, dtype=torch.float64, requires_grad=True)
    x0 = x.detach().clone()
    ours = block(x)
    torch.testing.assert_close(x.detach(), x0)  # the input is not overwritten
    expected = x + block.attn(block.ln_1(x))
    expected = expected + block.mlp.c_proj(block.mlp.gelu(block.mlp.c_fc(block.ln_2(expected))))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    inputs = [x, *block.parameters()]
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_transformer_block_under_bf16_autocast():
    """Full fine-tuning: float32 CLIP weights under bf16 autocast, with and without autograd
    (the residual accumulation must not mix dtypes in place)."""
    from dist_video.clip import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(128, 2)
    x = torch.randn(3, 7, 128)
    expected = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = block(x.clone().requires_grad_())
        with torch.no_grad():
            evaluated = block(x)
    for out in (trained, evaluated):
        torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_branch_has_one_forward_whatever_the_grad_mode(variant_model):
    """The same values with and without autograd (the training form has no inference branch)."""
    model, video = variant_model("subset-alpha4-3pool")
    layers = model.clip_layers(video)
    with_grad = model.branch(video, layers)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = model.branch(video, layers)
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
