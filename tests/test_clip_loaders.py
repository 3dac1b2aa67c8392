"""load_clip against checkpoints written by the libraries that own each format.

The fixtures and the owning libraries' outputs come from ``scripts/make_clip_format_fixtures.py``
(run once elsewhere, see its docstring); nothing here needs open_clip or transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dist_video
from dist_video import tokenizer as tk
from dist_video.clip import CLIP, CLIPConfig
from dist_video.clip_loaders import load_clip
from dist_video.storage import UntrustedCheckpointError

ASSETS = Path(__file__).parent / "assets"
FORMATS = ASSETS / "clip_formats"
MANIFEST = json.loads((FORMATS / "manifest.json").read_text())
FIXTURES = MANIFEST["fixtures"]
UNSUPPORTED = json.loads((FORMATS / "unsupported_keys.json").read_text())
VOCAB = ASSETS / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
SMALL_GZ = ASSETS / "tokenizer" / "small" / "bpe_small_2000.txt.gz"
TINY = ASSETS / "official-tiny"
TOL = 1e-4


@pytest.fixture(autouse=True)
def no_installed_vocab(monkeypatch):
    """Tests must not depend on whether open_clip/clip happen to be installed here."""
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package",))


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FORMATS / FIXTURES[name]["expected"]))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_outputs(clip: CLIP, exp: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        assert max_err(clip.encode_image(exp["images"]), exp["image_embeddings"]) < TOL
        if "tokens" in exp:
            assert max_err(clip.encode_text(exp["tokens"]), exp["text_embeddings"]) < TOL


# ----------------------------------------------------------------------------- every fixture
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_matches_owning_library(name):
    fx = FIXTURES[name]
    clip = load_clip(FORMATS / fx["path"], **fx["load_kwargs"])
    assert isinstance(clip, CLIP) and not clip.training
    assert all(p.dtype == torch.float32 for p in clip.parameters())
    exp = expected(name)
    check_outputs(clip, exp)
    # the architecture inferred from shapes / configs is the one the library built
    got = clip.config.to_dict()
    for key, want in fx["config"].items():
        assert got[key] == pytest.approx(want), (name, key)
    if "tokens" not in exp:
        assert not clip.has_text and clip.tokenizer is None
        with pytest.raises(RuntimeError, match="no text tower"):
            clip.encode_text(torch.zeros(1, 77, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(n for n, f in FIXTURES.items() if "prompts" in f))
def test_folder_tokenizer_gives_the_library_tokens(name):
    """Hugging Face / open_clip hub folders carry their tokenizer: load_clip attaches it, and
    prompts go through it to the same embeddings as the library's own tokenizer + model."""
    fx = FIXTURES[name]
    clip = load_clip(FORMATS / fx["path"])
    assert clip.tokenizer is not None and clip.tokenizer.vocab_size == clip.config.vocab_size
    exp = expected(name)
    tokens = clip.tokenizer(fx["prompts"])
    assert torch.equal(tokens, exp["prompt_tokens"])
    with torch.no_grad():
        assert max_err(clip.encode_text(tokens), exp["prompt_embeddings"]) < TOL


def test_official_tiny_reproduces_reference_outputs():
    ref = torch.load(TINY / "reference_io.pt", weights_only=True)
    clip = load_clip(TINY / "clip_openai_state_dict.pt")
    video = ref["video"][:, :, ::2]
    b, c, t, h, w = video.shape
    with torch.no_grad():
        frames = clip.encode_image(video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)).reshape(b, t, -1)
        text = clip.encode_text(ref["text_tokens"])
    assert max_err(frames, ref["frame_embeddings"]) < TOL
    assert max_err(text, ref["text_embeddings"]) < TOL
    assert clip.config.act == "quick_gelu" and clip.tokenizer is None  # no vocabulary anywhere


def test_exported():
    assert dist_video.load_clip is load_clip and "load_clip" in dist_video.__all__
    assert "tokenize" in dist_video.__all__


