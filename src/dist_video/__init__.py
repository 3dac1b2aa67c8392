"""dist-video: DiST (Disentangling Spatial and Temporal learning) video classifiers on frozen CLIP."""

__version__ = "0.1.0"

from .clip import CLIP, CLIPConfig
from .dist import DiSTConfig, PRESETS
from .classifier import VideoClassifier, model_class
# Importing the methods' modules registers them with VideoClassifier (for from_pretrained).
from .model import DiSTVideoModel
from .baselines import AdapterClassifier, BaselineConfig, FrozenMeanClassifier, FullFinetuneClassifier
from .checkpoints import load_official_checkpoint
from .clip_loaders import load_clip
from .tokenizer import tokenize
from .loading import LoadedModel, load_model


def fuse(model: VideoClassifier, dtype=None, *, compile: bool = False, **kwargs):
    """The inference form of ``model`` (``model.fuse(dtype, ...)``): a new inference-only
    module computing what ``model.eval()`` computes under ``torch.no_grad()``, with every fold
    made once (see :mod:`dist_video.fused`). ``compile``: wrapped in ``torch.compile`` (the
    first call per input shape compiles)."""
    fused = model.fuse(dtype, **kwargs)
    if compile:
        import torch

        return torch.compile(fused)
    return fused


def watch(model, source, **kwargs):
    """Rolling predictions on live input: :func:`dist_video.live.watch` (imported when called, so
    that ``import dist_video`` does not load the video decoders)."""
    from .live import watch as watch_source

    return watch_source(model, source, **kwargs)


__all__ = ["CLIP", "CLIPConfig", "DiSTConfig", "PRESETS", "DiSTVideoModel", "load_official_checkpoint",
           "__version__"]
__all__ += ["load_clip", "tokenize", "fuse", "load_model", "LoadedModel"]
__all__ += ["watch"]
__all__ += ["VideoClassifier", "model_class", "BaselineConfig", "FrozenMeanClassifier", "FullFinetuneClassifier",
            "AdapterClassifier"]
