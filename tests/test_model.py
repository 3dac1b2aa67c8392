"""The DiST model reproduces the authors' code (official-tiny) and holds for other sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_video
from dist_video import DiSTConfig, DiSTVideoModel, load_official_checkpoint
from dist_video.checkpoints import branch_to_official_state_dict, read_official_state_dict
from dist_video.clip import CLIP, CLIPConfig
from dist_video.clip_loaders import clip_from_openai_state_dict

from reference_dist import dist_forward

ASSETS = Path(__file__).parent / "assets" / "official-tiny"


@pytest.fixture(scope="module")
def reference():
    return torch.load(ASSETS / "reference_io.pt")


@pytest.fixture(scope="module")
def official_model():
    return load_official_checkpoint(ASSETS / "official_checkpoint.pyth", clip_dtype="fp32").eval()


def assert_reproduces(model, ref):
    with torch.no_grad():
        frames = model.encode_frames(ref["video"])
        video = model.encode_video(ref["video"])
        text = model.encode_text(ref["text_tokens"])
        logits = model.logits(ref["video"], text)
    torch.testing.assert_close(frames, ref["frame_embeddings"], atol=1e-4, rtol=0)
    torch.testing.assert_close(video, ref["video_embeddings"], atol=1e-4, rtol=0)
    torch.testing.assert_close(text, ref["text_embeddings"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-3, rtol=0)


def test_official_checkpoint_reproduces_authors_outputs(official_model, reference):
    cfg = official_model.config
    assert (cfg.num_frames, cfg.alpha, cfg.temporal_dim, cfg.integration_dim) == (16, 2, 32, 128)
    assert (cfg.stem_kernel, cfg.temporal_kernel, cfg.pooling_layers) == (5, 3, 2)
    assert cfg.integration_temporal_mlp_ratio == 0.25
    assert official_model.selected_layers == [0, 1, 2, 3]
    assert_reproduces(official_model, reference)


def test_clip_state_dict_plus_branch_weights_reproduce(reference):
    clip = clip_from_openai_state_dict(torch.load(ASSETS / "clip_openai_state_dict.pt"))
    model = load_official_checkpoint(ASSETS / "official_checkpoint.pyth", clip=clip, clip_dtype="fp32")
    assert model.clip is clip
    assert_reproduces(model.eval(), reference)


def test_oracle_matches_authors_outputs(reference):
    """The test oracle itself is faithful, so it can judge configurations the fixture lacks."""
    w = read_official_state_dict(ASSETS / "official_checkpoint.pyth")
    with torch.no_grad():
        out = dist_forward(reference["video"], w, alpha=2, selected_layers=[0, 1, 2, 3], clip_heads=2)
    torch.testing.assert_close(out, reference["video_embeddings"], atol=1e-4, rtol=0)


def test_ddp_prefix_and_old_ladder_names(tmp_path, official_model, reference):
    state = torch.load(ASSETS / "official_checkpoint.pyth")["model_state"]
    old = {"input_linears": "input_map_feat_nets", "integration2temporal_nets": "s2t_fuse_nets",
           "temporal2integration_nets": "t2s_fuse_nets", "integration_nets": "spatial_nets",
           "adapooling_nets": "final_temporal_nets"}
    renamed = {}
    for key, value in state.items():
        key = key.replace("dist_net.", "ladder_net.")
        for new, legacy in old.items():
            key = key.replace(f"ladder_net.{new}.", f"ladder_net.{legacy}.")
        renamed["module." + key] = value
    assert any("ladder_net.s2t_fuse_nets" in k for k in renamed)
    path = tmp_path / "ddp_ladder.pyth"
    torch.save({"model_state": renamed, "epoch": 3}, path)
    assert_reproduces(load_official_checkpoint(path, clip_dtype="fp32").eval(), reference)


def tiny_clip(width=128, layers=4, heads=None, patch=16, image=64, embed=64, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPConfig(embed_dim=embed, image_size=image, patch_size=patch, vision_width=width,
                     vision_layers=layers, vision_heads=heads or width // 64, text_layers=0)
    clip = CLIP(cfg)
    # Random weights with realistic scales (the default init leaves biases zero).
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
    return clip.eval()


VARIANTS = {
    "subset-alpha4-3pool": dict(clip=dict(), dist=dict(num_frames=16, alpha=4, temporal_dim=24,
                                                       integration_dim=128, pooling_layers=3,
                                                       selected_layers=[1, 3])),
    "wide-3heads-patch8": dict(clip=dict(width=192, layers=3, patch=8, image=32, embed=48),
                               dist=dict(num_frames=8, alpha=2, temporal_dim=16, integration_dim=192,
                                         stem_kernel=3, temporal_kernel=5, temporal_mlp_ratio=2,
                                         integration_mlp_ratio=0.5, integration_temporal_mlp_ratio=0.5,
                                         pooling_layers=1, selected_layers=[0, 2])),
    "alpha1-single-layer": dict(clip=dict(width=64, layers=2), dist=dict(num_frames=4, alpha=1,
                                                                         temporal_dim=8, integration_dim=64,
                                                                         pooling_layers=2,
                                                                         selected_layers=[1])),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_other_sizes_match_oracle_and_reload_from_official_layout(name, tmp_path):
    spec = VARIANTS[name]
    clip = tiny_clip(**spec["clip"])
    torch.manual_seed(1)
    cfg = DiSTConfig(**spec["dist"])
    model = DiSTVideoModel(clip, cfg, clip_dtype="fp32").eval()
    # Perturb LayerNorms/biases so no part of the branch is a no-op at init.
    with torch.no_grad():
        for pname, p in model.branch.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.05)
    image = clip.config.image_size
    video = torch.randn(2, 3, cfg.num_frames, image, image)
    weights = {**clip.state_dict(), **branch_to_official_state_dict(model.branch.state_dict())}
    with torch.no_grad():
        ours = model.encode_video(video)
        oracle = dist_forward(video, weights, alpha=cfg.alpha, selected_layers=cfg.selected_layers,
                              clip_heads=clip.config.vision_heads)
    assert ours.shape == (2, clip.embed_dim)
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=0)

    # The same weights in the authors' file layout (DDP prefix) load back with inferred sizes.
    path = tmp_path / "ckpt.pyth"
    torch.save({"model_state": {f"module.backbone.base_encoder.{k}": v for k, v in weights.items()}}, path)
    loaded = load_official_checkpoint(path, clip_dtype="fp32",
                                      selected_layers=cfg.selected_layers).eval()
    assert loaded.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(video), ours, atol=1e-5, rtol=0)


def test_branch_layer_count_mismatch_is_explained(tmp_path):
    clip = tiny_clip()
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1, selected_layers=[1, 2]), clip_dtype="fp32")
    weights = {**clip.state_dict(), **branch_to_official_state_dict(model.branch.state_dict())}
    path = tmp_path / "two_layers.pyth"
    torch.save({"model_state": weights}, path)
    with pytest.raises(ValueError, match="branch has 2 layers but selected_layers has 4"):
        load_official_checkpoint(path)
    with pytest.raises(ValueError, match="contradicts the checkpoint"):
        load_official_checkpoint(path, selected_layers=[1, 2], alpha=4)
    ok = load_official_checkpoint(path, selected_layers=[0, 3])
    assert ok.selected_layers == [0, 3]


def branch_params(preset, clip_width, patch, embed, layers):
    cfg = DiSTConfig.from_preset(preset)
    from dist_video.dist import DiSTBranch
    branch = DiSTBranch(cfg, clip_width, patch, embed, cfg.resolve_layers(layers))
    return sum(p.numel() for p in branch.parameters())


def test_published_branch_parameter_counts():
    # ViT-B/16: width 768, 12 blocks, embedding 512 (the authors' model: 26,105,184 / 19,001,184).
    assert branch_params("k400-vit-b16-8+16f", 768, 16, 512, 12) == 26_105_184
    assert branch_params("ssv2-vit-b16-8+16f", 768, 16, 512, 12) == 19_001_184


def test_presets_cover_the_published_settings():
    names = {f"{d}-vit-b16-{s}" for d in ("k400", "ssv2") for s in ("8+16f", "16+32f", "32+64f")}
    names |= {"k400-vit-l14-32+64f", "ssv2-vit-l14-32+64f"}
    assert names == set(dist_video.PRESETS)
    cfg = DiSTConfig.from_preset("ssv2-vit-l14-32+64f")
    assert (cfg.num_frames, cfg.alpha, cfg.pooling_layers, cfg.sparse_frames) == (64, 2, 2, 32)
    assert DiSTConfig.from_preset("k400-vit-b16-16+32f").pooling_layers == 4
    with pytest.raises(KeyError, match="did you mean 'k400-vit-b16-8\\+16f'"):
        DiSTConfig.from_preset("k400-vit-b16-8+16")


def test_stem_patch_follows_clip_patch():
    """ViT-L/14-style CLIP: the stem takes CLIP's 14-pixel patch so the grids line up."""
    clip = tiny_clip(width=64, layers=2, patch=14, image=56)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    assert model.branch.temporal_encoder.stem.kernel_size[1:] == (14, 14)
    out = model.encode_video(torch.randn(1, 3, 4, 56, 56))
    assert out.shape == (1, 64)


