"""Write tiny CLIP checkpoints in every format ``dist_video.load_clip`` reads, each written by
the library that owns the format, with that library's own outputs beside it.

Run once, in a separate virtual environment outside the repository (these libraries are not
dependencies of dist-video; the tests only read what this script writes):

    python -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/fixture-venv/bin/pip install open_clip_torch transformers ftfy regex
    /tmp/fixture-venv/bin/pip install --no-deps openai-clip      # OpenAI's own `clip` package
    /tmp/fixture-venv/bin/python scripts/make_tokenizer_fixture.py   # first: the small vocabulary
    /tmp/fixture-venv/bin/python scripts/make_clip_format_fixtures.py

(this run: torch 2.14.1, open_clip_torch 3.3.0, transformers 5.23.0, openai-clip 1.0.1; the
versions are recorded in the manifest). Everything is random-weight and seeded; the outputs
land in ``tests/assets/clip_formats/``:

* ``manifest.json``: one entry per checkpoint: its path, the ``load_clip`` keyword arguments the
  test uses, who wrote it and how, the sizes the owning library built it with, and its
  reference file.
* ``expected/<name>.safetensors``: ``images`` (N x 3 x S x S), the owning library's
  ``image_embeddings``; for models with text, ``tokens`` (fixed ids, end token = the largest id)
  and ``text_embeddings``; for folders with a tokenizer, ``prompt_tokens`` and
  ``prompt_embeddings`` (the library's tokenizer on ``manifest[...]["prompts"]``).
* ``unsupported_keys.json``: the state-dict key names and shapes of open_clip variants that
  ``load_clip`` must reject (layer scale, attentional pooler, ResNet, timm trunk, custom
  attention blocks, no ln_pre, text projection bias, text class token, logit bias), so the
  tests can rebuild such state dicts from zeros without storing their weights.

The formats:

* ``openai_jit/ViT-T-16.pt``: OpenAI's ``clip.model.CLIP`` (from the ``openai-clip`` package),
  fp16 weights and the ``input_resolution``/``context_length``/``vocab_size`` entries of OpenAI's
  released archives, traced with ``torch.jit.trace_module`` (forward, encode_image, encode_text)
  and written with ``torch.jit.save``. Reference: ``clip.load(path, jit=False)`` (checked
  against running the TorchScript archive itself in float32).
* ``open_clip_gelu.pt`` / ``open_clip_gelu.safetensors``: ``open_clip.model.CLIP`` (GELU, not
  QuickGELU) state dict, fp16, via ``torch.save`` and ``safetensors.torch.save_file`` (what
  open_clip's ``save_for_hf`` uses). References: ``open_clip.load_checkpoint`` into a float32 model.
* ``open_clip_quickgelu.bin``: QuickGELU open_clip model, ``torch.save`` to ``.bin``.
* ``open_clip_train_epoch_3.pt``: an open_clip training checkpoint as ``open_clip_train``
  writes it (``{"epoch", "name", "state_dict", "optimizer"}``) from a model wrapped in
  ``DistributedDataParallel`` (keys prefixed ``module.``), after one AdamW step.
* ``open_clip_custom_text.safetensors``: ``open_clip.model.CustomTextCLIP`` (``text.*`` keys).
* ``open_clip_image_only.pt``: only the ``visual.*`` entries of an open_clip state dict.
* ``open_clip_hub/``: ``open_clip.push_to_hf_hub.save_for_hf`` output (``open_clip_config.json``,
  ``open_clip_model.safetensors``, a Hugging Face tokenizer of the small vocabulary);
  reference: ``open_clip.create_model("local-dir:...")``.
* ``hf_clip_safetensors/``: ``transformers.CLIPModel.save_pretrained`` (GELU, layer-norm eps
  1e-6, 4 heads of width 16, tokenizer files of the small vocabulary).
* ``hf_clip_bin/``: a ``CLIPModel`` written as ``pytorch_model.bin`` + ``config.json`` (what
  ``save_pretrained(safe_serialization=False)`` wrote before transformers 5, which only writes
  safetensors: ``torch.save(model.state_dict())`` + ``config.save_pretrained``); loaded back
  by ``CLIPModel.from_pretrained`` for the reference.
* ``hf_clip_sharded/``: ``save_pretrained(max_shard_size="100KB")`` (``model.safetensors.index.json``).
* ``hf_vision_proj/``: ``CLIPVisionModelWithProjection.save_pretrained`` (``gelu_new``).
* ``hf_vision_noproj/``: ``CLIPVisionModel.save_pretrained`` (no projection: the embedding is
  ``pooler_output``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "assets" / "clip_formats"
SMALL_VOCAB = ROOT / "tests" / "assets" / "tokenizer" / "small" / "hf_json"
SMALL_VOCAB_SIZE = 2514  # 512 byte symbols + 2000 merges + 2 special tokens
# (no HTML entities or mojibake: Hugging Face's tokenizer skips CLIP's ftfy/HTML clean-up)
PROMPTS = ["a photo of a dog", "a video of a person playing guitar.", "Ångström naïve CAFÉ, it's 42!",
           "something"]

MANIFEST: dict[str, dict] = {}
torch.set_grad_enabled(False)


def import_openai_clip():
    """OpenAI's `clip` imports `packaging` through pkg_resources, gone from recent setuptools."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version
        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    import clip
    return clip


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fixed_inputs(seed: int, image_size: int, vocab_size: int | None, context_length: int | None):
    g = torch.Generator().manual_seed(1000 + seed)
    images = torch.randn(2, 3, image_size, image_size, generator=g)
    if vocab_size is None:
        return images, None
    lengths = [2, 5, min(context_length, 11)]
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, n in enumerate(lengths):  # start, random ids below start, end; zero padding
        tokens[row, 0] = vocab_size - 2
        tokens[row, 1:n - 1] = torch.randint(1, vocab_size - 2, (n - 2,), generator=g)
        tokens[row, n - 1] = vocab_size - 1
    return images, tokens


