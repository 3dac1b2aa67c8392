"""A prediction server: ``POST /predict`` a video, get the JSON of ``dist-video predict --json``.

One copy of the model (a model folder's fused inference form, or an exported folder run by
onnxruntime) is owned by one worker thread. Each request's work runs in a thread of its own and
hands its clips to that worker through a queue; the worker runs every clip waiting at that
moment as one batch (:class:`BatchingModel`), so concurrent requests share forward passes
instead of each holding a model.

What the server accepts is bounded (:class:`ServeSettings`, listed with the threat model in
``docs/deploy.md``): headers must arrive within ``header_timeout`` and the body within
``upload_timeout`` (408); an upload larger than ``max_upload_bytes`` gets 413; once its body has
arrived a request joins the queue (more than ``max_queue`` waiting behind ``max_concurrent``
working get 503) and has ``timeout`` seconds (504, and its work is cancelled; its place is
given back only when the work has stopped). Before decoding, the upload is probed: frame size,
views x frames, decoded bytes and the window count are bounded (400 naming the bound), a file
whose header lists frames it does not hold is truncated (422). ``Host`` and ``Origin`` must
name the server (DNS rebinding, cross-site requests). Uploads are written to a private
temporary folder (mode 0700) under names the server makes, and deleted when the work ends;
the name a client gives its file only labels the answer. Every error is a JSON
``{"error": "..."}`` with a 4xx/5xx status, and the server keeps serving. It binds to loopback
unless told otherwise; with a token, every route but the page needs ``Authorization: Bearer``.

Per-request labels: a model with a class-text head (and a tokenizer for its text tower) keeps
its CLIP text tower beside the one fused model (:class:`LabelHeads`). A request naming
``labels`` gets the class-text head of those names, made once per distinct label set and prompt
(an LRU cache of ``max_label_sets`` heads) in the request's thread, within its time limit; the
worker runs every waiting clip through the shared model's ``encode_video`` as one batch and
applies each request's own head to its rows (the shared model is never changed per request).

Routes: ``GET /`` the page (pick a video, watch it, top classes as bars, the timeline of a long
video), ``GET /health`` (model, classes, device, runtime, whether per-request labels are
accepted, requests and work threads in progress), ``POST /predict`` (multipart field ``video``
or the raw body; ``topk``, ``views``, ``window``, ``stride``, ``labels``, ``prompt`` as query
or form fields).

Units: :mod:`.settings` (the bounds), :mod:`.loading` (the model), :mod:`.labels` (label
heads), :mod:`.batching` (the shared model), :mod:`.requests` (a request's options),
:mod:`.limits` (probe-time checks), :mod:`.work` (a request's work), :mod:`.runner` (queue,
slots, cancellation), :mod:`.middleware` and :mod:`.protocol` (Host/Origin, body size, header
timeout), :mod:`.page`, :mod:`.app` (the routes), :mod:`.server` (uvicorn).
"""

from .app import create_app
from .batching import BatchingModel, LabelledModel
from .labels import LabelHeads
from .loading import ServedModel, load_served_model
from .middleware import BodySizeLimit, HostCheck
from .requests import RequestError, RequestOptions, parse_request_labels
from .server import run_server
from .settings import LOOPBACK_HOSTS, ServeSettings

__all__ = ["ServeSettings", "ServedModel", "BatchingModel", "LabelHeads", "LabelledModel", "BodySizeLimit",
           "HostCheck", "RequestError", "RequestOptions", "load_served_model", "parse_request_labels", "create_app",
           "run_server", "LOOPBACK_HOSTS"]