# ----------------------------------------------------------------------------- paths and files
def test_hugging_face_paths_inside_the_folder():
    folder = FORMATS / "hf_clip_sharded"
    exp = expected("hf_clip_sharded")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    for p in (folder, folder / "config.json", folder / "model.safetensors.index.json", shards[0]):
        check_outputs(load_clip(p), exp)
    check_outputs(load_clip(FORMATS / "hf_clip_bin" / "pytorch_model.bin"), expected("hf_clip_bin"))
    check_outputs(load_clip(FORMATS / "hf_clip_safetensors" / "model.safetensors"), expected("hf_clip_safetensors"))


def test_open_clip_hub_file_and_config():
    hub = FORMATS / "open_clip_hub"
    exp = expected("open_clip_hub")
    for p in (hub, hub / "open_clip_model.safetensors", hub / "open_clip_config.json"):
        clip = load_clip(p)
        assert clip.config.act == "gelu"  # open_clip_config.json has no quick_gelu
        check_outputs(clip, exp)


def test_activation_defaults_and_override(tmp_path):
    # open_clip state dicts carry no activation: QuickGELU unless act says otherwise
    path = FORMATS / FIXTURES["open_clip_gelu_pt"]["path"]
    exp = expected("open_clip_gelu_pt")
    quick = load_clip(path)
    assert quick.config.act == "quick_gelu"
    with torch.no_grad():
        assert max_err(quick.encode_image(exp["images"]), exp["image_embeddings"]) > 1e-3
    # an explicit act overrides Hugging Face's hidden_act
    hf = load_clip(FORMATS / "hf_clip_safetensors", act="quick_gelu")
    assert hf.config.act == "quick_gelu" and hf.config.layer_norm_eps == 1e-6
    with pytest.raises(ValueError, match="the act argument: unknown activation 'swish'"):
        load_clip(path, act="swish")


def test_own_safetensors_metadata_is_honoured(tmp_path):
    ref = load_clip(FORMATS / FIXTURES["open_clip_gelu_pt"]["path"], act="gelu")
    exp = expected("open_clip_gelu_pt")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "act.safetensors"), metadata={"act": "gelu"})
    clip = load_clip(tmp_path / "act.safetensors")
    assert clip.config.act == "gelu"
    check_outputs(clip, exp)
    save_file(sd, str(tmp_path / "cfg.safetensors"), metadata={"clip_config": json.dumps(ref.config.to_dict())})
    assert load_clip(tmp_path / "cfg.safetensors").config == ref.config
    assert load_clip(tmp_path / "cfg.safetensors", act="quick_gelu").config.act == "quick_gelu"
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"act": "tanh"})
    with pytest.raises(ValueError, match="bad.safetensors \\(metadata\\): unknown activation"):
        load_clip(tmp_path / "bad.safetensors")


def test_openai_state_dict_variants(tmp_path):
    """OpenAI-layout state dicts: plain, with OpenAI's extra entries, the legacy (non-zip)
    torch.save format, behind a wrapper prefix, inside a checkpoint dict, fp16."""
    sd = torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True)
    ref = load_clip(TINY / "clip_openai_state_dict.pt")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.encode_image(images)
    variants = {
        "extra.pt": {**sd, "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
                     "vocab_size": torch.tensor(512)},
        "compiled.pt": {"_orig_mod." + k: v for k, v in sd.items()},
        "ckpt.pth": {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 7, "lr": 0.1},
        "half.pt": {k: v.half() for k, v in sd.items()},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in [*variants, "legacy.pt"]:
        clip = load_clip(tmp_path / name)
        with torch.no_grad():
            tol = 5e-3 if name == "half.pt" else 1e-6
            assert max_err(clip.encode_image(images), want) < tol, name


def test_python_objects_in_checkpoint_are_refused_unless_trusted(tmp_path):
    sd = torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"train.pt: .*argparse.Namespace.*--trust-checkpoint"):
        load_clip(tmp_path / "train.pt")
    with pytest.warns(UserWarning, match="train.pt: loaded with weights_only=False"):
        clip = load_clip(tmp_path / "train.pt", trust_checkpoint=True)
    assert clip.config.vision_width == 128