def save_expected(name: str, **tensors) -> str:
    from safetensors.torch import save_file
    (OUT / "expected").mkdir(parents=True, exist_ok=True)
    path = OUT / "expected" / f"{name}.safetensors"
    save_file({k: v.detach().contiguous().float() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items() if v is not None}, str(path))
    return str(path.relative_to(OUT))


def record(name: str, path: Path, *, library: str, writer: str, config: dict, expected: str,
           load_kwargs: dict | None = None, **extra) -> None:
    MANIFEST[name] = dict(path=str(path.relative_to(OUT)), load_kwargs=load_kwargs or {}, library=library,
                          writer=writer, config=config, expected=expected, **extra)


def perturb_norms(model: torch.nn.Module, g: torch.Generator) -> None:
    """Random layer-norm weights/biases and biases (the libraries initialise them to 1/0, which
    would hide a swapped or dropped parameter)."""
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name or "ln_" in name or "layrnorm" in name or "layernorm" in name):
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- OpenAI TorchScript
def openai_jit() -> None:
    clip = import_openai_clip()
    from clip.model import CLIP
    g = seeded(1)
    cfg = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
               context_length=77, vocab_size=600, transformer_width=64, transformer_heads=1, transformer_layers=2)
    model = CLIP(**cfg).eval()
    perturb_norms(model, g)
    # OpenAI's released archives carry these three entries in their state dict (as tensors; the
    # package's CLIP class keeps two of them as plain ints, used only in __init__)
    for attr in ("input_resolution", "context_length", "vocab_size"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.register_buffer("input_resolution", torch.tensor(cfg["image_resolution"]))
    model.register_buffer("context_length", torch.tensor(cfg["context_length"]))
    model.register_buffer("vocab_size", torch.tensor(cfg["vocab_size"]))
    images, tokens = fixed_inputs(1, 32, 600, 77)
    traced = torch.jit.trace_module(model, {"forward": (images, tokens), "encode_image": (images,),
                                            "encode_text": (tokens,)})
    traced = traced.half()  # OpenAI's archives hold fp16 weights
    path = OUT / "openai_jit" / "ViT-T-16.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))

    ref, _ = clip.load(str(path), device="cpu", jit=False)
    img, txt = ref.encode_image(images), ref.encode_text(tokens)
    # the TorchScript itself (traced in float32, so run it in float32; clip.load(jit=True) no
    # longer runs on recent torch: its graph patching indexes nodes in a way torch dropped)
    jit = torch.jit.load(str(path), map_location="cpu").float().eval()
    assert torch.allclose(jit.encode_image(images), img, atol=1e-5)
    assert torch.allclose(jit.encode_text(tokens), txt, atol=1e-5)
    exp = save_expected("openai_jit", images=images, image_embeddings=img, tokens=tokens, text_embeddings=txt)
    record("openai_jit", path, library="openai-clip", expected=exp,
           writer="clip.model.CLIP -> torch.jit.trace_module -> .half() -> torch.jit.save; "
                  "reference clip.load(jit=False)",
           config=dict(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=1,
                       vision_mlp_ratio=4.0, context_length=77, vocab_size=600, text_width=64, text_heads=1,
                       text_layers=2, text_mlp_ratio=4.0, act="quick_gelu", layer_norm_eps=1e-5, vision_proj=True))


# ----------------------------------------------------------------------------- open_clip
def oc_config(embed_dim, vision, text, quick_gelu):
    """Our CLIPConfig fields for an open_clip model config (heads = width // 64)."""
    out = dict(embed_dim=embed_dim, image_size=vision["image_size"], patch_size=vision["patch_size"],
               vision_width=vision["width"], vision_layers=vision["layers"], vision_heads=vision["width"] // 64,
               vision_mlp_ratio=vision.get("mlp_ratio", 4.0), act="quick_gelu" if quick_gelu else "gelu",
               layer_norm_eps=1e-5, vision_proj=True)
    if text is None:
        out["text_layers"] = 0
    else:
        out.update(context_length=text["context_length"], vocab_size=text["vocab_size"], text_width=text["width"],
                   text_heads=text["heads"], text_layers=text["layers"], text_mlp_ratio=text.get("mlp_ratio", 4.0))
    return out


def oc_reference(model, path: Path, images, tokens):
    import open_clip
    fresh = type(model)(**model._fixture_kwargs).eval()
    open_clip.load_checkpoint(fresh, str(path))
    img = fresh.encode_image(images)
    txt = fresh.encode_text(tokens) if tokens is not None else None
    return img, txt


def oc_model(cls_name: str, seed: int, embed_dim: int, vision: dict, text: dict, quick_gelu: bool):
    import open_clip
    seeded(seed)
    kwargs = dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    model = getattr(open_clip.model, cls_name)(**kwargs).eval()
    model._fixture_kwargs = kwargs
    perturb_norms(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    return model


def open_clip_files() -> None:
    import safetensors.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # -- GELU model, .pt and .safetensors (fp16)
    vision = dict(layers=1, width=128, patch_size=8, image_size=24, mlp_ratio=2.0)
    text = dict(context_length=32, vocab_size=700, width=64, heads=1, layers=2)
    model = oc_model("CLIP", 2, 48, vision, text, quick_gelu=False)
    images, tokens = fixed_inputs(2, 24, 700, 32)
    sd16 = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    pt = OUT / "open_clip_gelu.pt"
    torch.save(sd16, pt)
    st = OUT / "open_clip_gelu.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd16.items()}, str(st))
    for name, path in (("open_clip_gelu_pt", pt), ("open_clip_gelu_safetensors", st)):
        img, txt = oc_reference(model, path, images, tokens)
        exp = save_expected(name, images=images, image_embeddings=img, tokens=tokens, text_embeddings=txt)
        record(name, path, library="open_clip", expected=exp, load_kwargs={"act": "gelu"},
               writer=("open_clip.model.CLIP(quick_gelu=False).state_dict() in fp16 -> "
                       + ("torch.save" if path.suffix == ".pt" else "safetensors.torch.save_file")),
               config=oc_config(48, vision, text, False))

    # -- QuickGELU model, .bin
    vision = dict(layers=3, width=64, patch_size=8, image_size=32)
    text = dict(context_length=77, vocab_size=300, width=128, heads=2, layers=1, mlp_ratio=2.0)
    model = oc_model("CLIP", 3, 64, vision, text, quick_gelu=True)
    images, tokens = fixed_inputs(3, 32, 300, 77)
    path = OUT / "open_clip_quickgelu.bin"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    img, txt = oc_reference(model, path, images, tokens)
    exp = save_expected("open_clip_quickgelu_bin", images=images, image_embeddings=img, tokens=tokens,
                        text_embeddings=txt)
    record("open_clip_quickgelu_bin", path, library="open_clip", expected=exp,
           writer="open_clip.model.CLIP(quick_gelu=True).state_dict() in fp16 -> torch.save (.bin)",
           config=oc_config(64, vision, text, True))

    # -- training checkpoint of a DDP-wrapped model (module. prefix), fp32 + AdamW state
    vision = dict(layers=1, width=64, patch_size=8, image_size=32, mlp_ratio=2.0)
    text = dict(context_length=16, vocab_size=100, width=64, heads=1, layers=1, mlp_ratio=2.0)
    model = oc_model("CLIP", 4, 32, vision, text, quick_gelu=True)
    images, tokens = fixed_inputs(4, 32, 100, 16)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model.train())
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.2)
        with torch.enable_grad():
            feats = ddp(images, tokens)
            loss = feats["image_features"].sum() + feats["text_features"].sum() if isinstance(feats, dict) \
                else feats[0].sum() + feats[1].sum()
            loss.backward()
        opt.step()
        path = OUT / "open_clip_train_epoch_3.pt"
        torch.save({"epoch": 3, "name": "tiny-quickgelu", "state_dict": ddp.state_dict(),
                    "optimizer": opt.state_dict()}, path)
    finally:
        dist.destroy_process_group()
    model.eval()
    img, txt = oc_reference(model, path, images, tokens)
    exp = save_expected("open_clip_train_ckpt", images=images, image_embeddings=img, tokens=tokens,
                        text_embeddings=txt)
    record("open_clip_train_ckpt", path, library="open_clip", expected=exp,
           writer="DistributedDataParallel(open_clip CLIP) after one AdamW step -> torch.save({'epoch', 'name', "
                  "'state_dict' (module.*), 'optimizer'}); reference open_clip.load_checkpoint",
           config=oc_config(32, vision, text, True))

    # -- CustomTextCLIP (text.* keys), safetensors fp32
    vision = dict(layers=2, width=64, patch_size=16, image_size=32)
    text = dict(context_length=24, vocab_size=200, width=64, heads=1, layers=2)
    model = oc_model("CustomTextCLIP", 5, 40, vision, text, quick_gelu=True)
    images, tokens = fixed_inputs(5, 32, 200, 24)
    path = OUT / "open_clip_custom_text.safetensors"
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    img, txt = oc_reference(model, path, images, tokens)
    exp = save_expected("open_clip_custom_text", images=images, image_embeddings=img, tokens=tokens,
                        text_embeddings=txt)
    record("open_clip_custom_text", path, library="open_clip", expected=exp,
           writer="open_clip.model.CustomTextCLIP(quick_gelu=True).state_dict() in fp16 -> safetensors.torch.save_file",
           config=oc_config(40, vision, text, True))

    # -- image-only: the visual.* entries alone
    vision = dict(layers=2, width=64, patch_size=16, image_size=48, mlp_ratio=3.0)
    text = dict(context_length=77, vocab_size=100, width=64, heads=1, layers=1)
    model = oc_model("CLIP", 6, 56, vision, text, quick_gelu=True)
    images, _ = fixed_inputs(6, 48, None, None)
    path = OUT / "open_clip_image_only.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items() if k.startswith("visual.")}, path)
    img = model.float().encode_image(images)
    model.visual.load_state_dict({k[7:]: v for k, v in torch.load(path).items()})
    img = model.encode_image(images)  # from the fp16 weights as written
    exp = save_expected("open_clip_image_only", images=images, image_embeddings=img)
    record("open_clip_image_only", path, library="open_clip", expected=exp,
           writer="the visual.* entries of open_clip.model.CLIP(quick_gelu=True).state_dict() in fp16 -> torch.save; "
                  "reference: model.visual.load_state_dict of them, then encode_image",
           config=oc_config(56, vision, None, True))


