"""Video data pipeline: exact decoding, frame sampling, clip transforms, datasets, mixup."""

from .decoding import (BackendUnavailableError, VideoDecodeError, VideoInfo, available_backends,
                       clear_probe_cache, probe, read_frames)

__all__ = ["VideoInfo", "VideoDecodeError", "BackendUnavailableError", "probe", "read_frames",
           "available_backends", "clear_probe_cache"]