# ----------------------------------------------------------------------------- architecture inference
def random_clip(seed: int, **cfg) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(CLIPConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms and biases
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cfg", [
    dict(embed_dim=80, image_size=42, patch_size=14, vision_width=192, vision_layers=3, vision_heads=3,
         vision_mlp_ratio=3.5, context_length=20, vocab_size=333, text_width=128, text_heads=2, text_layers=3,
         text_mlp_ratio=1.5),
    dict(embed_dim=64, image_size=30, patch_size=6, vision_width=64, vision_layers=1, vision_heads=1,
         text_layers=0),
    dict(embed_dim=128, image_size=32, patch_size=16, vision_width=128, vision_layers=2, vision_heads=2,
         text_layers=0, vision_proj=False),
], ids=["odd-sizes", "image-only", "image-only-no-proj"])
def test_architecture_inferred_from_shapes(tmp_path, cfg):
    model = random_clip(3, **cfg)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    clip = load_clip(tmp_path / "m.pt")
    assert clip.config == model.config
    images = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        assert torch.equal(clip.encode_image(images), model.encode_image(images))
        if model.has_text:
            tokens = torch.randint(1, cfg["vocab_size"] - 1, (3, cfg["context_length"]))
            tokens[:, -1] = cfg["vocab_size"] - 1
            assert torch.equal(clip.encode_text(tokens), model.encode_text(tokens))


def test_heads_not_divisible_is_an_error(tmp_path):
    model = random_clip(0, embed_dim=32, image_size=32, patch_size=16, vision_width=96, vision_layers=1,
                        vision_heads=1, text_layers=0)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "w96.pt")  # 96 // 64 = 1 head: fine
    assert load_clip(tmp_path / "w96.pt").config.vision_heads == 1
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "h5.safetensors"),
              metadata={"vision_heads": "5"})
    with pytest.raises(ValueError, match="h5.safetensors: vision width 96 is not divisible by 5 heads"):
        load_clip(tmp_path / "h5.safetensors")


# ----------------------------------------------------------------------------- errors name the file
def test_missing_path():
    with pytest.raises(FileNotFoundError, match="nothing-here.pt: no such file or folder"):
        load_clip(FORMATS / "nothing-here.pt")


@pytest.mark.parametrize("source", [
    "open_clip_gelu.pt", "open_clip_gelu.safetensors", "openai_jit/ViT-T-16.pt", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_files(tmp_path, source, keep):
    if source == "legacy":
        src = tmp_path / "legacy-src.pt"
        torch.save(torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True), src,
                   _use_new_zipfile_serialization=False)
    else:
        src = FORMATS / source
    data = src.read_bytes()
    cut = tmp_path / ("cut-" + src.name)
    cut.write_bytes(data[:max(9, int(len(data) * keep))])
    with pytest.raises(ValueError) as info:
        load_clip(cut)
    assert str(cut) in str(info.value)


@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty"),
    (b"\x00\x01garbage bytes that are no checkpoint", "unknown format"),
    (b'{"a": 1}', "a JSON file, not weights"),
])
def test_unknown_files(tmp_path, content, message):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_clip(path)
    assert str(path) in str(info.value)


def test_not_a_clip_checkpoint(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "resnet_head.pt")
    with pytest.raises(ValueError, match=r"resnet_head.pt: not a CLIP checkpoint.*\['fc.weight', 'fc.bias'\]"):
        load_clip(tmp_path / "resnet_head.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt: holds a list, not a state dict"):
        load_clip(tmp_path / "list.pt")
    sd = torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True)
    del sd["visual.positional_embedding"]
    torch.save(sd, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match="incomplete.pt: incomplete CLIP weights: no visual.positional_embedding"):
        load_clip(tmp_path / "incomplete.pt")
    sd = torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True)
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"] = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][:100]
    torch.save(sd, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="mismatch.pt"):
        load_clip(tmp_path / "mismatch.pt")


