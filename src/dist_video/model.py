"""DiSTVideoModel: frozen CLIP + DiST branch + class head.

The frozen CLIP runs under ``torch.no_grad`` in its own dtype (bf16 by default where the
device supports it), on the T' = T / alpha sparse frames only, and stops after the last
selected block. Only the DiST branch (and a linear head, if chosen) has trainable parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, CLIPConfig
from .dist import DiSTBranch, DiSTConfig

__all__ = ["VideoClassifier", "DiSTVideoModel", "model_class", "resolve_clip_dtype", "bf16_supported"]

FORMAT_NAME = "dist-video"
FORMAT_VERSION = 1


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are fast and supported on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_clip_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"``/``None`` -> bf16 where supported, else fp32; also accepts names and dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown CLIP dtype {dtype!r}: expected one of auto, {', '.join(names)}")
    return names[dtype]


class VideoClassifier(nn.Module):
    """What every video classifier here shares: a CLIP model, a class head and saving.

    Subclasses set ``method`` and implement :meth:`encode_video` (B x 3 x T x H x W -> B x E)
    and :meth:`method_config` (a JSON-able dict that rebuilds them with :meth:`from_method_config`).
    The head is either fixed class-text embeddings (cosine logits scaled by CLIP's frozen
    ``logit_scale``) or a learnable linear layer.
    """

    method: str = ""
    trains_clip: bool = False  # True when CLIP weights are trained (saved with the model)

    def __init__(self, clip: CLIP, *, clip_dtype: str | torch.dtype | None = "auto"):
        super().__init__()
        self.clip = clip
        self.class_names: list[str] | None = None
        self.head_type: str | None = None
        self.head: nn.Module | None = None
        self.register_buffer("class_embeddings", None, persistent=False)
        if not self.trains_clip:
            self.clip.requires_grad_(False)
            self.clip.eval()
            self.set_clip_dtype(resolve_clip_dtype(clip_dtype, next(clip.parameters()).device))

    # ------------------------------------------------------------------ CLIP
    @property
    def clip_dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    def set_clip_dtype(self, dtype: str | torch.dtype) -> "VideoClassifier":
        """Cast the frozen image tower (the text tower stays fp32: it runs once per class list)."""
        self.clip.visual.to(resolve_clip_dtype(dtype, self.clip.visual.conv1.weight.device))
        return self

    def train(self, mode: bool = True) -> "VideoClassifier":
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
    def from_method_config(cls, clip: CLIP, config: dict, **kwargs) -> "VideoClassifier":
        raise NotImplementedError

    # ------------------------------------------------------------------ heads
    def set_class_embeddings(self, text_embeddings: torch.Tensor,
                             class_names: Sequence[str] | None = None) -> "VideoClassifier":
        """Use fixed class-text embeddings (C x E) as the classifier."""
        self.head_type, self.head = "text", None
        device = self.clip.logit_scale.device
        self.class_embeddings = text_embeddings.detach().float().to(device)
        self.class_names = list(class_names) if class_names is not None else None
        return self

    def set_class_names(self, class_names: Sequence[str], tokenizer, prompt: str = "") -> "VideoClassifier":
        """Embed ``prompt + name`` for every class with the frozen text tower and use it as the head."""
        tokens = tokenizer([f"{prompt}{name}" for name in class_names])
        return self.set_class_embeddings(self.encode_text(tokens), class_names)

    def set_linear_head(self, num_classes: int, class_names: Sequence[str] | None = None) -> "VideoClassifier":
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
    def save_pretrained(self, directory: str | os.PathLike, *, clip_path: str | os.PathLike | None = None
                        ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``clip.safetensors`` unless ``clip_path``).

        With ``clip_path`` (frozen-CLIP methods only) the CLIP weights are not copied: the folder
        refers to that file, which :func:`dist_video.load_clip` must read when it is loaded."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}
        if self.head_type == "text":
            tensors["class_embeddings"] = self.class_embeddings
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
            clip_sd = {k: v.detach().float().contiguous().cpu() for k, v in self.clip.state_dict().items()}
            _atomic_save_safetensors(clip_sd, directory / "clip.safetensors", save_file)
            meta["clip_weights"] = "clip.safetensors"
        else:
            meta["clip_weights"] = {"path": str(Path(clip_path).resolve())}
        _atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                 directory / "model.safetensors", save_file)
        tmp = directory / "config.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, directory / "config.json")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, clip: CLIP | None = None,
                        clip_dtype: str | torch.dtype | None = "auto",
                        map_location: str | torch.device = "cpu") -> "VideoClassifier":
        """Load a folder written by :meth:`save_pretrained` (any method)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory}: no config.json (not a dist-video model folder)")
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{cfg_path}: not a dist-video model (format={meta.get('format')!r})")
        model_cls = model_class(meta.get("method", "dist"))
        if cls is not VideoClassifier and not issubclass(model_cls, cls):
            raise ValueError(f"{cfg_path}: holds a {meta.get('method')!r} model, not {cls.__name__}")
        if clip is None:
            ref = meta["clip_weights"]
            if isinstance(ref, str):
                from .clip_loaders import clip_from_openai_state_dict
                clip = clip_from_openai_state_dict(load_file(directory / ref), config=CLIPConfig(**meta["clip"]),
                                                   source=str(directory / ref))
            else:
                from . import load_clip
                clip = load_clip(ref["path"], act=meta["clip"]["act"])
        model = model_cls.from_method_config(clip.to(map_location), meta["config"], clip_dtype=clip_dtype)
        tensors = load_file(directory / "model.safetensors", device=str(map_location))
        names = meta.get("class_names")
        if meta.get("head") == "text":
            model.set_class_embeddings(tensors.pop("class_embeddings"), names)
        elif meta.get("head") == "linear":
            model.set_linear_head(tensors["head.weight"].shape[0], names)
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
        _load_strict(model, own, tensors, str(directory / "model.safetensors"))
        return model


