"""ASGI middleware in front of the routes: the Host and Origin a request names, and the size of
its body."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

__all__ = ["HostCheck", "BodySizeLimit", "send_json_error", "host_name"]


async def send_json_error(send, status: int, message: str) -> None:
    """Answer ``{"error": message}`` with ``status`` and close the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def host_name(netloc: str) -> str | None:
    """The host name of a ``Host`` header or an origin's authority (no port, lower case, IPv6
    without brackets); None when it is not one."""
    try:
        parts = urlsplit("//" + netloc)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return None
    if parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname or None


class HostCheck:
    """ASGI middleware against DNS rebinding and cross-site requests: the ``Host`` header must
    name one of ``names`` (400; None: any name), and an ``Origin`` header, when a browser sends
    one, must be this server's own origin (the scheme and the ``Host`` it was sent to) or a name
    in ``origins`` (403). ``check=False``: neither is checked."""

    def __init__(self, app, names: frozenset[str] | None, origins: frozenset[str] = frozenset(), check: bool = True):
        self.app = app
        self.names = names
        self.origins = origins
        self.check = check

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        name = host_name(host)
        if self.names is not None and name not in self.names:
            return 400, (f"the Host header {host[:80]!r} does not name this server (it answers to "
                         f"{', '.join(sorted(self.names))}); behind a proxy, add its name with --allowed-hosts")
        origin = headers.get(b"origin")
        if origin is None:
            return None
        text = origin.decode("latin-1")
        parts = urlsplit(text)
        same = parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower() and not parts.path
        if not same and not (parts.scheme in ("http", "https") and host_name(parts.netloc) in self.origins):
            return 403, (f"cross-origin request from {text[:80]!r} refused: only this server's own page may "
                         "call it (a proxy's public name goes in --allowed-hosts)")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.check:
            refused = self.refusal(scope)
            if refused is not None:
                return await send_json_error(send, *refused)
        return await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413, from its
    ``Content-Length`` before anything is read, or once that many bytes have arrived (the rest
    of the body is read and dropped, up to ``drain_bytes``, so that the client sees the answer)."""

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 4 * max_bytes

    async def _reply_413(self, send, received: int | None) -> None:
        detail = (f"the upload is larger than the limit of {self.max_bytes} bytes"
                  + (f" ({received} bytes)" if received is not None else ""))
        await send_json_error(send, 413, detail)

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
