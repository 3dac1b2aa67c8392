"""Faithfulness: the DiST model reproduces the authors' code (official-tiny) and an
independent oracle on other sizes; their checkpoints and our saved folders load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dist_video
from dist_video import DiSTConfig, DiSTVideoModel, load_official_checkpoint
from dist_video.checkpoints import branch_to_official_state_dict, read_official_state_dict
from dist_video.clip_loaders import clip_from_openai_state_dict
from dist_video.reference import dist_forward

ASSETS = Path(__file__).parent / "assets" / "official-tiny"


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


def test_other_sizes_match_oracle_and_reload_from_official_layout(variant_name, variants, tiny_clip, tmp_path):
    spec = variants[variant_name]
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


def test_branch_layer_count_mismatch_is_explained(tiny_clip, tmp_path):
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


def test_stem_patch_follows_clip_patch(tiny_clip):
    """ViT-L/14-style CLIP: the stem takes CLIP's 14-pixel patch so the grids line up."""
    clip = tiny_clip(width=64, layers=2, patch=14, image=56)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=1), clip_dtype="fp32")
    assert model.branch.temporal_stem.kernel_size[1:] == (14, 14)
    out = model.encode_video(torch.randn(1, 3, 4, 56, 56))
    assert out.shape == (1, 64)


def test_clip_stops_after_last_selected_layer(tiny_clip):
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
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["temporal_dim"] = 48
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors: weights do not match"):
        DiSTVideoModel.from_pretrained(out)


def test_model_folders_of_format_version_1_load_with_the_same_outputs(tmp_path):
    """A folder written by the first release (the branch under the authors' per-layer lists)
    loads into the current layout (``layers.<i>``) and computes what that release computed; saving
    it again writes the current format."""
    folder = Path(__file__).parent / "assets" / "model-folder-v1"
    assert json.loads((folder / "config.json").read_text())["format_version"] == 1
    expected = torch.load(folder / "expected_outputs.pt")
    model = DiSTVideoModel.from_pretrained(folder, clip_dtype="fp32").eval()
    assert model.class_names == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(expected["video"]), expected["embeddings"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(expected["video"]), expected["logits"], atol=1e-5, rtol=0)
    again = model.save_pretrained(tmp_path / "v2")
    assert json.loads((again / "config.json").read_text())["format_version"] == dist_video.classifier.FORMAT_VERSION
    reloaded = DiSTVideoModel.from_pretrained(again, clip_dtype="fp32").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(expected["video"]), expected["logits"], atol=1e-6, rtol=0)
