"""The inference form (``model.fuse()``) computes what the training form computes in eval mode
without autograd, is an ordinary module (no parameters, no hidden state, picklable), and can be
traced and exported."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import dist_video
from dist_video import AdapterClassifier, BaselineConfig, FrozenMeanClassifier, FullFinetuneClassifier
from dist_video.fused import FusedDiSTModel, onednn_fusion_available


def expected_outputs(model, video):
    """The training form's embeddings and (with a head) logits in eval mode without autograd."""
    with torch.no_grad():
        model.eval()
        return model.encode_video(video), (model(video) if model.head_type else None)


def test_fused_equals_the_training_form_in_float64(variant_model, variant_name):
    """Every fold (LayerNorm affines, merged biases, pooling without keys/values, QuickGELU
    factors, the stem as one product) keeps the function: float64 within 1e-10, on every
    variant's shapes (alpha 1/2/4, layer subsets, 1-3 pooling layers), both head types."""
    model, video = variant_model(variant_name)
    model.set_linear_head(5).head.double()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.bias)
    z, logits = expected_outputs(model, video)
    fused = dist_video.fuse(model)
    assert isinstance(fused, FusedDiSTModel) and fused.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_video(video), z, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused(video), logits, rtol=1e-10, atol=1e-12)

    text = torch.randn(4, model.clip.embed_dim, dtype=torch.float64)
    model.set_class_embeddings(text, ["a", "b", "c", "d"])
    _, logits = expected_outputs(model, video)
    fused = model.fuse()
    assert fused.class_names == ["a", "b", "c", "d"] and fused.num_classes == 4
    with torch.no_grad():
        torch.testing.assert_close(fused(video), logits, rtol=1e-10, atol=1e-10)


def test_checkpointing_mode_does_not_change_the_fused_model(variant_model):
    model, video = variant_model("alpha1-single-layer")
    reference = model.fuse()
    model.set_grad_checkpointing("full")
    with torch.no_grad():
        torch.testing.assert_close(model.fuse().encode_video(video), reference.encode_video(video), rtol=0, atol=0)


def test_fused_reproduces_the_authors_outputs(official_model, reference):
    official_model.set_class_embeddings(official_model.encode_text(reference["text_tokens"]))
    fused = official_model.fuse()
    assert fused.dtype == torch.float32  # the model's CLIP dtype
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_video(reference["video"]), reference["video_embeddings"],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(fused(reference["video"]), reference["logits"], atol=1e-3, rtol=0)


def test_fused_bf16_within_bf16_tolerance_of_the_training_form(official_model, reference):
    """The default dtype is the frozen CLIP's: bf16 where the device supports it. Against the
    bf16 model run as evaluation used to run it (bf16 CLIP, branch under bf16 autocast)."""
    model = dist_video.load_official_checkpoint(
        official_model_path(), clip_dtype="bf16").eval()
    model.set_class_embeddings(reference["text_embeddings"])
    fused = model.fuse()
    assert fused.dtype == torch.bfloat16
    assert all(b.dtype == torch.bfloat16 for name, b in fused.named_buffers() if not name.startswith("head."))
    video = reference["video"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.encode_video(video).float()
    with torch.no_grad():
        z = fused.encode_video(video)
        logits = fused(video)
    assert z.dtype == torch.float32
    assert (z - expected).abs().max().item() < 0.05
    assert (z - reference["video_embeddings"]).abs().max().item() < 0.05
    assert (logits - reference["logits"]).abs().max().item() < 1.0
    assert torch.equal(logits.argmax(1), reference["logits"].argmax(1))


def official_model_path():
    from pathlib import Path

    return Path(__file__).parent / "assets" / "official-tiny" / "official_checkpoint.pyth"


@pytest.mark.parametrize("onednn", [True, False])
def test_fused_float32_with_and_without_onednn(variant_model, onednn):
    """Float32 takes oneDNN's fused convolution + SiLU / + add on CPUs that run them."""
    model, video = variant_model("subset-alpha4-3pool", dtype=torch.float32)
    z, _ = expected_outputs(model, video)
    fused = model.fuse(onednn=onednn)
    used = {layer.temporal_block.onednn for layer in fused.branch.layers}
    assert used == {onednn and onednn_fusion_available("cpu", torch.float32)}
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_video(video), z, rtol=1e-4, atol=1e-5)


