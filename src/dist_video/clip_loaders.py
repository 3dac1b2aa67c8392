"""Build a :class:`~dist_video.clip.CLIP` from CLIP checkpoints of every common format.

:func:`load_clip` reads OpenAI's TorchScript archives and state dicts, open_clip's state dicts,
training checkpoints and hub folders, and Hugging Face ``CLIPModel`` / ``CLIPVisionModel``
folders, converting each to OpenAI's layout. The architecture is read from tensor shapes (and
a Hugging Face or open_clip config where there is one), never from a name or a table of known
models.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch

from .authors_keys import BRANCH_PREFIX, LEGACY_BRANCH_PREFIX
from .clip import CLIP, CLIPConfig
from .storage import check_file_record, check_regular_file, read_torchscript_tensors, torch_load

__all__ = ["clip_config_from_openai_state_dict", "clip_from_openai_state_dict", "load_clip", "resolve_clip_path",
           "BUILTIN_ENCODERS"]

#: Encoders shipped inside the package: ``load_clip("builtin:<name>")``.
BUILTIN_ENCODERS = {"digits": "digits-vit.safetensors"}


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise ValueError(f"transformer blocks under {prefix!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def clip_config_from_openai_state_dict(state_dict: Mapping[str, torch.Tensor], act: str = "quick_gelu",
                                       layer_norm_eps: float = 1e-5) -> CLIPConfig:
    """Infer the CLIP sizes from an OpenAI-layout state dict (``visual.*``, ``transformer.*``...)."""
    if "visual.conv1.weight" not in state_dict:
        if any(k.startswith("visual.layer1.") for k in state_dict):
            raise ValueError("this is a CLIP ResNet checkpoint; DiST needs a CLIP ViT (patch tokens)")
        raise ValueError("no 'visual.conv1.weight' in the state dict: not an OpenAI-layout CLIP ViT")
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    num_pos = state_dict["visual.positional_embedding"].shape[0]
    grid = round((num_pos - 1) ** 0.5)
    if grid * grid + 1 != num_pos:
        raise ValueError(f"visual.positional_embedding has {num_pos} rows: not a square grid + class token")
    vision_layers = _count_blocks(state_dict, "visual.transformer.resblocks.")
    vision_mlp = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    proj = state_dict.get("visual.proj")
    has_text = "token_embedding.weight" in state_dict
    if proj is not None:
        embed_dim = proj.shape[1]
    elif has_text:
        embed_dim = state_dict["text_projection"].shape[1]
    else:
        embed_dim = vision_width
    cfg = dict(
        embed_dim=embed_dim,
        image_size=grid * patch_size,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=vision_layers,
        vision_heads=max(1, vision_width // 64),
        vision_mlp_ratio=vision_mlp / vision_width,
        act=act,
        layer_norm_eps=layer_norm_eps,
        vision_proj=proj is not None,
    )
    if has_text:
        text_width = state_dict["ln_final.weight"].shape[0]
        cfg.update(
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            text_width=text_width,
            text_heads=max(1, text_width // 64),
            text_layers=_count_blocks(state_dict, "transformer.resblocks."),
            text_mlp_ratio=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        )
    else:
        cfg.update(text_layers=0)
    return CLIPConfig(**cfg)


def clip_from_openai_state_dict(state_dict: Mapping[str, torch.Tensor], act: str = "quick_gelu",
                                config: CLIPConfig | None = None, source: str = "state dict") -> CLIP:
    """A float32 :class:`CLIP` holding the weights of an OpenAI-layout state dict."""
    config = config or clip_config_from_openai_state_dict(state_dict, act=act)
    sd = {k: v for k, v in state_dict.items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    model = CLIP(config)
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    except RuntimeError as e:  # size mismatches: tensors inconsistent with each other
        lines = [ln.strip() for ln in str(e).splitlines()[1:4]]
        raise ValueError(f"{source}: CLIP weights of inconsistent shapes for the inferred architecture "
                         f"({config.vision_layers} vision blocks of width {config.vision_width}): "
                         + "; ".join(lines)) from None
    if missing or unexpected:
        raise ValueError(f"{source}: CLIP weights do not fit the inferred architecture "
                         f"({config.vision_layers} vision blocks of width {config.vision_width}, "
                         f"{config.text_layers} text blocks): missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model.float().eval()


# =============================================================================================
# load_clip: every checkpoint format, converted to the OpenAI layout above
# =============================================================================================

_OPENAI_BUFFERS = ("input_resolution", "context_length", "vocab_size")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pyth")
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh"}
#: Suffixes of a standard pre-norm block (``resblocks.<i>.<suffix>``); anything else is a variant.
_BLOCK_KEYS = {f"{m}.{p}" for m in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
               for p in ("weight", "bias")} | {"attn.in_proj_weight", "attn.in_proj_bias"}


@dataclass
class _Source:
    """What a checkpoint holds, before conversion to the OpenAI layout."""

    state_dict: dict
    file: Path  # named in messages
    kind: str
    act: str | None = None  # the file's own activation (metadata, HF config, open_clip config)
    eps: float | None = None
    vision_heads: int | None = None
    text_heads: int | None = None
    hf_config: dict | None = None
    config: dict | None = None  # a complete CLIPConfig from our own safetensors metadata
    act_error: str | None = None  # the file's activation is unusable: raised unless act= is given


def load_clip(path: str | os.PathLike, *, act: str | None = None,
              vocab: str | os.PathLike | None = None, trust_checkpoint: bool = False) -> CLIP:
    """Load CLIP ViT weights from any supported checkpoint into a float32 :class:`CLIP` (eval mode).

    ``path``: ``builtin:<name>`` for an encoder shipped with the package (:data:`BUILTIN_ENCODERS`:
    ``builtin:digits``, a small image-only ViT pre-trained on digit images); an OpenAI
    TorchScript archive (``ViT-B-16.pt``) or OpenAI-layout state dict; an open_clip state dict
    (``.pt``, ``.bin``, ``.safetensors``), training checkpoint (``{"state_dict": ..., "epoch": ...}``,
    ``module.`` prefixes) or Hugging Face hub folder
    (``open_clip_config.json``); a Hugging Face ``CLIPModel`` / ``CLIPVisionModel[WithProjection]``
    folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, sharded or not), or a
    file inside one; a dist-video safetensors file (its metadata is honoured) or model folder
    (``VideoClassifier.save_pretrained``: its ``clip.safetensors`` with the recorded config).
    Checkpoints with only ``visual.*`` weights give an image-only model (``encode_text`` raises).

    ``act``: the MLP activation (``quick_gelu``, ``gelu``, ``gelu_tanh``), overriding the file's
    own (Hugging Face ``hidden_act``, open_clip's ``quick_gelu`` flag, metadata); without either,
    QuickGELU (OpenAI's, and open_clip's ``-quickgelu`` models: pass ``act="gelu"`` for open_clip
    models trained without it, e.g. ``ViT-B-32`` laion weights).

    The model's ``tokenizer`` is set (a :class:`~dist_video.tokenizer.Tokenizer` or None): from
    ``vocab``, else a vocabulary beside the checkpoint (or the Hugging Face folder's tokenizer
    files), else an installed ``open_clip``/``clip`` package's. Sizes come from tensor shapes
    (and ``config.json`` for Hugging Face); heads are width // 64 except where a config says.

    Files are read as tensors only (``torch.load(weights_only=True)``; TorchScript archives taken
    apart without running their code). A file that needs more (pickled Python objects) raises
    :class:`~dist_video.storage.UntrustedCheckpointError`; ``trust_checkpoint=True`` loads it
    anyway, for files you made or trust (``--trust-checkpoint``).
    """
    p = Path(resolve_clip_path(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (CLIP weights)")
    if act is not None:
        _check_act(act, "the act argument")
    src = _open_source(p, trust_checkpoint)
    sd = _to_openai_layout(src)
    model = _build(sd, src, act)
    model.tokenizer = _tokenizer_for(model, p, vocab)
    return model


def resolve_clip_path(spec: str | os.PathLike) -> str:
    """``builtin:<name>`` -> the packaged file of that encoder; anything else unchanged (as a string)."""
    spec = os.fspath(spec)
    if not spec.startswith("builtin:"):
        return spec
    name = spec.split(":", 1)[1]
    if name not in BUILTIN_ENCODERS:
        raise ValueError(f"unknown built-in encoder {spec!r}; available: "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_ENCODERS))
    return str(resources.files("dist_video") / "assets" / BUILTIN_ENCODERS[name])


# ----------------------------------------------------------------------------- reading files
def _check_act(name: str, where: str) -> str:
    from .clip import make_activation
    try:
        make_activation(name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return name


def _open_source(p: Path, trust: bool = False) -> _Source:
    folder = p if p.is_dir() else p.parent
    own = _dist_video_folder(folder)
    if own is not None and (p.is_dir() or p.name in (own.get("clip_weights"), "config.json")):
        # a folder written by VideoClassifier.save_pretrained: its CLIP weights and exact config
        ref = own.get("clip_weights")
        if not isinstance(ref, str):
            raise ValueError(f"{folder}: a dist-video model folder whose CLIP weights are not inside it "
                             f"(they are at {ref}); load those, or the folder with VideoClassifier.from_pretrained")
        check_file_record(folder, own.get("files"), ref)
        src = _file_source(folder / ref, None, trust)
        if isinstance(own.get("clip"), dict):
            src.config, src.act = own["clip"], own["clip"].get("act", src.act)
        return src
    hf_cfg = _hf_config(folder)
    if p.is_dir():
        if hf_cfg is not None:
            return _hf_source(folder, hf_cfg, None, trust)
        oc = folder / "open_clip_config.json"
        if oc.is_file():
            for name in _OPEN_CLIP_WEIGHT_FILES:
                if (folder / name).is_file():
                    return _file_source(folder / name, oc, trust)
            raise FileNotFoundError(f"{folder}: has open_clip_config.json but no weights "
                                    f"({' or '.join(_OPEN_CLIP_WEIGHT_FILES)})")
        weights = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
        if len(weights) == 1:
            return _file_source(weights[0], None, trust)
        if not weights:
            raise FileNotFoundError(f"{folder}: no CLIP weights in this folder (no Hugging Face config.json, no "
                                    f"open_clip_config.json, no {'/'.join(_WEIGHT_SUFFIXES)} file)")
        raise ValueError(f"{folder}: several weight files ({', '.join(f.name for f in weights[:6])}); "
                         "pass the one to load")
    if hf_cfg is not None and (p.name == "config.json" or p.name in _HF_WEIGHT_FILES
                               or p.name in _HF_INDEX_FILES or _HF_SHARD.match(p.name)):
        return _hf_source(folder, hf_cfg, None if p.name == "config.json" or _HF_SHARD.match(p.name) else p, trust)
    if p.name == "open_clip_config.json":
        return _open_source(folder, trust)
    oc = folder / "open_clip_config.json"
    return _file_source(p, oc if oc.is_file() and p.name in _OPEN_CLIP_WEIGHT_FILES else None, trust)


def _read_tensors(file: Path, trust: bool = False) -> tuple[object, dict, str]:
    """(object, safetensors metadata, kind) of one weights file, without executing code (unless
    ``trust``: see :func:`dist_video.storage.torch_load`)."""
    check_regular_file(file, "CLIP weights file")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ValueError(f"{file}: cannot read the file: {e.strerror}") from None
    if size == 0:
        raise ValueError(f"{file}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(file) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{file}: damaged or truncated zip archive (a torch.save or TorchScript file): "
                             f"{e}") from None
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            return read_torchscript_tensors(file, trust=trust), {}, "TorchScript archive"
        return torch_load(file, trust=trust, mmap=True), {}, "torch.save file"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size + 1:
        return (*_read_safetensors(file), "safetensors file")
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy (non-zip) format
        return torch_load(file, trust=trust), {}, "torch.save file (legacy format)"
    if head.lstrip()[:1] in (b"{", b"["):
        raise ValueError(f"{file}: a JSON file, not weights (pass the checkpoint file or its folder)")
    raise ValueError(f"{file}: unknown format: not a PyTorch (torch.save or TorchScript) or safetensors file")


def _read_safetensors(file: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # SafetensorError, OSError...
        raise ValueError(f"{file}: cannot read the safetensors file (truncated or damaged?): {e}") from None


def _file_source(file: Path, open_clip_config: Path | None, trust: bool = False) -> _Source:
    obj, meta, kind = _read_tensors(file, trust)
    src = _Source(_find_state_dict(obj, file), file, kind)
    if meta:
        _apply_metadata(src, meta)
    if open_clip_config is not None:
        _apply_open_clip_config(src, open_clip_config)
    return src


def _apply_metadata(src: _Source, meta: dict) -> None:
    """Our own safetensors files: ``act``, ``layer_norm_eps``, heads, or a whole ``clip_config``."""
    import json
    where = f"{src.file} (metadata)"
    for key in ("clip_config", "config"):
        if key in meta:
            try:
                cfg = json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: {key!r} is not JSON: {e}") from None
            if isinstance(cfg, dict) and "vision_width" in cfg:
                src.config = cfg
                src.act = cfg.get("act", src.act)
            break
    if "act" in meta:
        src.act = _check_act(meta["act"], where)
    try:
        if "layer_norm_eps" in meta:
            src.eps = float(meta["layer_norm_eps"])
        if "vision_heads" in meta:
            src.vision_heads = int(meta["vision_heads"])
        if "text_heads" in meta:
            src.text_heads = int(meta["text_heads"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _apply_open_clip_config(src: _Source, path: Path) -> None:
    """open_clip's ``open_clip_config.json`` (hub folders): activation, heads, and a refusal of
    variants that the weights alone would not reveal."""
    import json
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it: {e}") from None
    cfg = cfg.get("model_cfg", cfg)
    vc, tc = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    bad = []
    for tower, c, checks in (
            ("vision_cfg", vc, [("pool_type", "tok"), ("final_ln_after_pool", False), ("no_ln_pre", False),
                                ("attentional_pool", False), ("ls_init_value", None), ("timm_model_name", None),
                                ("pos_embed_type", "learnable"), ("act_kwargs", None)]),
            ("text_cfg", tc, [("pool_type", "argmax"), ("final_ln_after_pool", False), ("embed_cls", False),
                              ("no_causal_mask", False), ("proj_bias", False), ("hf_model_name", None),
                              ("ls_init_value", None), ("act_kwargs", None)])):
        for key, default in checks:
            if c.get(key, default) != default:
                bad.append(f"{tower}.{key}={c[key]!r}")
        for key in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
            if c.get(key):
                bad.append(f"{tower}.{key}=True")
    if cfg.get("init_logit_bias") is not None:
        bad.append("init_logit_bias (sigmoid loss)")
    if bad:
        raise ValueError(f"{src.file}: unsupported open_clip variant ({path.name}: {', '.join(bad)}); load_clip "
                         "reads standard CLIP ViT towers")
    src.act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    if "width" in vc:
        src.vision_heads = max(1, int(vc["width"]) // int(vc.get("head_width", 64)))
    if tc:
        src.text_heads = int(tc.get("heads", 8))
    eps = {float((c.get("norm_kwargs") or {}).get("eps", 1e-5)) for c in (vc, tc) if c}
    if len(eps) > 1:
        raise ValueError(f"{src.file}: different layer-norm eps in the two towers ({path.name}): unsupported")
    src.eps = eps.pop() if eps else None
    src.kind = "open_clip hub folder"


def _dist_video_folder(folder: Path) -> dict | None:
    """The config.json of a dist-video model folder (``"format": "dist-video"``), else None."""
    import json
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == "dist-video" else None


# ----------------------------------------------------------------------------- Hugging Face
def _hf_config(folder: Path) -> dict | None:
    """The folder's Hugging Face CLIP config, None when there is no (Hugging Face) config.json."""
    import json
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it: {e}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        return None  # not a Hugging Face folder (e.g. some other tool's config)
    if cfg["model_type"] not in ("clip", "clip_vision_model"):
        raise ValueError(f"{path}: Hugging Face model_type {cfg['model_type']!r} is not supported; load_clip "
                         "reads CLIPModel ('clip') and CLIPVisionModel[WithProjection] ('clip_vision_model') "
                         "folders")
    return cfg


def _hf_source(folder: Path, cfg: dict, chosen: Path | None, trust: bool = False) -> _Source:
    import json
    if chosen is not None and chosen.name in _HF_WEIGHT_FILES:
        files = [chosen]
    else:
        index = chosen if chosen is not None and chosen.name in _HF_INDEX_FILES else next(
            (folder / n for n in _HF_INDEX_FILES if (folder / n).is_file()), None)
        single = next((folder / n for n in _HF_WEIGHT_FILES if (folder / n).is_file()), None)
        if single is not None and (chosen is None or index is None):
            files = [single]
        elif index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a weights index: {e}") from None
            files = [folder / n for n in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shards missing from {folder}: {', '.join(missing)}")
        else:
            raise FileNotFoundError(f"{folder}: a Hugging Face CLIP config.json but no weights "
                                    f"({' / '.join(_HF_WEIGHT_FILES + _HF_INDEX_FILES)})")
    sd: dict = {}
    for f in files:
        obj, _, _ = _read_tensors(f, trust)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{f}: holds a {type(obj).__name__}, not a state dict")
        sd.update(obj)
    vc = cfg if cfg["model_type"] == "clip_vision_model" else (cfg.get("vision_config") or {})
    tc = None if cfg["model_type"] == "clip_vision_model" else (cfg.get("text_config") or {})
    src = _Source(sd, files[0] if len(files) == 1 else folder, "Hugging Face folder", hf_config=cfg)
    src.vision_heads = int(vc.get("num_attention_heads", 12))
    has_text = any(k.startswith("text_model.") for k in sd)
    towers = [("vision_config", vc)] + ([("text_config", tc)] if has_text and tc is not None else [])
    acts, eps = {}, {}
    for name, c in towers:
        raw = c.get("hidden_act", "quick_gelu")
        if raw not in _HF_ACTS:  # an error unless the caller passes act=
            src.act_error = (f"{folder / 'config.json'}: {name}.hidden_act {raw!r} is not supported "
                             f"({', '.join(_HF_ACTS)}); pass act=... to choose one")
        acts[name] = _HF_ACTS.get(raw, raw)
        eps[name] = float(c.get("layer_norm_eps", 1e-5))
    if len(set(acts.values())) > 1:
        src.act_error = src.act_error or (f"{src.file}: the towers use different activations ({acts}): "
                                          "unsupported unless you pass act=... for both")
    src.act = acts["vision_config"]
    if len(set(eps.values())) > 1:
        raise ValueError(f"{folder / 'config.json'}: the towers use different layer_norm_eps ({eps}): unsupported")
    src.eps = eps["vision_config"]
    if has_text:
        src.text_heads = int(tc.get("num_attention_heads", 8))
    return src


def _hf_block(sd: dict, src: str, dst: str, out: dict, used: set) -> None:
    def take(name):
        key = src + name
        if key not in sd:
            raise KeyError(key)
        used.add(key)
        return sd[key]
    out[dst + "attn.in_proj_weight"] = torch.cat([take(f"self_attn.{n}_proj.weight") for n in "qkv"])
    out[dst + "attn.in_proj_bias"] = torch.cat([take(f"self_attn.{n}_proj.bias") for n in "qkv"])
    for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        for p in ("weight", "bias"):
            out[f"{dst}{b}.{p}"] = take(f"{a}.{p}")


def _hf_to_openai(sd: dict, file: Path) -> dict:
    """Hugging Face CLIP names -> OpenAI names (q/k/v concatenated, projections transposed)."""
    if "embeddings.patch_embedding.weight" in sd:  # CLIPVisionModel saved by transformers >= 5: no prefix
        sd = {("vision_model." + k if not k.startswith(("visual_projection.", "vision_model.")) else k): v
              for k, v in sd.items()}
    out: dict = {}
    used: set = set()
    plain = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for a, b in plain.items():
        if a in sd:
            out[b] = sd[a]
            used.add(a)
    for a, b in (("visual_projection.weight", "visual.proj"), ("text_projection.weight", "text_projection")):
        if a in sd:
            out[b] = sd[a].t()
            used.add(a)
    try:
        towers = (("vision_model.", "visual.transformer.resblocks."), ("text_model.", "transformer.resblocks."))
        for tower, dst in towers:
            for i in range(_count_blocks(sd, tower + "encoder.layers.")):
                _hf_block(sd, f"{tower}encoder.layers.{i}.", f"{dst}{i}.", out, used)
    except KeyError as e:
        raise ValueError(f"{file}: incomplete Hugging Face CLIP weights: no {e.args[0]}") from None
    for bias in ("visual_projection.bias", "text_projection.bias"):
        if bias in sd:
            raise ValueError(f"{file}: unsupported variant: a projection bias ({bias})")
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ValueError(f"{file}: Hugging Face weights that a CLIPModel / CLIPVisionModel does not have: "
                         f"{left[:8]}{' ...' if len(left) > 8 else ''}")
    if any(k.startswith("text_model.") for k in sd) and "text_projection" not in out:
        raise ValueError(f"{file}: a text tower without text_projection.weight (a CLIPTextModel?): unsupported")
    return out


# ----------------------------------------------------------------------------- state dicts
_MARKERS = ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "visual.trunk.",
            "visual.layer1.", "visual.attnpool.")


def _has_marker(keys) -> str | None:
    for k in keys:
        if not isinstance(k, str):
            continue
        for m in _MARKERS:
            i = k.find(m)
            if i >= 0 and (i == 0 or k[i - 1] == "."):
                return k[:i]
        if k == "embeddings.patch_embedding.weight":
            return ""
    return None


def _find_state_dict(obj: object, file: Path) -> dict:
    """The CLIP tensors of a loaded object (a state dict, or a checkpoint dict holding one),
    with wrapper prefixes (``module.``, ``_orig_mod.``...) removed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    candidates = [obj] + [obj[k] for k in ("state_dict", "model", "model_state", "module", "state_dict_ema")
                          if isinstance(obj.get(k), Mapping)]
    candidates += [v for v in obj.values() if isinstance(v, Mapping) and not any(v is c for c in candidates)]
    for cand in candidates:
        prefix = _has_marker(cand.keys())
        if prefix is None:
            continue
        sd = {k[len(prefix):]: v for k, v in cand.items()
              if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
        if any(k.startswith((BRANCH_PREFIX, LEGACY_BRANCH_PREFIX)) for k in sd):
            raise ValueError(f"{file}: a DiST video checkpoint (CLIP plus dist_net.*): load it with "
                             "dist_video.load_official_checkpoint")
        return sd
    keys = [k for k in obj.keys() if isinstance(k, str)][:6]
    raise ValueError(f"{file}: not a CLIP checkpoint: no image tower weights (visual.conv1.weight or Hugging "
                     f"Face vision_model.*) found; its top-level keys start {keys}")


def _to_openai_layout(src: _Source) -> dict:
    file = src.file
    sd = {k: v for k, v in src.state_dict.items()
          if not k.endswith(("attn_mask", "position_ids")) and k not in _OPENAI_BUFFERS}
    if any(k.startswith("vision_model.") or k == "embeddings.patch_embedding.weight" for k in sd):
        return _hf_to_openai(sd, file)
    _reject_variants(sd, file)
    out = {}
    for k, v in sd.items():  # open_clip's CustomTextCLIP keeps the text tower under text.*
        if k.startswith("text."):
            k = k[len("text."):]
        if k == "text_projection.weight":  # a bias-free nn.Linear projection
            k, v = "text_projection", v.t()
        out[k] = v
    if "logit_scale" in out and out["logit_scale"].numel() == 1:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def _reject_variants(sd: dict, file: Path) -> None:
    keys = list(sd)
    found: list[str] = []

    def any_key(pred) -> bool:
        return any(pred(k) for k in keys)

    if any_key(lambda k: k.startswith("visual.trunk.")):
        found.append("a timm image tower (visual.trunk.*, open_clip's timm_model_name)")
    if any_key(lambda k: k.startswith(("visual.layer1.", "visual.attnpool."))):
        found.append("a ResNet image tower (visual.layer1.*, visual.attnpool.*): DiST needs a ViT")
    if any_key(lambda k: ".ls_1." in k or ".ls_2." in k):
        found.append("layer scale (ls_1/ls_2, open_clip's ls_init_value)")
    if any_key(lambda k: k.startswith("visual.attn_pool")):
        found.append("an attentional pooler (visual.attn_pool.*, open_clip's attentional_pool)")
    if any_key(lambda k: k.startswith(("text.transformer.", "text.proj")) and not k.startswith(
            ("text.transformer.resblocks.", "text.projection"))):
        found.append("a Hugging Face text tower (text.transformer.* from transformers, open_clip's hf_model_name)")
    if any_key(lambda k: k in ("cls_emb", "text.cls_emb")):
        found.append("a text class token (text.cls_emb, open_clip's embed_cls)")
    if "logit_bias" in sd:
        found.append("a logit_bias (sigmoid-loss training)")
    if any_key(lambda k: k in ("text_projection.bias", "text.text_projection.bias")):
        found.append("a text projection bias (open_clip's proj_bias)")
    odd = sorted({m.group(2) for k in keys if (m := re.match(r"(.*resblocks\.\d+\.)(.*)", k))
                  and m.group(2) not in _BLOCK_KEYS and ".ls_" not in "." + m.group(2)})
    if odd:
        found.append(f"a custom attention block ({', '.join(odd[:6])}: open_clip's scale_attn / scale_fc / "
                     "qk_norm / scaled_cosine_attn / scale_heads / scale_attn_inner)")
    if "visual.conv1.weight" in sd and "visual.ln_pre.weight" not in sd and not found:
        found.append("no ln_pre (open_clip's no_ln_pre)")
    if found:
        raise ValueError(f"{file}: unsupported CLIP variant: {'; '.join(found)}. load_clip reads standard CLIP "
                         "ViTs (OpenAI's layout, open_clip's default ViT towers, Hugging Face CLIPModel)")


def _build(sd: dict, src: _Source, act: str | None) -> CLIP:
    import dataclasses
    file = src.file
    if act is None and src.act_error:
        raise ValueError(src.act_error)
    chosen = act or src.act or "quick_gelu"
    try:
        if src.config is not None:
            fields = {f.name for f in dataclasses.fields(CLIPConfig)}
            config = CLIPConfig(**{k: v for k, v in src.config.items() if k in fields})
            if act is not None:
                config = dataclasses.replace(config, act=act)
        else:
            config = clip_config_from_openai_state_dict(sd, act=chosen, layer_norm_eps=src.eps or 1e-5)
            if src.vision_heads:
                config = dataclasses.replace(config, vision_heads=src.vision_heads)
            if src.text_heads and config.text_layers:
                config = dataclasses.replace(config, text_heads=src.text_heads)
    except KeyError as e:
        raise ValueError(f"{file}: incomplete CLIP weights: no {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None
    for tower, width, heads in (("vision", config.vision_width, config.vision_heads),
                                ("text", config.text_width, config.text_heads)):
        if (tower == "vision" or config.text_layers) and width % heads:
            raise ValueError(f"{file}: {tower} width {width} is not divisible by {heads} heads")
    if "logit_scale" not in sd:  # image-only files usually leave it out: CLIP's initial value
        sd = {**sd, "logit_scale": torch.tensor(math.log(1 / 0.07))}
    return clip_from_openai_state_dict(sd, config=config, source=f"{file} ({src.kind})")


# ----------------------------------------------------------------------------- tokenizer
def _tokenizer_for(model: CLIP, path: Path, vocab):
    import warnings
    from .tokenizer import Tokenizer, VocabNotFoundError, find_vocab
    if not model.has_text:
        return None
    try:
        where = find_vocab(checkpoint_path=path, vocab=vocab)
        tok = Tokenizer(where, context_length=model.config.context_length)
    except (VocabNotFoundError, ValueError, ImportError) as e:
        if vocab is not None:
            raise
        if not isinstance(e, VocabNotFoundError):
            warnings.warn(f"no tokenizer for {path}: {e}", stacklevel=3)
        return None
    if tok.vocab_size > model.config.vocab_size:
        msg = (f"the BPE vocabulary {where} has {tok.vocab_size} tokens but the text tower of {path} has "
               f"{model.config.vocab_size}")
        if vocab is not None:
            raise ValueError(msg)
        warnings.warn(msg + ": no tokenizer attached (pass vocab=...)", stacklevel=3)
        return None
    return tok