def open_clip_hub() -> None:
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf
    from transformers import CLIPTokenizer

    vision = dict(layers=1, width=64, patch_size=16, image_size=32)
    text = dict(context_length=77, vocab_size=SMALL_VOCAB_SIZE, width=64, heads=1, layers=1)
    model_cfg = dict(embed_dim=32, vision_cfg=vision, text_cfg=text)  # no quick_gelu: GELU
    model = oc_model("CLIP", 7, 32, vision, text, quick_gelu=False)
    folder = OUT / "open_clip_hub"
    if folder.exists():
        shutil.rmtree(folder)
    tok = CLIPTokenizer.from_pretrained(str(SMALL_VOCAB))
    # open_clip.create_model sets these; the preprocessing config save_for_hf writes needs them
    model.visual.image_mean = open_clip.constants.OPENAI_DATASET_MEAN
    model.visual.image_std = open_clip.constants.OPENAI_DATASET_STD
    save_for_hf(model.half(), tok, model_cfg, str(folder), safe_serialization=True)  # fp16 weights
    ref = open_clip.create_model("local-dir:" + str(folder)).eval()
    images, tokens = fixed_inputs(7, 32, SMALL_VOCAB_SIZE, 77)
    prompt_tokens = torch.tensor([ids + [0] * (77 - len(ids)) for ids in tok(PROMPTS)["input_ids"]])
    exp = save_expected("open_clip_hub", images=images, image_embeddings=ref.encode_image(images), tokens=tokens,
                        text_embeddings=ref.encode_text(tokens), prompt_tokens=prompt_tokens,
                        prompt_embeddings=ref.encode_text(prompt_tokens))
    record("open_clip_hub", folder, library="open_clip", expected=exp, prompts=PROMPTS,
           writer="open_clip.push_to_hf_hub.save_for_hf(safe_serialization=True) of an fp16 model with a "
                  "transformers CLIPTokenizer of the small vocabulary; "
                  "reference open_clip.create_model('local-dir:...')",
           config=oc_config(32, vision, text, False))