def test_fusing_falls_back_to_plain_convolutions_when_onednn_refuses(monkeypatch, variant_model):
    model, video = variant_model("alpha1-single-layer", dtype=torch.float32)

    def refuse(*args, **kwargs):
        raise RuntimeError("not supported here")

    refuse.binary = refuse

    class RefusingOps:
        _convolution_pointwise = refuse

    monkeypatch.setattr(torch.ops, "mkldnn", RefusingOps(), raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert not onednn_fusion_available("cpu", torch.float32)
    fused = model.fuse()
    assert not any(layer.temporal_block.onednn for layer in fused.branch.layers)
    z, _ = expected_outputs(model, video)
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_video(video), z, rtol=1e-4, atol=1e-5)


def test_fused_model_is_an_ordinary_module(variant_model):
    model, video = variant_model("alpha1-single-layer")
    model.set_linear_head(3, ["x", "y", "z"]).head.double()
    fused = model.fuse()
    assert list(fused.parameters()) == []
    assert all(not b.requires_grad for b in fused.buffers())
    with torch.enable_grad():  # no dependence on grad mode, and no graph
        out = fused(video)
    assert out.grad_fn is None
    # picklable, copyable, and its state dict is the whole of it
    restored = pickle.loads(pickle.dumps(fused))
    copied = copy.deepcopy(fused)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    copied.load_state_dict(torch.load(buffer))
    for other in (restored, copied):
        torch.testing.assert_close(other(video), out, rtol=0, atol=0)
    assert restored.class_names == ["x", "y", "z"]


def test_fused_model_does_not_follow_later_changes_of_the_model(variant_model):
    model, video = variant_model("alpha1-single-layer")
    fused = model.fuse()
    before = fused.encode_video(video)
    with torch.no_grad():
        model.branch.proj.mul_(2.0)
    torch.testing.assert_close(fused.encode_video(video), before, rtol=0, atol=0)
    assert not torch.allclose(model.fuse().encode_video(video), before)


def test_fused_model_computes_in_its_own_dtype_under_autocast(variant_model):
    model, video = variant_model("subset-alpha4-3pool", dtype=torch.float32)
    model.set_linear_head(3)
    fused = model.fuse()
    plain, logits = fused.encode_video(video), fused(video)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused.encode_video(video), plain, rtol=0, atol=0)
        assert fused(video).dtype == torch.float32
        torch.testing.assert_close(fused(video), logits, rtol=0, atol=0)


def test_fused_model_traces_and_exports_with_a_dynamic_batch(official_model, reference):
    official_model.set_class_embeddings(reference["text_embeddings"])
    fused = official_model.fuse()  # oneDNN's calls are eager-only: a trace records the portable kernels
    video = reference["video"]
    more = torch.cat([video, video.flip(0), video])
    expected, expected_more = fused(video), fused(more)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fused, (video,), check_trace=False)
    exported = torch.export.export(fused, (video,),
                                   dynamic_shapes={"video": {0: torch.export.Dim("batch", min=1, max=64)}})
    for run in (traced, exported.module()):
        torch.testing.assert_close(run(video), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(more), expected_more, rtol=1e-5, atol=1e-5)
    assert not any(n.target == torch.ops.mkldnn._convolution_pointwise.default
                   for n in exported.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("method", ["frozen-mean", "full-finetune", "adapter"])
def test_fused_baselines_equal_their_training_form(method, tiny_clip):
    classes = {"frozen-mean": FrozenMeanClassifier, "full-finetune": FullFinetuneClassifier,
               "adapter": AdapterClassifier}
    clip = tiny_clip(width=64, layers=2).double()
    torch.manual_seed(0)
    model = classes[method](clip, BaselineConfig(num_frames=8, alpha=2, adapter_dim=16),
                            clip_dtype=torch.float64).double()
    for adapter in getattr(model, "adapters", []):  # the adapters start at zero: make them count
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    model.set_linear_head(4).head.double()
    video = torch.randn(2, 3, 8, 64, 64, dtype=torch.float64)
    z, logits = expected_outputs(model, video)
    fused = model.fuse()
    assert list(fused.parameters()) == []
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_video(video), z, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused(video), logits, rtol=1e-10, atol=1e-12)


def test_fused_head_can_take_new_class_embeddings(official_model, reference):
    fused = official_model.fuse()
    with pytest.raises(RuntimeError, match="no classifier head"):
        fused(reference["video"])
    text = official_model.encode_text(reference["text_tokens"])
    fused.set_class_embeddings(text, float(official_model.clip.logit_scale), [f"c{i}" for i in range(5)])
    with torch.no_grad():
        torch.testing.assert_close(fused(reference["video"]), official_model.logits(reference["video"], text),
                                   rtol=1e-4, atol=1e-3)
    assert fused.class_names == [f"c{i}" for i in range(5)]
