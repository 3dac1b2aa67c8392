"""Video data pipeline: exact decoding, frame sampling, clip transforms, datasets, mixup.

The public entry points most code needs::

    from dist_video.data import probe, read_frames          # exact frame access
    from dist_video.data import SegmentSampler, TrainTransform, TestTransform, VideoClipDataset
    from dist_video.data import load_annotations             # Kinetics, SSv2, UCF101, HMDB51, CSV, folders
"""

from .annotations import (VIDEO_EXTENSIONS, AnnotationError, Annotations, MissingVideosError, VideoRecord,
                          load_annotations, parse_csv, parse_folder, parse_hmdb51, parse_kinetics, parse_ssv2,
                          parse_ucf101, read_class_list, readable_class_name)
from .datasets import VideoClipDataset, average_views, load_test_clips, write_bad_videos
from .decoding import (BackendUnavailableError, DecodeLimits, VideoDecodeError, VideoInfo, available_backends,
                       clear_probe_cache, probe, read_frame_list, read_frames)
from .mixup import MixupCutmix, one_hot_smoothed, soft_target_cross_entropy
from .sampling import IntervalSampler, SegmentSampler, build_sampler, interval_indices, segment_indices
from .transforms import CLIP_MEAN, CLIP_STD, TestTransform, TrainTransform, flip_label_map

__all__ = [
    "VideoInfo", "VideoDecodeError", "BackendUnavailableError", "DecodeLimits", "probe", "read_frames",
    "read_frame_list", "available_backends", "clear_probe_cache",
    "SegmentSampler", "IntervalSampler", "build_sampler", "segment_indices", "interval_indices",
    "TrainTransform", "TestTransform", "flip_label_map", "CLIP_MEAN", "CLIP_STD",
    "MixupCutmix", "one_hot_smoothed", "soft_target_cross_entropy",
    "VIDEO_EXTENSIONS", "VideoRecord", "Annotations", "AnnotationError", "MissingVideosError",
    "readable_class_name", "read_class_list", "parse_kinetics", "parse_ssv2", "parse_ucf101", "parse_hmdb51",
    "parse_csv", "parse_folder", "load_annotations", "VideoClipDataset", "write_bad_videos", "average_views",
    "load_test_clips",
]