# ----------------------------------------------------------------------------- Hugging Face
def hf_features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_config_fields(vc: dict, tc: dict | None, proj: int | None):
    out = dict(image_size=vc["image_size"], patch_size=vc["patch_size"], vision_width=vc["hidden_size"],
               vision_layers=vc["num_hidden_layers"], vision_heads=vc["num_attention_heads"],
               vision_mlp_ratio=vc["intermediate_size"] / vc["hidden_size"],
               act={"gelu_new": "gelu_tanh"}.get(vc.get("hidden_act", "quick_gelu"),
                                                 vc.get("hidden_act", "quick_gelu")),
               layer_norm_eps=vc.get("layer_norm_eps", 1e-5), vision_proj=proj is not None,
               embed_dim=proj if proj is not None else vc["hidden_size"])
    if tc is None:
        out["text_layers"] = 0
    else:
        out.update(context_length=tc["max_position_embeddings"], vocab_size=tc["vocab_size"],
                   text_width=tc["hidden_size"], text_heads=tc["num_attention_heads"],
                   text_layers=tc["num_hidden_layers"], text_mlp_ratio=tc["intermediate_size"] / tc["hidden_size"])
    return out


def hf_clip(name: str, seed: int, vc: dict, tc: dict, proj: int, how: str, tokenizer: bool = False) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    seeded(seed)
    config = CLIPConfig(text_config=tc, vision_config=vc, projection_dim=proj)
    model = CLIPModel(config).eval()
    perturb_norms(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    if how != "sharded":
        model = model.half()  # fp16 storage; the reference reloads it in float32
    if how == "safetensors":
        model.save_pretrained(str(folder))
        writer = "transformers.CLIPModel.save_pretrained"
    elif how == "sharded":
        model.save_pretrained(str(folder), max_shard_size="100KB")
        writer = "transformers.CLIPModel.save_pretrained(max_shard_size='100KB')"
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        folder.mkdir(parents=True)
        model.config.save_pretrained(str(folder))
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        writer = "CLIPModel: config.save_pretrained + torch.save(state_dict) as pytorch_model.bin"
    if tokenizer:
        CLIPTokenizer.from_pretrained(str(SMALL_VOCAB)).save_pretrained(str(folder))
    ref = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    images, tokens = fixed_inputs(seed, vc["image_size"], tc["vocab_size"], tc["max_position_embeddings"])
    tensors = dict(images=images, image_embeddings=hf_features(ref.get_image_features(pixel_values=images)),
                   tokens=tokens, text_embeddings=hf_features(ref.get_text_features(input_ids=tokens)))
    extra = {}
    if tokenizer:
        tok = CLIPTokenizer.from_pretrained(str(folder))
        ids = tok(PROMPTS)["input_ids"]
        length = tc["max_position_embeddings"]
        prompt_tokens = torch.tensor([x + [0] * (length - len(x)) for x in ids])
        tensors.update(prompt_tokens=prompt_tokens,
                       prompt_embeddings=hf_features(ref.get_text_features(input_ids=prompt_tokens)))
        extra["prompts"] = PROMPTS
    exp = save_expected(name, **tensors)
    record(name, folder, library="transformers", writer=writer + "; reference CLIPModel.from_pretrained",
           expected=exp, config=hf_config_fields(vc, tc, proj), **extra)


def hf_vision(name: str, seed: int, vc: dict, proj: int | None) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
    seeded(seed)
    cls = CLIPVisionModelWithProjection if proj else CLIPVisionModel
    config = CLIPVisionConfig(**vc, **({"projection_dim": proj} if proj else {}))
    model = cls(config).eval()
    perturb_norms(model, torch.Generator().manual_seed(seed))
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    model.half().save_pretrained(str(folder))  # fp16 storage
    ref = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    images, _ = fixed_inputs(seed, vc["image_size"], None, None)
    out = ref(pixel_values=images)
    emb = out.image_embeds if proj else out.pooler_output
    exp = save_expected(name, images=images, image_embeddings=emb)
    record(name, folder, library="transformers", expected=exp,
           writer=f"transformers.{cls.__name__}.save_pretrained; reference {cls.__name__}.from_pretrained",
           config=hf_config_fields(vc, None, proj))


def hf_files() -> None:
    hf_clip("hf_clip_safetensors", 10,
            dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 vocab_size=SMALL_VOCAB_SIZE, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-6,
                 bos_token_id=SMALL_VOCAB_SIZE - 2, eos_token_id=SMALL_VOCAB_SIZE - 1, pad_token_id=0),
            proj=40, how="safetensors", tokenizer=True)
    hf_clip("hf_clip_bin", 11,
            dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, image_size=48,
                 patch_size=16),
            dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1, vocab_size=300,
                 max_position_embeddings=77, bos_token_id=298, eos_token_id=2),  # eos 2: HF legacy argmax pooling
            proj=32, how="bin")
    hf_clip("hf_clip_sharded", 12,
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=16),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=200,
                 max_position_embeddings=20, bos_token_id=198, eos_token_id=199),
            proj=24, how="sharded")
    hf_vision("hf_vision_proj", 13, dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=16, hidden_act="gelu_new"),
              proj=24)
    hf_vision("hf_vision_noproj", 14, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=1, image_size=32, patch_size=8), proj=None)


