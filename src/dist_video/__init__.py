"""dist-video: DiST (Disentangling Spatial and Temporal learning) video classifiers on frozen CLIP."""

__version__ = "0.1.0"

from .clip import CLIP, CLIPConfig
from .dist import DiSTConfig, PRESETS, cached_inference_weights
from .classifier import VideoClassifier, model_class
# Importing the methods' modules registers them with VideoClassifier (for from_pretrained).
from .model import DiSTVideoModel
from .baselines import AdapterClassifier, BaselineConfig, FrozenMeanClassifier, FullFinetuneClassifier
from .checkpoints import load_official_checkpoint
from .clip_loaders import load_clip
from .tokenizer import tokenize

__all__ = ["CLIP", "CLIPConfig", "DiSTConfig", "PRESETS", "DiSTVideoModel", "load_official_checkpoint",
           "__version__"]
__all__ += ["load_clip", "tokenize", "cached_inference_weights"]
__all__ += ["VideoClassifier", "model_class", "BaselineConfig", "FrozenMeanClassifier", "FullFinetuneClassifier",
            "AdapterClassifier"]
