"""Run configuration: typed dataclasses, YAML presets and dotted command-line overrides.

A configuration is built in layers: the dataclass defaults, then a preset or ``--config``
YAML file (which may name a ``base`` preset or file it extends), then ``--set key=value``
overrides. Every key is checked against the dataclasses: an unknown or mistyped key is an
error that names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from .dist import DiSTConfig, checkpointing_mode

__all__ = [
    "ModelConfig", "DataConfig", "AugmentConfig", "OptimConfig", "TrainConfig", "EvalConfig",
    "Config", "ConfigError", "load_config", "list_presets", "preset_path", "apply_overrides",
    "config_to_dict", "config_from_dict", "save_config",
]


class ConfigError(ValueError):
    """A configuration problem, with the offending key and where it came from."""


@dataclass
class ModelConfig:
    """What to build. ``clip``: CLIP weights (any format :func:`dist_video.load_clip` reads) or
    ``builtin:digits`` for the bundled image encoder."""

    method: str = "dist"  # dist | frozen-mean | full-finetune | adapter
    clip: str = ""
    clip_act: str | None = None  # None: the format's default
    vocab: str | None = None  # BPE vocabulary; None: searched beside the checkpoint etc.
    # frozen CLIP precision: auto (bf16 where the run's device has it natively, fp16 on CUDA GPUs
    # older than Ampere, else fp32) | bf16 | fp16 | fp32
    clip_dtype: str = "auto"
    head: str = "text"  # text: class names through CLIP's text tower | linear: learnable
    prompt: str = ""  # prefix before each class name for the text head, e.g. "a video of "
    init: str | None = None  # authors' .pyth checkpoint or a dist-video model folder to start from
    # a dist-video model folder or an authors' .pyth (e.g. a Kinetics-710 model) to start from:
    # every weight but the head must match in shape; a folder's head rows are carried over by class
    # name through the Kinetics label map (dist_video.label_maps.init_from); a text head is
    # recomputed for the names
    init_from: str | None = None
    dist: DiSTConfig = field(default_factory=DiSTConfig)
    adapter_dim: int = 64  # bottleneck width of the `adapter` baseline
    adapter_kernel: int = 3  # temporal kernel of the `adapter` baseline
    # DiST: activations recomputed in backward instead of stored: off (false) | selective (the
    # stem, integration blocks and pooling) | full (true: everything, ~1 more branch forward).
    # Applied with model.set_grad_checkpointing; the baselines only take off.
    activation_checkpointing: bool | str = False

    def __post_init__(self):
        checkpointing_mode(self.activation_checkpointing)  # a bad value stops the run here
        if self.init and self.init_from:
            raise ValueError("set model.init (the whole model, head included) or model.init_from "
                             "(weights, head rows by class name), not both")


@dataclass
class AugmentConfig:
    """Training augmentation (the paper's defaults) and batch-level mixing."""

    scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_p: float = 0.8  # probability of applying colour jitter to a clip
    grayscale_p: float = 0.2
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class DataConfig:
    """Where the videos are and how clips are cut from them.

    ``format``: kinetics | ssv2 | ucf101 | hmdb51 | csv | folder. ``root``: the videos;
    ``train``/``val``: the annotation files (or sub-folders for ``folder``);
    ``classes``: an optional class-name list file (one per line)."""

    format: str = "csv"
    root: str = ""
    train: str = ""
    val: str = ""
    classes: str | None = None
    split: int = 1  # UCF101 / HMDB51 official split 1, 2 or 3
    sampling: str = "segment"  # segment | interval
    interval: int = 4  # frame stride for interval sampling
    crop_size: int = 224
    test_scale: int = 224  # short side before the test crop(s)
    num_views: int = 3  # temporal views at test time
    num_crops: int = 1  # spatial crops at test time (1 or 3)
    workers: int = 8
    preload: bool = False  # decode every video once into memory (small datasets: the demo)
    on_error: str = "error"  # error | skip (bad videos)
    # training clips cut from one decode of a video, each sampled and augmented on its own;
    # train.batch_size still counts clips (a multiple of this); an epoch visits every video once
    clips_per_video: int = 1
    # independent: each clip its own frames | shared: the clips share one sample of frames and
    # differ in augmentation only (VideoMAE's num_sample, MAE-ST's repeated augmentation)
    clip_frames: str = "independent"
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    def __post_init__(self):
        if self.clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {self.clips_per_video}")
        if self.clip_frames not in ("independent", "shared"):
            raise ValueError(f"clip_frames must be 'independent' or 'shared', got {self.clip_frames!r}")


@dataclass
class OptimConfig:
    """AdamW with a x``branch_lr_mult`` learning rate on the DiST branch, cosine schedule."""

    lr: float = 3.2e-5  # base learning rate for a global batch of ``base_batch_size``
    base_batch_size: int = 256
    scale_lr: bool = False  # linear scaling of lr with the global batch (off: the paper's batch)
    branch_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: int = 36
    warmup_epochs: float = 6
    warmup_start_lr: float = 8e-8
    min_lr: float = 8e-8
    grad_clip: float | None = 1.0


@dataclass
class TrainConfig:
    """The training loop."""

    batch_size: int = 32  # clips per device per step
    accumulation: int = 1  # steps whose gradients add up to one optimizer update
    global_batch_size: int = 0  # >0: derive `accumulation` = this / (batch_size x processes)
    # the trainable branch's autocast: auto (bf16 where native, fp16 + loss scaling on older GPUs,
    # else fp32) | bf16 | fp16 | fp32
    precision: str = "auto"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    log_every: int = 10  # steps between metric lines in metrics.jsonl
    nonfinite_loss: str = "stop"  # stop | skip
    max_steps: int = 0  # stop after this many optimizer updates (0: no limit); for smoke tests
    # torch.compile the training forward (same parameters and checkpoints; the first steps pay the
    # compilation). Off by default until a GPU measurement says it pays off.
    compile: bool = False


@dataclass
class EvalConfig:
    batch_size: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/dist"


# ---------------------------------------------------------------------------- typed building

def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, sections included."""
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, prefix + name + "."))
    return keys + (["model.dist_preset"] if cls is Config else [])


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nearest(key: str, candidates: list[str]) -> str:
    """``; did you mean 'x'?`` for the closest valid key: the same name in another section
    first, then the closest full key, then the closest name."""
    tail = key.rsplit(".", 1)[-1]
    near = [c for c in candidates if c.rsplit(".", 1)[-1] == tail and c != key]
    near = near or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not near:
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.5)
        near = [tails[close[0]]] if close else []
    return f"; did you mean '{near[0]}'?" if near else ""


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: cannot be {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return _build(tp, value, source, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3.2e-5 as a float but 1e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _build(cls, data: dict, source: str, prefix: str = ""):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(f"{source}: unknown key '{key}'{_nearest(key, _all_keys(Config))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from e


def config_to_dict(cfg) -> dict:
    """A plain dict (YAML-ready) of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "config") -> Config:
    """A :class:`Config` from nested dicts, every key and type checked."""
    return _build(Config, data or {}, source)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "dist_preset":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------- presets and files