# ----------------------------------------------------------------------------- unsupported variants
def unsupported() -> None:
    import open_clip
    base_v = dict(layers=1, width=64, patch_size=16, image_size=32)
    base_t = dict(context_length=8, vocab_size=50, width=64, heads=1, layers=1)
    variants = {
        "layer_scale": ("CLIP", dict(vision_cfg={**base_v, "ls_init_value": 1e-5}), "layer scale"),
        "attentional_pool": ("CLIP", dict(vision_cfg={**base_v, "attentional_pool": True,
                                                      "attn_pooler_queries": 4, "attn_pooler_heads": 1}),
                             "attentional pooler"),
        "resnet": ("CLIP", dict(vision_cfg=dict(layers=[1, 1, 1, 1], width=64, image_size=64)), "ResNet"),
        "timm_trunk": ("CLIP", dict(vision_cfg=dict(timm_model_name="vit_tiny_patch16_224", image_size=224)),
                       "timm"),
        "custom_block": ("CLIP", dict(vision_cfg={**base_v, "scale_attn": True, "scale_fc": True}),
                         "custom attention block"),
        "no_ln_pre": ("CLIP", dict(vision_cfg={**base_v, "no_ln_pre": True}), "ln_pre"),
        "text_proj_bias": ("CLIP", dict(text_cfg={**base_t, "proj_bias": True}), "text projection bias"),
        "text_cls": ("CustomTextCLIP", dict(text_cfg={**base_t, "embed_cls": True}), "class token"),
        "logit_bias": ("CLIP", dict(init_logit_bias=-10.0), "logit_bias"),
    }
    out = {}
    for name, (cls, kw, what) in variants.items():
        kwargs = dict(embed_dim=32, vision_cfg=base_v, text_cfg=base_t, quick_gelu=True)
        kwargs.update(kw)
        seeded(0)
        model = getattr(open_clip.model, cls)(**kwargs)
        out[name] = dict(error_mentions=what, open_clip_kwargs=json.loads(json.dumps(kwargs, default=str)),
                         keys={k: list(v.shape) for k, v in model.state_dict().items()})
    (OUT / "unsupported_keys.json").write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    assert SMALL_VOCAB.is_dir(), "run scripts/make_tokenizer_fixture.py first (small vocabulary)"
    openai_jit()
    open_clip_files()
    open_clip_hub()
    hf_files()
    unsupported()
    manifest = dict(generated_by="scripts/make_clip_format_fixtures.py",
                    versions={n: version(n) for n in ("torch", "open_clip_torch", "transformers", "openai-clip",
                                                      "safetensors")},
                    tolerance=1e-4, fixtures=MANIFEST)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{len(MANIFEST)} fixtures, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