def test_dist_checkpoint_points_to_its_loader():
    with pytest.raises(ValueError, match="official_checkpoint.pyth: a DiST video checkpoint.*load_official_checkpoint"):
        load_clip(TINY / "official_checkpoint.pyth")


@pytest.mark.parametrize("variant", sorted(UNSUPPORTED))
def test_unsupported_open_clip_variants(tmp_path, variant):
    spec = UNSUPPORTED[variant]
    path = tmp_path / f"{variant}.pt"
    torch.save({k: torch.zeros(shape) for k, shape in spec["keys"].items()}, path)
    with pytest.raises(ValueError, match="unsupported") as info:
        load_clip(path)
    msg = str(info.value)
    assert str(path) in msg and spec["error_mentions"].lower() in msg.lower()


def test_hugging_face_text_tower_in_open_clip_is_unsupported(tmp_path):
    sd = torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True)
    sd = {k: v for k, v in sd.items() if k.startswith("visual.") or k == "logit_scale"}
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.zeros(10, 8)
    sd["text.transformer.encoder.layer.0.attention.self.query.weight"] = torch.zeros(8, 8)
    sd["text.proj.0.weight"] = torch.zeros(8, 8)
    torch.save(sd, tmp_path / "hf_text.pt")
    with pytest.raises(ValueError, match="hf_text.pt: unsupported CLIP variant: a Hugging Face text tower"):
        load_clip(tmp_path / "hf_text.pt")