def test_training_step_leaves_clip_without_gradients():
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
    assert frozen == ["integration2temporal_nets.2.linear_fuse.weight",
                      "integration2temporal_nets.2.linear_fuse.bias"]


def test_clip_stops_after_last_selected_layer():
    clip = tiny_clip(width=64, layers=4)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1, selected_layers=[0, 1]), clip_dtype="fp32")
    calls = []
    for i, block in enumerate(clip.visual.transformer.resblocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    model.clip_layers(torch.randn(1, 3, 4, 64, 64))
    assert calls == [0, 1]


def test_bf16_frozen_clip_close_to_fp32(official_model, reference):
    """The bf16 frozen CLIP (the default on CPUs/GPUs that support it) stays within a stated
    tolerance of fp32: embeddings (scale ~1) within 0.05 absolute, logits (scale 100) within 1."""
    model = load_official_checkpoint(ASSETS / "official_checkpoint.pyth", clip_dtype="bf16").eval()
    assert model.clip_dtype == torch.bfloat16
    assert model.clip.token_embedding.weight.dtype == torch.float32  # text tower stays fp32
    with torch.no_grad():
        video = model.encode_video(reference["video"])
        logits = model.logits(reference["video"], reference["text_embeddings"])
    assert video.dtype == torch.float32
    err = (video - reference["video_embeddings"]).abs().max().item()
    assert err < 0.05, err
    assert (logits - reference["logits"]).abs().max().item() < 1.0
    # and the top class agrees with fp32
    assert torch.equal(logits.argmax(1), reference["logits"].argmax(1))


def test_save_pretrained_round_trip(tmp_path, official_model, reference):
    official_model.set_class_embeddings(reference["text_embeddings"], [f"class {i}" for i in range(5)])
    out = official_model.save_pretrained(tmp_path / "model")
    assert (out / "clip.safetensors").is_file() and (out / "model.safetensors").is_file()
    loaded = DiSTVideoModel.from_pretrained(out, clip_dtype="fp32").eval()
    assert loaded.class_names == [f"class {i}" for i in range(5)]
    assert loaded.selected_layers == [0, 1, 2, 3] and isinstance(loaded, DiSTVideoModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(reference["video"]), reference["logits"], atol=1e-3, rtol=0)


def test_from_pretrained_rejects_mismatched_weights(tmp_path, official_model):
    out = official_model.save_pretrained(tmp_path / "model")
    import json
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["temporal_dim"] = 48
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors: weights do not match"):
        DiSTVideoModel.from_pretrained(out)


def test_quick_gelu_memory_saving_backward_is_exact():
    from dist_video.clip import QuickGELU
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (x,))
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_activation_checkpointing_gives_the_same_gradients():
    clip = tiny_clip(width=64, layers=3)
    torch.manual_seed(0)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    video = torch.randn(2, 3, 4, 64, 64)

    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        model.branch.activation_checkpointing = checkpointing
        model.encode_video(video).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.branch.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert len(plain) > 50
    for mode in (True, "selective", "full"):
        checkpointed = grads(mode)
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    model.branch.activation_checkpointing = "some"
    with pytest.raises(ValueError, match="off, selective, full"):
        model.encode_video(video)


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


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformer_block_without_autograd_equals_the_autograd_path(act):
    from dist_video.clip import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(128, 2, act=act).double()
    for p in block.parameters():  # non-zero biases and LayerNorm affines, so all terms count
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 7, 128, dtype=torch.float64, requires_grad=True)
    with_grad = block(x)  # the module path, with autograd
    mlp_in = block.ln_2(x + block.attn(block.ln_1(x)))
    expected = x + block.attn(block.ln_1(x))
    expected = expected + block.mlp(mlp_in)
    torch.testing.assert_close(with_grad, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        x0 = x.detach().clone()
        fast = block(x0)
        torch.testing.assert_close(x0, x.detach())  # the input is not overwritten
    torch.testing.assert_close(fast, expected.detach(), rtol=1e-10, atol=1e-12)


def test_float32_transformer_block_under_bf16_autocast_without_autograd():
    """Full fine-tuning's evaluation: float32 CLIP weights, bf16 autocast, no autograd (the
    in-place residual accumulation must not mix dtypes: in-place ops are outside autocast)."""
    from dist_video.clip import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(128, 2)
    x = torch.randn(3, 7, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(x.requires_grad_()).float()
        with torch.no_grad():
            fast = block(x.detach()).float()
    torch.testing.assert_close(fast, expected.detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_mlp_without_autograd_equals_the_modules(act, bias, residual):
    from dist_video.clip import make_activation, mlp_without_autograd

    torch.manual_seed(1)
    fc, proj = torch.nn.Linear(16, 40, bias=bias).double(), torch.nn.Linear(40, 12, bias=bias).double()
    x, r = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    expected = proj(make_activation(act)(fc(x))) + (r if residual else 0)
    with torch.no_grad():
        r0 = r.clone()
        out = mlp_without_autograd(x, fc.weight, fc.bias, make_activation(act, inplace=True), proj.weight,
                                   proj.bias, residual=r if residual else None)
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r, r0)  # the residual is read, not overwritten


def test_integration_block_without_autograd_equals_the_autograd_path():
    from dist_video.dist import IntegrationBlock

    torch.manual_seed(2)
    block = IntegrationBlock(64, 1.0, 0.25, 3, sparse_frames=4).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m = torch.randn(2 * 4, 5, 64, dtype=torch.float64)
    expected = block(m.requires_grad_())
    with torch.no_grad():
        fast = block(m.detach())
    torch.testing.assert_close(fast, expected.detach(), rtol=1e-10, atol=1e-12)


def test_quick_gelu_in_place_without_autograd():
    from dist_video.clip import QuickGELU

    x = torch.randn(1000, dtype=torch.float64) * 4
    expected = x * torch.sigmoid(1.702 * x)
    with torch.no_grad():
        y = QuickGELU(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()  # overwritten in place
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_branch_without_autograd_equals_the_autograd_path(name):
    """The inference shortcuts (in-place token updates, broadcast upsampling, fused MLPs) give
    the branch's autograd-path values, in float64, on every variant's shapes."""
    v = VARIANTS[name]
    clip = tiny_clip(**v["clip"]).double()
    torch.manual_seed(3)
    model = DiSTVideoModel(clip, DiSTConfig(**v["dist"]), clip_dtype=torch.float64).double()
    for n, p in model.branch.named_parameters():  # non-zero everywhere, so every path counts
        torch.nn.init.normal_(p, mean=1.0 if n.endswith("ln.weight") else 0.0, std=0.05)
    size = clip.visual.image_size
    video = torch.randn(2, 3, model.config.num_frames, size, size, dtype=torch.float64)
    layers = model.clip_layers(video)
    with_grad = model.branch(video, layers)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = model.branch(video, layers)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-10, atol=1e-12)


def test_cross_attention_from_normalized_tokens_equals_the_module_path():
    """Keys and values never formed (queries folded into the key projection, the value
    projection after the weighted sum): same values as projecting every token, for several
    queries and heads, with non-trivial LayerNorm affines."""
    import torch.nn.functional as F
    from dist_video.dist import CrossAttention

    torch.manual_seed(4)
    attn = CrossAttention(128, 2).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, mean=0.0, std=0.2)
    query, kv = torch.randn(3, 4, 128, dtype=torch.float64), torch.randn(3, 9, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = attn(query, kv)
        normalized = F.layer_norm(kv, (128,), None, None, attn.ln_1.eps)
        fast = attn.forward_normalized(query, normalized)
    torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-12)


def test_cached_inference_weights_reuses_derived_weights_inside_the_context_only():
    from dist_video import dist as dist_module

    v = VARIANTS[next(iter(VARIANTS))]
    clip = tiny_clip(**v["clip"]).double()
    torch.manual_seed(5)
    model = DiSTVideoModel(clip, DiSTConfig(**v["dist"]), clip_dtype=torch.float64).double().eval()
    for n, p in model.branch.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if n.endswith("ln.weight") else 0.0, std=0.05)
    size = clip.visual.image_size
    video = torch.randn(2, 3, model.config.num_frames, size, size, dtype=torch.float64)
    with torch.no_grad():
        plain = model.encode_video(video)
        with dist_module.cached_inference_weights():
            first = model.encode_video(video)
            assert dist_module._inference_cache  # derived weights were stored
            bias = model.branch.input_linears[0].bias
            bias += 1.0  # inside the context parameters are taken as fixed: the cached weights are used
            second = model.encode_video(video)
            with torch.enable_grad():  # autograd never uses (or fills) the cache
                size_before = len(dist_module._inference_cache)
                graded = model.encode_video(video)
                assert graded.requires_grad
                assert len(dist_module._inference_cache) == size_before
        assert dist_module._inference_cache is None
        after = model.encode_video(video)
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(second, plain, rtol=0, atol=0)
    assert not torch.allclose(graded, plain) and not torch.allclose(after, plain)
    torch.testing.assert_close(after, graded.detach(), rtol=1e-10, atol=1e-12)


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


