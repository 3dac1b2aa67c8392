"""dist-video: DiST (Disentangling Spatial and Temporal learning) video classifiers on frozen CLIP."""

__version__ = "0.1.0"
