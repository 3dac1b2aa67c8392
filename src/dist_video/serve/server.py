"""``dist-video serve``: load the model once and serve it with uvicorn."""

from __future__ import annotations

import logging

from .app import create_app, require_serve_extra
from .loading import load_served_model
from .protocol import bounded_protocol
from .settings import LOOPBACK_HOSTS, ServeSettings, allowed_host_names

__all__ = ["run_server"]

logger = logging.getLogger(__name__)


def run_server(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
               clip: str | None = None, classes: str | None = None, labels: str | None = None,
               vocab: str | None = None, prompt: str | None = None, device: str = "auto", clip_dtype: str = "auto",
               num_frames: int = 8, log_level: str = "info", trust_checkpoint: bool = False,
               compile: bool = False) -> None:
    """Load the model once and serve it with uvicorn until interrupted. Raises ``ValueError``
    for settings out of range (an empty or non-ASCII token among them) before loading.
    ``trust_checkpoint``: see :func:`dist_video.load_model`; ``compile``: serve the inference form
    in ``torch.compile`` (:func:`~dist_video.serve.loading.load_served_model`)."""
    require_serve_extra()
    import uvicorn

    settings = (settings or ServeSettings()).check()
    if host not in LOOPBACK_HOSTS and settings.token is None:
        logger.warning("serving on %s without a token: anyone who can reach this address can use the model", host)
    if allowed_host_names(host, settings.allowed_hosts) is None and "*" not in settings.allowed_hosts:
        logger.warning("serving on every interface (%s): the Host header is not checked; name the server's "
                       "host names with --allowed-hosts", host)
    served = load_served_model(model_path, clip=clip, classes=classes, labels=labels, vocab=vocab, prompt=prompt,
                               device=device, clip_dtype=clip_dtype, max_label_sets=settings.max_label_sets,
                               num_frames=num_frames, trust_checkpoint=trust_checkpoint, compile=compile)
    logger.info("serving %s (%s, %s) on http://%s:%d; per-request labels %s", served.name, served.runtime,
                served.device, host, port, "accepted" if served.label_heads is not None else "not accepted")
    app = create_app(served, settings, host=host)
    # Concurrency is the app's (a request counts once its body has arrived), not uvicorn's
    # limit_concurrency, which counts connections still sending their headers.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                http=bounded_protocol(settings.header_timeout, settings.max_connections))