def test_fused_convolutions_equal_the_plain_ones():
    """The oneDNN conv+SiLU and conv+add calls used without autograd on CPUs (float32 here)."""
    import torch.nn.functional as F
    from dist_video.dist import _conv_add, _conv_silu, _fused_conv_available

    torch.manual_seed(7)
    x = torch.randn(2, 8, 6, 5, 4).contiguous(memory_format=torch.channels_last_3d)
    other = torch.randn(2, 8, 6, 5, 4).contiguous(memory_format=torch.channels_last_3d)
    w1, w2, b = torch.randn(8, 8, 3, 1, 1) * 0.2, torch.randn(8, 8, 1, 3, 3) * 0.2, torch.randn(8)
    if not _fused_conv_available(x):
        pytest.skip("no oneDNN on this build")
    with torch.no_grad():
        torch.testing.assert_close(_conv_silu(x, w1, b, (1, 0, 0)), F.silu(F.conv3d(x, w1, b, padding=(1, 0, 0))),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_conv_add(x, other, w2, b, (0, 1, 1)), F.conv3d(x, w2, b, padding=(0, 1, 1)) + other,
                                   rtol=1e-5, atol=1e-5)


def test_fused_convolutions_fall_back_when_onednn_refuses(monkeypatch):
    import torch.nn.functional as F
    from dist_video import dist as dist_module

    def refuse(*args, **kwargs):
        raise RuntimeError("not supported here")

    class FakeOps:
        _convolution_pointwise = refuse

    monkeypatch.setattr(dist_module.torch.ops, "mkldnn", FakeOps(), raising=False)
    monkeypatch.setattr(dist_module, "_fused_conv_failed", False)
    monkeypatch.setattr(dist_module.torch.backends.mkldnn, "is_available", lambda: True)
    x, w, b = torch.randn(1, 4, 3, 2, 2), torch.randn(4, 4, 3, 1, 1), torch.randn(4)
    with torch.no_grad():
        out = dist_module._conv_silu(x, w, b, (1, 0, 0))
    torch.testing.assert_close(out, F.silu(F.conv3d(x, w, b, padding=(1, 0, 0))))
    assert dist_module._fused_conv_failed  # remembered: later calls go straight to the plain kernels