def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    folder = resources.files("dist_video") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    folder = resources.files("dist_video") / "presets"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        presets = list_presets()
        near = difflib.get_close_matches(name, presets, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (presets: {', '.join(presets)})")
    return Path(str(path))


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A YAML file as a dict, with its ``base`` (a preset name or a relative path) merged under it."""
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(map(str, seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base:
        base_path = (path.parent / base) if str(base).endswith((".yaml", ".yml")) else preset_path(str(base))
        data = _merge(_read_yaml(base_path, seen + (path,)), data)
    return data


def _expand_dist_preset(data: dict, source: str) -> dict:
    """``model.dist_preset: k400-vit-b16-8+16f`` fills ``model.dist`` from :data:`PRESETS`."""
    model = data.get("model")
    if isinstance(model, dict) and "dist_preset" in model:
        model = dict(model)
        name = model.pop("dist_preset")
        try:
            preset = DiSTConfig.from_preset(name).to_dict()
        except KeyError as e:
            raise ConfigError(f"{source}: model.dist_preset: {e.args[0]}") from None
        model["dist"] = _merge(preset, model.get("dist") or {})
        data = {**data, "model": model}
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (the keys are validated when the Config is built)."""
    data = _merge({}, data)
    valid = _all_keys(Config)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if key not in valid:
            raise ConfigError(f"--set {text}: unknown key '{key}'{_nearest(key, valid)}")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults <- preset <- config file <- overrides, validated."""
    data: dict = {}
    sources = []
    if preset:
        data = _merge(data, _read_yaml(preset_path(preset)))
        sources.append(f"preset {preset}")
    if config_file:
        data = _merge(data, _read_yaml(Path(config_file)))
        sources.append(str(config_file))
    source = " + ".join(sources) or "defaults"
    data = _expand_dist_preset(data, source)
    if overrides:
        data = apply_overrides(data, overrides)
        data = _expand_dist_preset(data, "--set")
        source += " + --set"
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
