"""VideoClassifier: what every video classifier here shares (CLIP, heads, saving and loading).

A method (DiST or a baseline) is a subclass that sets the class attribute ``method``; defining
it registers the class, so :func:`model_class` and :meth:`VideoClassifier.from_pretrained`
find it by that name. ``import dist_video`` imports every method shipped with the package.

A saved model is a folder: ``config.json`` (format :data:`FORMAT_NAME`, version
:data:`FORMAT_VERSION`) + ``model.safetensors`` (+ ``clip.safetensors`` unless the CLIP
weights are referenced by path). ``config.json`` records the size and SHA-256 of each weight
file (``files``), checked when the folder is loaded. The folder is written as a whole and put
in place in one step (:func:`dist_video.storage.replace_folder`). :func:`read_model_config`
is the one reader of ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, CLIPConfig
from .clip_loaders import clip_from_openai_state_dict, load_clip
from .dist import checkpointing_mode
from .storage import (check_file_record, check_regular_file, file_record, new_file_mode, new_folder_beside,
                      read_safetensors, replace_folder)

__all__ = ["VideoClassifier", "model_class", "resolve_clip_dtype", "bf16_supported", "load_strict_state_dict",
           "read_model_config", "read_safetensors", "new_file_mode", "FORMAT_NAME", "FORMAT_VERSION", "FORMAT_UPGRADES"]

FORMAT_NAME = "dist-video"
#: 1: the first release. 2: the DiST branch as one ``layers.<i>`` module per selected CLIP block
#: (the tensors are renamed on reading by :meth:`VideoClassifier.upgrade_saved_tensors`).
FORMAT_VERSION = 2
#: The files :meth:`VideoClassifier.save_pretrained` writes (others in the folder are kept).
MODEL_FILES = frozenset({"config.json", "model.safetensors", "clip.safetensors"})


def _same_config(meta: dict) -> dict:
    return meta


#: How :func:`read_model_config` brings an older ``config.json`` up to :data:`FORMAT_VERSION`:
#: ``FORMAT_UPGRADES[v - 1]`` turns a version-``v`` dict into a version-``v + 1`` one. Bumping the
#: version adds one function here (and, where tensors were renamed, a step in the classes'
#: :meth:`VideoClassifier.upgrade_saved_tensors`).
FORMAT_UPGRADES: tuple[Callable[[dict], dict], ...] = (_same_config,)


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively (fast matrix products, not emulated).

    CUDA: compute capability 8.0 or newer (Ampere, Ada, Hopper, ...);
    ``torch.cuda.is_bf16_supported()`` also counts the emulation of Volta and Turing (V100,
    T4), which runs without tensor cores. CPU: oneDNN's bf16 kernels (AVX-512 BF16 / AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_clip_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """The frozen CLIP's dtype on ``device`` (the device the model runs on, not the host's CPU).

    ``"auto"``/``None`` -> bf16 where the device has native bf16 (:func:`bf16_supported`),
    else fp16 on CUDA GPUs (LayerNorm statistics stay float32 inside PyTorch's kernels), else
    fp32. Also accepts names (fp32, bf16, fp16, ...) and dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if bf16_supported(device):
            return torch.bfloat16
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown CLIP dtype {dtype!r}: expected one of auto, {', '.join(names)}")
    return names[dtype]


class VideoClassifier(nn.Module):
    """What every video classifier here shares: a CLIP model, a class head and saving.

    Subclasses set ``method`` (which registers them: see :func:`model_class`) and implement
    :meth:`encode_video` (B x 3 x T x H x W -> B x E) and :meth:`method_config` (a JSON-able
    dict that rebuilds them with :meth:`from_method_config`). The head is either fixed
    class-text embeddings (cosine logits scaled by CLIP's frozen ``logit_scale``) or a
    learnable linear layer.
    """

    method: ClassVar[str] = ""
    trains_clip: ClassVar[bool] = False  # True when CLIP weights are trained (saved with the model)
    #: Parameters whose dotted name contains one of these get no weight decay (learnable tokens
    #: and embeddings): CLIP's class token and position/token embeddings here; subclasses add theirs.
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ("class_embedding", "positional_embedding",
                                                        "token_embedding")
    _methods: ClassVar[dict[str, type[VideoClassifier]]] = {}  # method name -> class, filled as classes are defined

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("method")
        if not name:  # an intermediate base class, or a subclass of a method that keeps its name
            return
        known = VideoClassifier._methods.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"{cls.__qualname__}: method {name!r} is taken by {known.__module__}.{known.__qualname__}")
        VideoClassifier._methods[name] = cls

    def __init__(self, clip: CLIP, *, clip_dtype: str | torch.dtype | None = "auto"):
        super().__init__()
        self.clip = clip
        self.class_names: list[str] | None = None
        self.head_type: str | None = None
        self.head: nn.Module | None = None
        self.register_buffer("class_embeddings", None, persistent=False)
        self.clip_dtype_request = clip_dtype  # "auto"/None: re-chosen when the model moves to another device
        if not self.trains_clip:
            self.clip.requires_grad_(False)
            self.clip.eval()
            self.set_clip_dtype(resolve_clip_dtype(clip_dtype, next(clip.parameters()).device))

    # ------------------------------------------------------------------ CLIP
    @property
    def clip_dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    def set_clip_dtype(self, dtype: str | torch.dtype) -> VideoClassifier:
        """Cast the frozen image tower (the text tower stays fp32: it runs once per class list)."""
        self.clip.visual.to(resolve_clip_dtype(dtype, self.clip.visual.conv1.weight.device))
        return self

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``to``, ``cuda``, ``cpu``...); a frozen CLIP whose dtype was
        ``"auto"`` takes the best precision of the device it moved to (a model built on the CPU
        and moved to a GPU runs CLIP in bf16 or fp16 there, as one built on the GPU would)."""
        device = self.clip.visual.conv1.weight.device
        super()._apply(fn, recurse)
        if (not self.trains_clip and self.clip_dtype_request in (None, "auto")
                and self.clip.visual.conv1.weight.device != device):
            self.set_clip_dtype("auto")
        return self

    def train(self, mode: bool = True) -> VideoClassifier:
        super().train(mode)
        if not self.trains_clip:
            self.clip.eval()  # frozen: no dropout / statistics updates, whatever the mode
        return self

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP text embeddings: C x L token ids -> C x E."""
        return self.clip.encode_text(tokens).float()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def method_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def upgrade_saved_tensors(cls, tensors: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """The tensors of a ``model.safetensors`` saved in format ``version`` under this
        version's names (no method renamed any before format 2)."""
        return tensors

    def fuse(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The inference form: a new module computing what ``self.eval()`` computes under
        ``torch.no_grad()`` (``forward`` -> logits, ``encode_video`` -> embeddings), its
        weights folded once into buffers in ``dtype`` (default: the frozen CLIP's dtype).
        It does not follow later changes of this model: fuse again after training."""
        raise NotImplementedError

    @classmethod
    def from_method_config(cls, clip: CLIP, config: dict, **kwargs) -> VideoClassifier:
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that get no weight decay (timm's convention): biases and other
        1-D tensors (norms), and those whose name contains one of ``no_weight_decay_names``."""
        return {name for name, p in self.named_parameters()
                if p.ndim < 2 or any(fragment in name for fragment in self.no_weight_decay_names)}

    def set_grad_checkpointing(self, mode: bool | str = True) -> VideoClassifier:
        """Recompute activations in backward instead of storing them (timm's name). ``mode``: as
        :func:`dist_video.dist.checkpointing_mode` takes it (False/True/"off"/"selective"/"full").
        This method has none: anything but off is a ``ValueError``; DiST overrides it."""
        if checkpointing_mode(mode) != "off":
            raise ValueError(f"activation checkpointing is not available for the {self.method!r} method "
                             "(only for dist): set model.activation_checkpointing=false")
        return self

    # ------------------------------------------------------------------ heads
    def set_class_embeddings(self, text_embeddings: torch.Tensor,
                             class_names: Sequence[str] | None = None) -> VideoClassifier:
        """Use fixed class-text embeddings (C x E) as the classifier."""
        self.head_type, self.head = "text", None
        device = self.clip.logit_scale.device
        self.class_embeddings = text_embeddings.detach().float().to(device)
        self.class_names = list(class_names) if class_names is not None else None
        return self

    def set_class_names(self, class_names: Sequence[str], tokenizer, prompt: str = "") -> VideoClassifier:
        """Embed ``prompt + name`` for every class with the frozen text tower and use it as the head."""
        tokens = tokenizer([f"{prompt}{name}" for name in class_names])
        return self.set_class_embeddings(self.encode_text(tokens), class_names)

    def set_linear_head(self, num_classes: int, class_names: Sequence[str] | None = None) -> VideoClassifier:
        """A learnable linear head E -> C (for classes whose names mean nothing to CLIP)."""
        head = nn.Linear(self.clip.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.head_type, self.head = "linear", head.to(self.clip.logit_scale.device)
        self.class_embeddings = None
        self.class_names = list(class_names) if class_names is not None else None
        return self

    @property
    def num_classes(self) -> int | None:
        if self.head_type == "text":
            return self.class_embeddings.shape[0]
        if self.head_type == "linear":
            return self.head.out_features
        return None

    def logits(self, video: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits against given text embeddings (C x E), scaled by CLIP's ``logit_scale``: -> B x C."""
        return self._cosine_logits(self.encode_video(video), text_embeddings)

    def _cosine_logits(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z, dim=-1)
        text = F.normalize(text.to(z.dtype), dim=-1)
        return self.clip.logit_scale.detach().exp().to(z.dtype) * z @ text.t()

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Video embeddings B x E -> class logits B x C with the current head."""
        if self.head_type == "text":
            return self._cosine_logits(z, self.class_embeddings)
        if self.head_type == "linear":
            return self.head(z)
        raise RuntimeError("no classifier head: call set_class_names / set_class_embeddings / set_linear_head")

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W -> B x C class logits."""
        return self.classify(self.encode_video(video))

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, *, clip_path: str | os.PathLike | None = None,
                        metadata: Mapping | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``clip.safetensors`` unless ``clip_path``).

        With ``clip_path`` (frozen-CLIP methods only) the CLIP weights are not copied: the folder
        refers to that file, which :func:`dist_video.load_clip` must read when it is loaded.
        ``metadata``: more JSON-able entries for ``config.json`` (e.g. ``preprocess``, the
        test-time preprocessing), after the model's own.

        The files are written to a new folder beside ``directory`` and put in its place in one
        step, so a process killed at any moment leaves the old model or the new one, never a
        mix; files of an existing model folder that are not the model's own are kept."""
        from safetensors.torch import save_file

        directory = Path(directory)
        _check_replaceable(directory)
        meta = self._saved_config(clip_path, metadata)
        tensors = {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}
        if self.head_type == "text":
            tensors["class_embeddings"] = self.class_embeddings
        work = new_folder_beside(directory)
        try:
            if meta["clip_weights"] == "clip.safetensors":
                save_file({k: v.detach().float().contiguous().cpu() for k, v in self.clip.state_dict().items()},
                          str(work / "clip.safetensors"))
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(work / "model.safetensors"))
            weights = sorted(f.name for f in work.iterdir())
            for name in weights:  # safetensors creates files readable by their owner only
                os.chmod(work / name, new_file_mode())
            meta["files"] = {name: file_record(work / name) for name in weights}
            (work / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            replace_folder(work, directory, owned=MODEL_FILES)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return directory

    def _saved_config(self, clip_path: str | os.PathLike | None, metadata: Mapping | None) -> dict:
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "config": self.method_config(),
            "clip": self.clip.config.to_dict(),
            "head": self.head_type,
            "class_names": self.class_names,
        }
        if clip_path is None or self.trains_clip:
            meta["clip_weights"] = "clip.safetensors"
        else:
            meta["clip_weights"] = {"path": str(Path(clip_path).resolve())}
        clash = sorted(set(metadata or {}) & (set(meta) | {"files"}))
        if clash:
            raise ValueError(f"metadata may not replace the model's own config.json entries {clash}")
        return {**meta, **(metadata or {})}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, clip: CLIP | None = None,
                        clip_dtype: str | torch.dtype | None = "auto",
                        map_location: str | torch.device = "cpu", trust_checkpoint: bool = False) -> VideoClassifier:
        """Load a folder written by :meth:`save_pretrained` (any registered method). A missing,
        damaged or mismatched file, or one whose SHA-256 is not the one recorded, raises
        ``FileNotFoundError`` / ``ValueError`` naming it. ``trust_checkpoint``: passed to
        :func:`dist_video.load_clip` for CLIP weights referenced by path."""
        directory = Path(directory)
        meta = read_model_config(directory)
        model_cls = model_class(meta.get("method", "dist"))
        if cls is not VideoClassifier and not issubclass(model_cls, cls):
            raise ValueError(f"{directory / 'config.json'}: holds a {meta.get('method')!r} model, "
                             f"not {cls.__name__}")
        try:
            if clip is None:
                ref = meta["clip_weights"]
                if isinstance(ref, str):
                    check_file_record(directory, meta.get("files"), ref)
                    clip = clip_from_openai_state_dict(read_safetensors(directory / ref, "cpu"),
                                                       config=CLIPConfig(**meta["clip"]), source=str(directory / ref))
                else:
                    clip = load_clip(ref["path"], act=meta["clip"]["act"], trust_checkpoint=trust_checkpoint)
            model = model_cls.from_method_config(clip.to(map_location), meta["config"], clip_dtype=clip_dtype)
            _check_same_types(meta["config"], model.method_config(), directory / "config.json")
            check_file_record(directory, meta.get("files"), "model.safetensors")
            tensors = model_cls.upgrade_saved_tensors(read_safetensors(directory / "model.safetensors", map_location),
                                                      meta["saved_format_version"])
            names = meta.get("class_names")
            if meta.get("head") == "text":
                model.set_class_embeddings(tensors.pop("class_embeddings"), names)
            elif meta.get("head") == "linear":
                model.set_linear_head(tensors["head.weight"].shape[0], names)
        except (KeyError, TypeError, AttributeError) as e:  # config.json and the weights disagree
            raise ValueError(f"{directory}: config.json and the weights do not match "
                             f"({type(e).__name__}: {e})") from None
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
        load_strict_state_dict(model, own, tensors, str(directory / "model.safetensors"))
        return model


def model_class(method: str) -> type[VideoClassifier]:
    """The classifier class registered for a method name (``dist`` or a baseline)."""
    known = VideoClassifier._methods
    if method not in known:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(known)}")
    return known[method]


def read_model_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a model folder, brought up to :data:`FORMAT_VERSION` by
    :data:`FORMAT_UPGRADES` (the one place that reads the saved format)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a dist-video model folder)")
    check_regular_file(path, "model config")
    try:
        meta = json.loads(path.read_text(), object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not JSON: not UTF-8 text") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: not a dist-video model (format={found!r})")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, but this dist-video reads versions 1 to "
                         f"{FORMAT_VERSION} (written by a newer release?)")
    for upgrade in FORMAT_UPGRADES[version - 1:]:
        meta = upgrade(meta)
    _check_model_config(meta, path)
    return {**meta, "format_version": FORMAT_VERSION, "saved_format_version": version}


