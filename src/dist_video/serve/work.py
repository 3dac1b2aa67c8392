"""A request's work, run in its own thread: the probe-time checks, then decoding and the model,
stopping at the next frame or clip once the request's cancel flag is set."""

from __future__ import annotations

import math
import threading

from ..data.decoding import Cancelled, VideoDecodeError
from ..engine.predict import predict_file
from ..engine.timeline import video_timeline
from .batching import BatchingModel, LabelledModel
from .limits import check_upload
from .loading import ServedModel
from .requests import RequestError, RequestOptions
from .settings import ServeSettings

__all__ = ["run_request", "predict_upload", "non_finite"]


def run_request(batching: BatchingModel, served: ServedModel, settings: ServeSettings, path: str, name: str,
                options: RequestOptions, cancel: threading.Event) -> dict:
    """The ``predict --json`` entry of the upload at ``path`` (``name``: the client's name for
    it). Raises :class:`RequestError` (4xx for the request or the file, 500 for non-finite
    outputs) or :class:`Cancelled`; the messages name ``name``, never ``path``."""
    try:
        check_upload(path, name, options, settings, num_frames=batching.config.num_frames,
                     preprocess=served.preprocess)
        head = None
        if options.labels is not None:  # the text tower runs here, within the request's time limit
            try:
                head = served.label_heads.head(options.labels, options.prompt)
            except ValueError as e:
                raise RequestError(400, f"labels: {e}") from None
        model = LabelledModel(batching, head, options.labels, cancel=cancel)
        result = predict_upload(model, path, served.preprocess, options, settings, cancel)
    except VideoDecodeError as e:
        raise RequestError(422, f"{name}: not a readable video: {e.cause.replace(path, name)}") from None
    except (ValueError, RuntimeError, OSError, EOFError) as e:
        message = str(e).replace(path + ": ", "").replace(path, name) or type(e).__name__
        raise RequestError(422, f"{name}: {message}") from None
    if non_finite(result):
        raise RequestError(500, f"the model {served.name} gave non-finite outputs (NaN or infinity) for {name}: "
                                "its weights or its input are damaged")
    return {**result, "video": name}


def predict_upload(model, path: str, preprocess: dict, options: RequestOptions, settings: ServeSettings,
                   cancel: threading.Event) -> dict:
    """The views (``predict_file``) or the timeline of one file, as ``predict --json`` gives them.
    A cancel takes effect at the next packet the decoder reads, before each view's transform, and
    at the model; a timeline stops at the next frame."""
    if cancel.is_set():
        raise Cancelled("cancelled before decoding")
    if options.window is None:
        return predict_file(model, path, preprocess, topk=options.topk, views=options.views, cancel=cancel)
    timeline = video_timeline(model, path, preprocess, window=options.window, stride=options.stride,
                              max_windows=settings.max_windows, cancel=cancel)
    return timeline.to_dict(options.topk)


def non_finite(value) -> bool:
    """Whether a JSON-like value holds a float that is NaN or infinite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(non_finite(v) for v in value)
    return False
