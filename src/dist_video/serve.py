"""A prediction server: ``POST /predict`` a video, get the JSON of ``dist-video predict --json``.

One copy of the model (a model folder's fused inference form, or an exported folder run by
onnxruntime) is owned by one worker thread. Requests decode their upload in their own thread
and hand their clips to that worker through a queue; the worker runs every clip waiting at
that moment as one batch (:class:`BatchingModel`), so concurrent requests share forward passes
instead of each holding a model.

What the server accepts is bounded (:class:`ServeSettings`): an upload larger than
``max_upload_bytes`` gets 413 (checked on ``Content-Length`` and again on the bytes received),
a request running longer than ``timeout`` gets 504, more than ``max_concurrent`` requests at
once wait in line and more than ``max_queue`` waiting get 503. Uploads are written to a private
temporary folder (mode 0700) under names the server makes, and deleted when the request ends;
the name a client gives its file only labels the answer. Every error is a JSON
``{"error": "..."}`` with a 4xx/5xx status, and the server keeps serving. It binds to loopback
unless told otherwise; with a token, every route but the page needs ``Authorization: Bearer``.

Per-request labels: a model with a class-text head (and a tokenizer for its text tower) keeps
its CLIP text tower beside the one fused model (:class:`LabelHeads`). A request naming
``labels`` gets the class-text head of those names, made once per distinct label set and prompt
(an LRU cache of ``max_label_sets`` heads) off the event loop, within the request's time limit;
the worker runs every waiting clip through the shared model's ``encode_video`` as one batch and
applies each request's own head to its rows (the shared model is never changed per request).

Routes: ``GET /`` the page (pick a video, watch it, top classes as bars, the timeline of a long
video), ``GET /health`` (model, classes, device, runtime, whether per-request labels are
accepted), ``POST /predict`` (multipart field ``video`` or the raw body; ``topk``, ``views``,
``window``, ``stride``, ``labels``, ``prompt`` as query or form fields).
"""
# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time.