def load_strict_state_dict(module: nn.Module, own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                           source: str) -> None:
    """Load ``state_dict`` into ``module`` after checking it has exactly the keys and shapes of
    ``own`` (the part of ``module.state_dict()`` it should fill); ``source`` names it in errors."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: weights do not match the model: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}")
    module.load_state_dict(state_dict, strict=False)


def _check_replaceable(directory: Path) -> None:
    """Saving replaces ``directory`` as a whole: only a model folder, an empty one or none."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a folder: save the model elsewhere")
    if (directory / "config.json").is_file():
        read_model_config(directory)  # an error unless it is a dist-video model folder
    elif any(entry.name not in MODEL_FILES for entry in directory.iterdir()):
        raise ValueError(f"{directory}: a folder that is not a dist-video model folder and not empty: save the "
                         "model into a new or empty folder")


def _unique_keys(path: Path):
    def pairs_to_dict(pairs: list) -> dict:
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{path}: the key {key!r} appears twice")
            seen[key] = value
        return seen
    return pairs_to_dict


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _type_error(value: object, annotation: str) -> bool:
    allowed = _JSON_TYPES.get(annotation)
    if allowed is None:
        return False
    return not isinstance(value, allowed) or (annotation != "bool" and isinstance(value, bool))


def _check_model_config(meta: dict, path: Path) -> None:
    """Types and duplicates in a ``config.json``: one message naming the file and the key."""
    expect = {"method": (str, "a string"), "config": (dict, "an object"), "clip": (dict, "an object"),
              "clip_weights": ((str, dict), "a file name or an object")}
    for key, (kind, what) in expect.items():
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{path}: {key!r} must be {what}, not {type(meta[key]).__name__}")
    for f in dataclasses.fields(CLIPConfig):
        if f.name in meta.get("clip", {}) and _type_error(meta["clip"][f.name], f.type):
            raise ValueError(f"{path}: 'clip.{f.name}' must be a {f.type}, not {meta['clip'][f.name]!r:.40}")
    for key, value in (meta.get("config") or {}).items():  # no method has a field holding a number as text
        if isinstance(value, str) and _is_number(value):
            raise ValueError(f"{path}: 'config.{key}' must be a number, not the string {value!r:.40}")
    if meta.get("head") not in (None, "text", "linear"):
        raise ValueError(f"{path}: 'head' must be \"text\", \"linear\" or null")
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: 'class_names' must be a list of strings")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{path}: 'class_names' holds {twice[0]!r:.60} more than once ({len(twice)} duplicated)")
    ref = meta.get("clip_weights")
    if isinstance(ref, str) and (Path(ref).name != ref or ref in ("", ".", "..")):
        raise ValueError(f"{path}: 'clip_weights' must name a file inside the folder")
    if isinstance(ref, dict) and not isinstance(ref.get("path"), str):
        raise ValueError(f"{path}: 'clip_weights.path' must be a string")
    if "files" in meta and not (meta["files"] is None or isinstance(meta["files"], dict)):
        raise ValueError(f"{path}: 'files' must be an object")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_same_types(saved: dict, rebuilt: dict, path: Path) -> None:
    """A method config read back: each saved value of the type the model gives it (a string where
    a number belongs is an error, not silently used)."""
    for key, value in saved.items():
        if key in rebuilt and rebuilt[key] is not None and value is not None:
            want = rebuilt[key]
            numbers, sequences = (int, float), (list, tuple)
            same = ((isinstance(value, numbers) and isinstance(want, numbers)
                     and isinstance(value, bool) == isinstance(want, bool))
                    or (isinstance(value, sequences) and isinstance(want, sequences)) or type(value) is type(want))
            if not same:
                raise ValueError(f"{path}: 'config.{key}' must be a {type(want).__name__}, not {value!r:.40}")
