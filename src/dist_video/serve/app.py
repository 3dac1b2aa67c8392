"""The FastAPI application: the routes, the access rule and the error answers."""
# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time.

import hmac
import logging
import os
import shutil
from contextlib import asynccontextmanager

from .loading import ServedModel
from .middleware import BodySizeLimit, HostCheck
from .page import page
from .requests import RequestError, display_name, parse_options
from .runner import RequestRunner, remove
from .settings import ServeSettings, allowed_host_names

__all__ = ["create_app", "require_serve_extra", "health_of"]

logger = logging.getLogger(__name__)


def require_serve_extra() -> None:
    """Raise ``RuntimeError`` naming the packages of the serve extra that are missing."""
    from importlib.util import find_spec

    needed = {"fastapi": ["fastapi"], "uvicorn": ["uvicorn"], "python-multipart": ["python_multipart", "multipart"]}
    missing = [name for name, modules in needed.items() if not any(find_spec(m) for m in modules)]
    if missing:
        raise RuntimeError(f"serving needs the serve extra ({', '.join(missing)} missing): "
                           "pip install 'dist-video[serve]'")


def create_app(served: ServedModel, settings: ServeSettings | None = None, *, host: str = "127.0.0.1"):
    """The FastAPI application answering with ``served`` under ``settings``; ``host``: the
    address the server binds, whose names the ``Host`` and ``Origin`` headers must carry (with
    ``settings.allowed_hosts``). Raises ``ValueError`` for settings out of range."""
    require_serve_extra()
    from fastapi import FastAPI

    settings = (settings or ServeSettings()).check()
    runner = RequestRunner(served, settings)

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="dist-video", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    extra = frozenset(name.strip().lower().strip("[]") for name in settings.allowed_hosts)
    app.add_middleware(HostCheck, names=allowed_host_names(host, settings.allowed_hosts), origins=extra,
                       check="*" not in extra)
    add_error_answers(app)
    add_routes(app, served, settings, runner)
    return app


def add_error_answers(app) -> None:
    """Every error is ``{"error": message}`` with its status."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestError)
    async def request_error(request, exc):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def any_error(request, exc):
        logger.exception("error while answering %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


def authorize(request, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (compared in constant
    time, on the header's bytes as sent)."""
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = value.strip().encode("latin-1", errors="replace")  # the header's bytes (Starlette decodes latin-1)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, token.encode("ascii")):
        raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})


def health_of(served: ServedModel, settings: ServeSettings, runner: RequestRunner) -> dict:
    """What ``GET /health`` answers: the model, whether it takes labels, the bounds, the load."""
    model = served.model
    labels = {"accepts_labels": served.label_heads is not None}
    if served.label_heads is not None:
        labels.update(max_labels=settings.max_labels, max_label_chars=settings.max_label_chars)
    else:
        labels["labels_refusal"] = served.labels_refusal
    return {"status": "ok", "model": served.name, "method": served.method, "runtime": served.runtime,
            "device": served.device, "num_classes": model.num_classes, "classes": model.class_names,
            "num_frames": model.config.num_frames, **labels, "max_upload_bytes": settings.max_upload_bytes,
            **runner.busy()}


async def read_upload(request, path: str) -> tuple[str, dict]:
    """Write the request's upload (multipart field ``video``, or the raw body) to ``path``;
    returns (the client's name for it, its form fields)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.requests import ClientDisconnect

    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=16)
            try:
                upload = form.get("video")
                if not isinstance(upload, UploadFile):
                    fields = ", ".join(sorted(form.keys())) or "none"
                    raise RequestError(400, f"no file in the form field 'video' (fields sent: {fields})")
                with open(path, "wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, upload.file, out, 1 << 20)
                return display_name(upload.filename), {k: v for k, v in form.items() if isinstance(v, str)}
            finally:
                await form.close()
        with open(path, "wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        return display_name(request.headers.get("x-filename")), {}
    except ClientDisconnect:
        raise RequestError(400, "the upload ended before all of its bytes arrived") from None


def add_routes(app, served: ServedModel, settings: ServeSettings, runner: RequestRunner) -> None:
    from fastapi import Request
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page())

    @app.get("/health")
    async def health(request: Request):
        authorize(request, settings.token)
        return health_of(served, settings, runner)

    @app.post("/predict")
    async def predict(request: Request):
        authorize(request, settings.token)
        path, name, fields = await runner.receive(lambda target: read_upload(request, target))
        try:
            if os.path.getsize(path) == 0:
                raise RequestError(400, f"{name}: the upload is empty")
            options = parse_options({**fields, **request.query_params}, settings,
                                    None if served.label_heads is not None else served.labels_refusal)
        except BaseException:
            remove(path)
            raise
        return [await runner.answer(path, name, options)]