import asyncio
import hmac
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["ServeSettings", "ServedModel", "BatchingModel", "LabelHeads", "LabelledModel", "BodySizeLimit",
           "load_served_model", "parse_request_labels", "create_app", "run_server", "LOOPBACK_HOSTS"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
EXPORTED_LABELS_REFUSAL = ("an exported model has a fixed class list; labels need a model folder, an authors' "
                           ".pyth or CLIP weights")


@dataclass
class ServeSettings:
    """The server's bounds and its access rule."""

    token: str | None = None
    max_upload_bytes: int = 200 * 1024 ** 2
    timeout: float = 120.0          # seconds per request, upload and prediction together
    max_concurrent: int = 2         # requests decoding / predicting at once
    max_queue: int = 32             # requests waiting for one of those places; more get 503
    max_batch: int = 16             # clips per forward pass of the model
    max_topk: int = 50
    max_labels: int = 1000          # label names per request
    max_label_chars: int = 200      # characters per label name, and of a prompt
    max_label_sets: int = 16        # class-text heads kept (LRU) for the label sets requests name


@dataclass
class ServedModel:
    """The model a server answers with: ``model`` has the interface of the prediction functions
    (callable on B x 3 x T x H x W -> logits, ``class_names``, ``num_classes``, ``config``)."""

    model: object
    preprocess: dict
    name: str
    runtime: str
    device: str
    method: str | None = None
    extra: dict = field(default_factory=dict)
    label_heads: "LabelHeads | None" = None   # per-request labels; None: not accepted ...
    labels_refusal: str | None = None         # ... for this reason


class LabelHeads:
    """Class-text heads for the label sets requests name, made with the model's text tower
    (kept once, beside the fused model) exactly as ``predict --labels`` makes its head: the
    names embedded under the prompt templates (:func:`dist_video.prompts.label_embeddings`),
    then ``make_head`` (the fused model's :meth:`~dist_video.fused.FusedDiSTModel.text_head`).
    The last ``max_sets`` heads are kept (least recently used dropped first); thread-safe."""

    def __init__(self, encode_text, tokenizer, make_head, max_sets: int = 16, default_prompt: str | None = None):
        self.encode_text = encode_text
        self.default_prompt = default_prompt
        self.tokenizer = tokenizer
        self.make_head = make_head
        self.max_sets = max(1, int(max_sets))
        self.made = 0
        self._heads: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def head(self, names: list[str], prompt: str | None = None):
        """The head scoring ``names`` (in this order) under ``prompt`` (a template or prefix;
        None: the server's ``--prompt`` if it was given, else CLIP's Kinetics prompt ensemble)."""
        from .prompts import label_embeddings, templates_of

        key = (tuple(names), tuple(templates_of(self.default_prompt if prompt is None else prompt)))
        with self._lock:  # one label set encoded at a time; a set asked twice at once is encoded once
            head = self._heads.get(key)
            if head is None:
                head = self.make_head(label_embeddings(self.encode_text, self.tokenizer, list(names), list(key[1])))
                self.made += 1
                self._heads[key] = head
                while len(self._heads) > self.max_sets:
                    self._heads.popitem(last=False)
            else:
                self._heads.move_to_end(key)
            return head

    def __len__(self) -> int:
        return len(self._heads)


def load_served_model(model_path: str, *, clip: str | None = None, classes: str | None = None,
                      labels: str | None = None, vocab: str | None = None, prompt: str | None = None,
                      device: str = "auto", clip_dtype: str = "auto", max_label_sets: int = 16,
                      num_frames: int = 8) -> ServedModel:
    """An exported folder (onnxruntime) or a model folder / ``.pyth`` (its fused inference form;
    the unfused model is dropped once fused, so one copy of the weights stays in memory). A model
    with a class-text head keeps its CLIP text tower (not its unfused image tower) for
    per-request labels (:class:`LabelHeads`, keeping ``max_label_sets`` heads); otherwise
    ``labels_refusal`` says why requests cannot name labels. A request's labels use its own
    ``prompt``, else ``prompt`` (the server's), else the prompt ensemble. ``num_frames``: frames
    per clip for plain CLIP weights."""
    from .onnx_runner import OnnxVideoClassifier, is_exported_folder

    path = Path(model_path)
    if is_exported_folder(path):
        if labels is not None:
            raise ValueError(f"{model_path}: {EXPORTED_LABELS_REFUSAL}")
        runner = OnnxVideoClassifier(path)
        return ServedModel(runner, dict(runner.preprocess), runner.name, "onnxruntime", "cpu", runner.method,
                           labels_refusal=EXPORTED_LABELS_REFUSAL)
    from .engine.predict import labels_refusal, load_for_inference
    from .prompts import text_tokenizer

    model, preprocess = load_for_inference(model_path, clip=clip, classes=classes, labels=labels, vocab=vocab,
                                           prompt=prompt, device=device, clip_dtype=clip_dtype, num_frames=num_frames)
    fused = model.fuse()
    refusal = labels_refusal(model, option="labels")
    tokenizer = None
    if refusal is None:
        try:
            tokenizer = text_tokenizer(model.clip, vocab=vocab, checkpoint=path)
        except ValueError as e:
            refusal = f"no tokenizer for the model's text tower: {e}"
    heads = None
    if refusal is None:
        text_tower = model.clip
        text_tower.visual = None  # the image tower lives on, fused: only the text tower stays beside it
        logit_scale = float(text_tower.logit_scale)

        def encode_text(tokens: torch.Tensor) -> torch.Tensor:  # as VideoClassifier.encode_text
            return text_tower.encode_text(tokens).float()

        heads = LabelHeads(encode_text, tokenizer, lambda embeddings: fused.text_head(embeddings, logit_scale),
                           max_sets=max_label_sets, default_prompt=prompt)
    else:
        logger.info("per-request labels are not accepted: %s", refusal)
    del model
    device_name = str(next(fused.buffers()).device)
    name = path.name if path.is_dir() else path.stem
    return ServedModel(fused, preprocess, name, "pytorch", device_name, getattr(fused, "method", None),
                       label_heads=heads, labels_refusal=refusal)


class BatchingModel:
    """One model shared by many threads: each call ``model(video)`` (B_i x 3 x T x H x W) waits
    in a queue; one worker thread runs all the calls waiting at once as one batch (up to
    ``max_batch`` clips, calls of the same clip shape), and hands each caller its rows of the
    logits. It has the same interface as the model (``class_names``, ``num_classes``, ``config``).

    ``model(video, head)``: that call's logits through its own class head (a fused model's
    :meth:`~dist_video.fused.FusedDiSTModel.text_head`). For a model with ``classify`` (the
    fused forms), the batch goes through ``encode_video`` once, whatever heads its calls have,
    and each call's rows through its head (or the model's own); the model is never changed."""

    def __init__(self, model, max_batch: int = 16):
        self.model = model
        self.max_batch = max_batch
        self.class_names = model.class_names
        self.num_classes = model.num_classes
        self.config = model.config
        buffers = getattr(model, "buffers", None)
        self.device = next(buffers()).device if callable(buffers) else torch.device("cpu")
        self.separate_heads = all(callable(getattr(model, name, None)) for name in ("encode_video", "classify"))
        self.batches_run = 0
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="dist-video-model", daemon=True)
        self._thread.start()

    def __call__(self, video: torch.Tensor, head=None) -> torch.Tensor:
        if head is not None and not self.separate_heads:
            raise ValueError("this model cannot take another class head (it has no classify method)")
        if video.dim() == 4:
            video = video.unsqueeze(0)
        done: Future = Future()
        self._jobs.put((video, head, done))
        return done.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _take(self) -> list | None:
        """The next job and every other job already waiting, up to ``max_batch`` clips."""
        first = self._jobs.get()
        if first is None:
            return None
        jobs, clips = [first], first[0].shape[0]
        while clips < self.max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            jobs.append(job)
            clips += job[0].shape[0]
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            groups: dict[tuple, list] = {}
            for job in jobs:
                groups.setdefault(tuple(job[0].shape[1:]), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list) -> None:
        jobs = [(v, h, f) for v, h, f in jobs if f.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            with torch.no_grad():
                batch = torch.cat([v for v, _, _ in jobs]).to(self.device)
                if self.separate_heads:  # one encode for the batch, each call's rows through its own head
                    embeddings, logits, start = self.model.encode_video(batch), [], 0
                    for video, head, _ in jobs:
                        rows = embeddings[start:start + video.shape[0]]
                        logits.append(self.model.classify(rows, head).float().cpu())
                        start += video.shape[0]
                else:
                    out = self.model(batch).float().cpu()
                    bounds = torch.tensor([v.shape[0] for v, _, _ in jobs]).cumsum(0).tolist()
                    logits = [out[end - v.shape[0]:end] for (v, _, _), end in zip(jobs, bounds)]
            self.batches_run += 1
        except Exception as e:  # every caller of this batch gets the error; the worker goes on
            for _, _, f in jobs:
                f.set_exception(e)
            return
        for (_, _, f), result in zip(jobs, logits):
            f.set_result(result)


class LabelledModel:
    """A request's view of a :class:`BatchingModel` that classifies into its own label names
    through ``head`` (the interface of the prediction functions: callable, ``class_names``,
    ``num_classes``, ``config``, ``device``)."""

    def __init__(self, batching: BatchingModel, head, class_names: list[str]):
        self.batching = batching
        self.head = head
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.config = batching.config
        self.device = batching.device

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.batching(video, self.head)


class BodySizeLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413, from its
    ``Content-Length`` before anything is read, or once that many bytes have arrived (the rest
    of the body is read and dropped, up to ``drain_bytes``, so that the client sees the answer)."""

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 4 * max_bytes

    async def _reply_413(self, send, received: int | None) -> None:
        import json

        detail = (f"the upload is larger than the limit of {self.max_bytes} bytes"
                  + (f" ({received} bytes)" if received is not None else ""))
        body = json.dumps({"error": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= self.drain_bytes:
                await self._drain(receive, 0)
            return await self._reply_413(send, int(length))
        received = 0
        too_large = False
        started = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            pass
        if too_large and not started:
            await self._drain(receive, received)
            await self._reply_413(send, None)

    async def _drain(self, receive, already: int) -> None:
        total = already
        while total <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class _BodyTooLarge(Exception):
    pass


def _page() -> str:
    from importlib import resources

    return (resources.files("dist_video") / "assets" / "serve" / "index.html").read_text()


def _int_option(value, name: str, low: int, high: int) -> int | None:
    from fastapi import HTTPException

    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{name} must be an integer, got {str(value)[:40]!r}") from None
    if not low <= number <= high:
        raise HTTPException(400, f"{name} must be between {low} and {high}, got {number}")
    return number


def _float_option(value, name: str) -> float | None:
    from fastapi import HTTPException

    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{name} must be a number of seconds, got {str(value)[:40]!r}") from None
    if not number > 0:
        raise HTTPException(400, f"{name} must be positive, got {number}")
    return number


def parse_request_labels(text: str, *, max_labels: int = 1000, max_chars: int = 200) -> list[str]:
    """A request's ``labels``: names separated by commas (``"juggling, archery"``) or, when the
    text has a line break, one per line (as the lines of ``--labels FILE``; the text is never a
    path). Raises ``ValueError`` naming the problem: no names, more than ``max_labels``, a name
    longer than ``max_chars`` or with control characters, a name given twice."""
    from .prompts import parse_labels

    if not isinstance(text, str):
        raise ValueError("labels must be text (names separated by commas, or one per line)")
    parts = text.splitlines() if ("\n" in text or "\r" in text) else text.split(",")
    names = [part.strip() for part in parts if part.strip()]
    if not names:
        raise ValueError("labels: no label names (give names separated by commas, or one per line)")
    if len(names) > max_labels:
        raise ValueError(f"labels: {len(names)} names, more than the limit of {max_labels}")
    for name in names:
        if len(name) > max_chars:
            raise ValueError(f"labels: the name {name[:40]!r}... is longer than the limit of {max_chars} characters")
        if not name.isprintable():
            raise ValueError(f"labels: the name {name[:40]!r} has control characters")
    try:
        return parse_labels(names)
    except ValueError as e:
        raise ValueError(f"labels: {e}") from None


def _prompt_option(value, max_chars: int) -> str | None:
    """A request's ``prompt`` (a template with one ``{}``, or a prefix); empty: not given."""
    from fastapi import HTTPException

    if value is None or not isinstance(value, str) or not value.strip():
        return None
    if len(value) > max_chars:
        raise HTTPException(400, f"prompt: longer than the limit of {max_chars} characters")
    if not value.isprintable():
        raise HTTPException(400, "prompt: has control characters")
    if value.count("{}") > 1 or "{" in value.replace("{}", "", 1) or "}" in value.replace("{}", "", 1):
        raise HTTPException(400, f"prompt: {value[:40]!r} is not a template with one '{{}}' (where the label goes) "
                                 "or a prefix without braces")
    return value


def _display_name(filename: str | None) -> str:
    """The client's name for its file, kept only as a label (never a path on the server)."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "".join(ch for ch in name if ch.isprintable())[:200] or "upload"


def predict_upload(model, path: str, preprocess: dict, *, topk: int, views: int | None,
                   window: float | None, stride: float | None) -> dict:
    """The ``predict --json`` entry of one file (raises on a file that cannot be read)."""
    from .engine.predict import predict_file

    return predict_file(model, path, preprocess, topk=topk, views=views, window=window, stride=stride)


def _require_serve_extra() -> None:
    from importlib.util import find_spec

    needed = {"fastapi": ["fastapi"], "uvicorn": ["uvicorn"], "python-multipart": ["python_multipart", "multipart"]}
    missing = [name for name, modules in needed.items() if not any(find_spec(m) for m in modules)]
    if missing:
        raise RuntimeError(f"serving needs the serve extra ({', '.join(missing)} missing): "
                           "pip install 'dist-video[serve]'")


def create_app(served: ServedModel, settings: ServeSettings | None = None):
    """The FastAPI application answering with ``served`` under ``settings``."""
    _require_serve_extra()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .data.decoding import VideoDecodeError

    settings = settings or ServeSettings()
    state: dict = {"in_flight": 0}

    @asynccontextmanager
    async def lifespan(app):
        state["tmp"] = tempfile.mkdtemp(prefix="dist-video-serve-")  # mode 0700: this user's only
        state["model"] = BatchingModel(served.model, max_batch=settings.max_batch)
        state["gate"] = asyncio.Semaphore(settings.max_concurrent)
        try:
            yield
        finally:
            state["model"].close()
            shutil.rmtree(state["tmp"], ignore_errors=True)

    app = FastAPI(title="dist-video", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def any_error(request, exc):
        logger.exception("error while answering %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    def authorize(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.get("/health")
    async def health(request: Request):
        authorize(request)
        model = served.model
        labels = {"accepts_labels": served.label_heads is not None}
        if served.label_heads is not None:
            labels.update(max_labels=settings.max_labels, max_label_chars=settings.max_label_chars)
        else:
            labels["labels_refusal"] = served.labels_refusal
        return {"status": "ok", "model": served.name, "method": served.method, "runtime": served.runtime,
                "device": served.device, "num_classes": model.num_classes, "classes": model.class_names,
                "num_frames": model.config.num_frames, **labels, "max_upload_bytes": settings.max_upload_bytes,
                "in_flight": state["in_flight"]}

    async def receive_upload(request: Request, path: str) -> tuple[str, dict]:
        """Write the upload to ``path``; returns (the client's name for it, its form fields)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=16)
            try:
                upload = form.get("video")
                if not isinstance(upload, UploadFile):
                    fields = ", ".join(sorted(form.keys())) or "none"
                    raise HTTPException(400, f"no file in the form field 'video' (fields sent: {fields})")
                with open(path, "wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, upload.file, out, 1 << 20)
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                return _display_name(upload.filename), fields
            finally:
                await form.close()
        with open(path, "wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        return _display_name(request.headers.get("x-filename")), {}

    def requested_labels(options) -> list[str] | None:
        """The request's ``labels`` (None: the model's own classes); 400 when malformed or refused."""
        if "labels" not in options:
            return None
        if served.label_heads is None:
            raise HTTPException(400, f"labels: {served.labels_refusal}")
        try:
            return parse_request_labels(options["labels"], max_labels=settings.max_labels,
                                        max_chars=settings.max_label_chars)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    async def answer(request: Request) -> list[dict]:
        fd, path = tempfile.mkstemp(prefix="upload-", dir=state["tmp"])
        os.close(fd)
        try:
            name, fields = await receive_upload(request, path)
            size = os.path.getsize(path)
            if size == 0:
                raise HTTPException(400, f"{name}: the upload is empty")
            options = {**fields, **request.query_params}
            topk = _int_option(options.get("topk"), "topk", 1, settings.max_topk) or 5
            views = _int_option(options.get("views"), "views", 1, 64)
            window = _float_option(options.get("window"), "window")
            stride = _float_option(options.get("stride"), "stride")
            labels = requested_labels(options)
            prompt = _prompt_option(options.get("prompt"), settings.max_label_chars)
            if prompt is not None and labels is None:
                raise HTTPException(400, "prompt applies to labels: send labels too")
            async with state["gate"]:
                model = state["model"]
                if labels is not None:  # the text tower runs off the event loop, within the time limit
                    try:
                        head = await run_in_threadpool(served.label_heads.head, labels, prompt)
                    except ValueError as e:
                        raise HTTPException(400, f"labels: {e}") from None
                    model = LabelledModel(model, head, labels)
                try:
                    result = await run_in_threadpool(predict_upload, model, path, served.preprocess,
                                                     topk=topk, views=views, window=window, stride=stride)
                except VideoDecodeError as e:
                    cause = e.cause.replace(path, name)
                    raise HTTPException(422, f"{name}: not a readable video: {cause}") from None
                except (ValueError, RuntimeError, OSError, EOFError) as e:
                    message = str(e).replace(path + ": ", "").replace(path, name) or type(e).__name__
                    raise HTTPException(422, f"{name}: {message}") from None
            result = {**result, "video": name}
            return [result]
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @app.post("/predict")
    async def predict(request: Request):
        authorize(request)
        if state["in_flight"] >= settings.max_concurrent + settings.max_queue:
            raise HTTPException(503, "the server is busy: try again later", headers={"Retry-After": "5"})
        state["in_flight"] += 1
        try:
            return await asyncio.wait_for(answer(request), settings.timeout)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the request took longer than the limit of {settings.timeout:g} s") from None
        finally:
            state["in_flight"] -= 1

    return app


def run_server(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
               clip: str | None = None, classes: str | None = None, labels: str | None = None,
               vocab: str | None = None, prompt: str | None = None, device: str = "auto", clip_dtype: str = "auto",
               num_frames: int = 8, log_level: str = "info") -> None:
    """Load the model once and serve it with uvicorn until interrupted."""
    _require_serve_extra()
    import uvicorn

    settings = settings or ServeSettings()
    if host not in LOOPBACK_HOSTS and settings.token is None:
        logger.warning("serving on %s without a token: anyone who can reach this address can use the model", host)
    served = load_served_model(model_path, clip=clip, classes=classes, labels=labels, vocab=vocab, prompt=prompt,
                               device=device, clip_dtype=clip_dtype, max_label_sets=settings.max_label_sets,
                               num_frames=num_frames)
    logger.info("serving %s (%s, %s) on http://%s:%d; per-request labels %s", served.name, served.runtime,
                served.device, host, port, "accepted" if served.label_heads is not None else "not accepted")
    app = create_app(served, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                limit_concurrency=settings.max_concurrent + settings.max_queue + 8)
