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

__all__ = ["DiSTVideoModel", "resolve_clip_dtype", "bf16_supported"]

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


class DiSTVideoModel(nn.Module):
    """A video classifier: frozen CLIP on sparse frames + the DiST branch on dense frames.

    ``encode_video(B x 3 x T x H x W) -> B x E`` (not normalised);
    ``logits(video, text_embeddings C x E) -> B x C``;
    ``forward(video) -> B x C`` with the head set by :meth:`set_class_embeddings`
    (class-text head) or :meth:`set_linear_head` (learnable linear head).
    """

    def __init__(self, clip: CLIP, config: DiSTConfig, *, clip_dtype: str | torch.dtype | None = "auto"):
        super().__init__()
        self.clip = clip
        self.config = config
        self.selected_layers = config.resolve_layers(clip.visual.num_layers)
        self.branch = DiSTBranch(config, clip.visual.width, clip.visual.patch_size, clip.embed_dim,
                                 self.selected_layers)
        self.class_names: list[str] | None = None
        self.head_type: str | None = None
        self.head: nn.Module | None = None
        self.register_buffer("class_embeddings", None, persistent=False)
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.set_clip_dtype(resolve_clip_dtype(clip_dtype, next(clip.parameters()).device))

    # ------------------------------------------------------------------ frozen CLIP
    @property
    def clip_dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    def set_clip_dtype(self, dtype: str | torch.dtype) -> "DiSTVideoModel":
        """Cast the frozen image tower (the text tower stays fp32: it runs once per class list)."""
        self.clip.visual.to(resolve_clip_dtype(dtype, self.clip.visual.conv1.weight.device))
        return self

    def train(self, mode: bool = True) -> "DiSTVideoModel":
        super().train(mode)
        self.clip.eval()  # frozen: no dropout / no statistics updates, whatever the mode
        return self

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

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP text embeddings: C x L token ids -> C x E."""
        return self.clip.encode_text(tokens).float()

    # ------------------------------------------------------------------ DiST
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W (normalised dense frames) -> B x E video embedding (not normalised)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video batch B x 3 x T x H x W, got shape {tuple(video.shape)}")
        return self.branch(video, self.clip_layers(video))

    def logits(self, video: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits scaled by CLIP's frozen ``logit_scale``: -> B x C."""
        z = F.normalize(self.encode_video(video), dim=-1)
        text = F.normalize(text_embeddings.to(z.dtype), dim=-1)
        return self.clip.logit_scale.detach().exp().to(z.dtype) * z @ text.t()

    # ------------------------------------------------------------------ heads
    def set_class_embeddings(self, text_embeddings: torch.Tensor,
                             class_names: Sequence[str] | None = None) -> "DiSTVideoModel":
        """Use fixed class-text embeddings (C x E) as the classifier."""
        self.head_type, self.head = "text", None
        self.class_embeddings = text_embeddings.detach().float().to(self.branch.proj.device)
        self.class_names = list(class_names) if class_names is not None else None
        return self

    def set_class_names(self, class_names: Sequence[str], tokenizer, prompt: str = "") -> "DiSTVideoModel":
        """Embed ``prompt + name`` for every class with the frozen text tower and use it as the head."""
        tokens = tokenizer([f"{prompt}{name}" for name in class_names])
        return self.set_class_embeddings(self.encode_text(tokens), class_names)

    def set_linear_head(self, num_classes: int, class_names: Sequence[str] | None = None) -> "DiSTVideoModel":
        """A learnable linear head E -> C (for classes whose names mean nothing to CLIP)."""
        head = nn.Linear(self.clip.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.head_type, self.head = "linear", head.to(self.branch.proj.device)
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

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Video embeddings B x E -> class logits B x C with the current head."""
        if self.head_type == "text":
            z = F.normalize(z, dim=-1)
            text = F.normalize(self.class_embeddings.to(z.dtype), dim=-1)
            return self.clip.logit_scale.detach().exp().to(z.dtype) * z @ text.t()
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

        With ``clip_path`` the CLIP weights are not copied: the folder refers to that file, which
        :func:`dist_video.load_clip` must be able to read when the folder is loaded."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"branch.{k}": v for k, v in self.branch.state_dict().items()}
        if self.head_type == "linear":
            tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        elif self.head_type == "text":
            tensors["class_embeddings"] = self.class_embeddings
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dist": self.config.to_dict(),
            "selected_layers": self.selected_layers,
            "clip": self.clip.config.to_dict(),
            "head": self.head_type,
            "class_names": self.class_names,
        }
        if clip_path is None:
            clip_sd = {k: v.float() for k, v in self.clip.state_dict().items()}
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
                        map_location: str | torch.device = "cpu") -> "DiSTVideoModel":
        """Load a folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory}: no config.json (not a dist-video model folder)")
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{cfg_path}: not a dist-video model (format={meta.get('format')!r})")
        if clip is None:
            ref = meta["clip_weights"]
            if isinstance(ref, str):
                from .clip_loaders import clip_from_openai_state_dict
                clip_cfg = CLIPConfig(**meta["clip"])
                clip = clip_from_openai_state_dict(load_file(directory / ref), config=clip_cfg,
                                                   source=str(directory / ref))
            else:
                from . import load_clip
                clip = load_clip(ref["path"], act=meta["clip"]["act"])
        config = DiSTConfig.from_dict(meta["dist"])
        config.selected_layers = meta["selected_layers"]
        model = cls(clip.to(map_location), config, clip_dtype=clip_dtype)
        tensors = load_file(directory / "model.safetensors", device=str(map_location))
        branch_sd = {k[len("branch."):]: v for k, v in tensors.items() if k.startswith("branch.")}
        _load_strict(model.branch, branch_sd, str(directory / "model.safetensors"))
        names = meta.get("class_names")
        if meta.get("head") == "text":
            model.set_class_embeddings(tensors["class_embeddings"], names)
        elif meta.get("head") == "linear":
            model.set_linear_head(tensors["head.weight"].shape[0], names)
            model.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        return model


def _atomic_save_safetensors(tensors: dict, path: Path, save_file) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_strict(module: nn.Module, state_dict: dict, source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: DiST weights do not match the model: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}")
    module.load_state_dict(state_dict)