def test_open_clip_config_variants_are_refused(tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(FORMATS / "open_clip_hub", hub)
    cfg = json.loads((hub / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["pool_type"] = "last"
    (hub / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError,
                       match="open_clip_model.safetensors: unsupported open_clip variant.*pool_type='last'"):
        load_clip(hub)
    (hub / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has open_clip_config.json but no weights"):
        load_clip(hub)


def test_hugging_face_folder_errors(tmp_path):
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="config.json: Hugging Face model_type 'siglip' is not supported"):
        load_clip(folder)
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copyfile(FORMATS / "hf_clip_bin" / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="noweights: a Hugging Face CLIP config.json but no weights"):
        load_clip(empty)
    sharded = tmp_path / "sharded"
    shutil.copytree(FORMATS / "hf_clip_sharded", sharded)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json: shards missing.*model-00002"):
        load_clip(sharded)
    extra = tmp_path / "extra"
    shutil.copytree(FORMATS / "hf_vision_proj", extra)
    sd = load_file(str(extra / "model.safetensors"))
    sd["vision_model.head.weight"] = torch.zeros(4, 4)
    save_file(sd, str(extra / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors: Hugging Face weights that a CLIPModel.*head.weight"):
        load_clip(extra)
    act = tmp_path / "act"
    shutil.copytree(FORMATS / "hf_vision_noproj", act)
    cfg = json.loads((act / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (act / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        load_clip(act)
    assert load_clip(act, act="gelu").config.act == "gelu"  # the caller's choice is allowed


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP weights in this folder"):
        load_clip(tmp_path)
    for name in ("a.pt", "b.safetensors"):
        shutil.copyfile(FORMATS / "open_clip_gelu.pt", tmp_path / name)
    with pytest.raises(ValueError, match="several weight files.*pass the one to load"):
        load_clip(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    assert load_clip(tmp_path, act="gelu").config.vision_width == 128  # the folder's single file


# ----------------------------------------------------------------------------- tokenizer attachment
def test_tokenizer_beside_checkpoint(tmp_path):
    shutil.copyfile(FORMATS / "open_clip_hub" / "open_clip_model.safetensors", tmp_path / "model.safetensors")
    clip = load_clip(tmp_path / "model.safetensors", act="gelu")
    assert clip.tokenizer is None  # no vocabulary anywhere: loading still works
    with pytest.raises(tk.VocabNotFoundError, match="Looked at"):
        tk.tokenize("a dog")
    shutil.copyfile(SMALL_GZ, tmp_path / tk.OPENAI_VOCAB_NAME)
    clip = load_clip(tmp_path / "model.safetensors", act="gelu")
    assert clip.tokenizer.vocab_path == tmp_path / tk.OPENAI_VOCAB_NAME
    assert clip.tokenizer.context_length == clip.config.context_length
    exp = expected("open_clip_hub")
    tokens = clip.tokenizer(FIXTURES["open_clip_hub"]["prompts"])
    assert torch.equal(tokens, exp["prompt_tokens"])
    # an explicit vocabulary wins
    pair = ASSETS / "tokenizer" / "small" / "hf_pair"
    assert load_clip(tmp_path / "model.safetensors", vocab=pair).tokenizer.vocab_path == pair


def test_tokenizer_from_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_clip_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copyfile(SMALL_GZ, pkg / tk.OPENAI_VOCAB_NAME)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("fake_clip_pkg",))
    clip = load_clip(FORMATS / "open_clip_hub" / "open_clip_model.safetensors", vocab=None)
    # the hub folder's own tokenizer.json comes before an installed package
    assert clip.tokenizer.vocab_path.name == "tokenizer.json"
    shutil.copyfile(FORMATS / "open_clip_hub" / "open_clip_model.safetensors", tmp_path / "m.safetensors")
    assert load_clip(tmp_path / "m.safetensors").tokenizer.vocab_path == pkg / tk.OPENAI_VOCAB_NAME


def test_vocabulary_too_large_for_the_model(tmp_path):
    shutil.copyfile(TINY / "clip_openai_state_dict.pt", tmp_path / "clip.pt")
    shutil.copyfile(VOCAB, tmp_path / tk.OPENAI_VOCAB_NAME)  # 49408 tokens; the model has 512
    with pytest.warns(UserWarning, match="has 49408 tokens but the text tower.*has 512"):
        clip = load_clip(tmp_path / "clip.pt")
    assert clip.tokenizer is None
    with pytest.raises(ValueError, match="has 49408 tokens"):
        load_clip(tmp_path / "clip.pt", vocab=VOCAB)
    with pytest.raises(tk.VocabNotFoundError, match="missing.gz does not exist"):
        load_clip(tmp_path / "clip.pt", vocab=tmp_path / "missing.gz")


def test_image_only_models_have_no_tokenizer(tmp_path):
    shutil.copyfile(FORMATS / "open_clip_image_only.pt", tmp_path / "img.pt")
    shutil.copyfile(VOCAB, tmp_path / tk.OPENAI_VOCAB_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip = load_clip(tmp_path / "img.pt")
    assert clip.tokenizer is None and not clip.has_text
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_tokenizer_survives_deepcopy_and_pickle():
    import copy
    import pickle
    clip = load_clip(FORMATS / "hf_clip_safetensors")
    twin = copy.deepcopy(clip)
    assert twin.tokenizer is clip.tokenizer
    again = pickle.loads(pickle.dumps(clip.tokenizer))
    assert torch.equal(again(["a photo of a dog"]), clip.tokenizer(["a photo of a dog"]))


def test_dist_video_model_folder(tmp_path):
    """A folder written by VideoClassifier.save_pretrained: its clip.safetensors with its exact config."""
    from dist_video import load_official_checkpoint
    model = load_official_checkpoint(TINY / "official_checkpoint.pyth")
    model.save_pretrained(tmp_path / "run")
    for p in (tmp_path / "run", tmp_path / "run" / "clip.safetensors"):
        clip = load_clip(p)
        assert clip.config == model.clip.config
        images = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert max_err(clip.encode_image(images), model.clip.float().encode_image(images)) < 1e-6