class DiSTVideoModel(VideoClassifier):
    """A video classifier: frozen CLIP on sparse frames + the DiST branch on dense frames.

    ``encode_video(B x 3 x T x H x W) -> B x E`` (not normalised);
    ``logits(video, text_embeddings C x E) -> B x C``;
    ``forward(video) -> B x C`` with the head set by :meth:`set_class_embeddings` /
    :meth:`set_class_names` (class-text head) or :meth:`set_linear_head` (learnable).
    """

    method = "dist"

    def __init__(self, clip: CLIP, config: DiSTConfig, *, clip_dtype: str | torch.dtype | None = "auto"):
        super().__init__(clip, clip_dtype=clip_dtype)
        self.config = config
        self.selected_layers = config.resolve_layers(clip.visual.num_layers)
        self.branch = DiSTBranch(config, clip.visual.width, clip.visual.patch_size, clip.embed_dim,
                                 self.selected_layers).to(clip.logit_scale.device)

    def method_config(self) -> dict:
        return {**self.config.to_dict(), "selected_layers": self.selected_layers}

    @classmethod
    def from_method_config(cls, clip: CLIP, config: dict, **kwargs) -> "DiSTVideoModel":
        return cls(clip, DiSTConfig.from_dict(config), **kwargs)

    @torch.no_grad()
    def clip_layers(self, video: torch.Tensor) -> dict[int, torch.Tensor]:
        """CLIP tokens of the sparse frames: B x 3 x T x H x W -> {layer: B*T' x (N+1) x D}."""
        frames = video[:, :, :: self.config.alpha]  # B x 3 x T' x H x W
        frames = frames.transpose(1, 2).flatten(0, 1)  # B*T' x 3 x H x W (frame index fastest)
        return self.clip.visual.forward_layers(frames.to(self.clip_dtype), self.selected_layers)

    @torch.no_grad()
    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP embeddings of the sparse frames: B x 3 x T x H x W -> B x T' x E."""
        frames = video[:, :, :: self.config.alpha].transpose(1, 2)
        b, t = frames.shape[:2]
        emb = self.clip.encode_image(frames.flatten(0, 1).to(self.clip_dtype))
        return emb.view(b, t, -1).float()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W (normalised dense frames) -> B x E video embedding (not normalised)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(video.shape)}")
        return self.branch(video, self.clip_layers(video))


def model_class(method: str) -> type[VideoClassifier]:
    """The classifier class of a method name (``dist`` or a baseline)."""
    if method == "dist":
        return DiSTVideoModel
    from . import baselines
    classes = {"frozen-mean": baselines.FrozenMeanClassifier, "full-finetune": baselines.FullFinetuneClassifier,
               "adapter": baselines.AdapterClassifier}
    if method not in classes:
        raise ValueError(f"unknown method {method!r}: expected dist, {', '.join(classes)}")
    return classes[method]


def _atomic_save_safetensors(tensors: dict, path: Path, save_file) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_strict(module: nn.Module, own: dict, state_dict: dict, source: str) -> None:
    """Load ``state_dict`` into ``module`` after checking it has exactly the keys/shapes of ``own``."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: weights do not match the model: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}")
    module.load_state_dict(state_dict, strict=False)