def test_branch_without_autograd_in_float32_matches_the_autograd_path():
    """Float32 takes the fused oneDNN convolutions on CPUs (float64 does not)."""
    v = VARIANTS[next(iter(VARIANTS))]
    clip = tiny_clip(**v["clip"])
    torch.manual_seed(8)
    model = DiSTVideoModel(clip, DiSTConfig(**v["dist"]), clip_dtype="fp32")
    for n, p in model.branch.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if n.endswith("ln.weight") else 0.0, std=0.05)
    size = clip.visual.image_size
    video = torch.randn(2, 3, model.config.num_frames, size, size)
    layers = model.clip_layers(video)
    with_grad = model.branch(video, layers)
    with torch.no_grad():
        without = model.branch(video, layers)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_modes_store_less():
    """Bytes that autograd keeps for backward (outside the recomputed regions): each mode
    keeps less than the one before it."""
    clip = tiny_clip(width=64, layers=3)
    torch.manual_seed(0)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    video = torch.randn(2, 3, 4, 64, 64)
    layers = model.clip_layers(video)

    def stored_bytes(mode):
        model.branch.activation_checkpointing = mode
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
    ours = t2i.patch_tokens(x_t)
    conv = torch.nn.functional.conv3d(x_t, t2i.linear_fuse.weight, t2i.linear_fuse.bias, stride=(alpha, 1, 1))
    theirs = conv.flatten(3).permute(0, 2, 3, 1)  # B x T' x N x C_i
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.square().sum(), [x_t, t2i.linear_fuse.weight])
    g_theirs = torch.autograd.grad(theirs.square().sum(), [x_t, t2i.linear_fuse.weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
