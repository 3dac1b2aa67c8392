"""The HTTP connection, bounded where uvicorn leaves it open.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and bounds a request's
header size (h11's incomplete-event limit), but a client may take as long as it likes to send
its headers, and its ``limit_concurrency`` counts those slow connections, so a few dozen
clients sending a byte at a time lock every other client out. Here a connection has
``header_timeout`` seconds, from its first byte (or from its opening), to finish the headers of
each request, else it gets 408 and is closed; connections beyond ``max_connections`` are closed
when they open; and concurrency is left to the app, which counts a request only once its body
has arrived.
"""

from __future__ import annotations

import json

__all__ = ["bounded_protocol", "raw_response", "REQUEST_TIMEOUT_RESPONSE", "TOO_MANY_CONNECTIONS_RESPONSE"]


def raw_response(status: str, message: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON ``{"error": message}`` body that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}", *headers,
            "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


REQUEST_TIMEOUT_RESPONSE = raw_response("408 Request Timeout", "the request headers did not arrive in time")
TOO_MANY_CONNECTIONS_RESPONSE = raw_response("503 Service Unavailable", "too many open connections", "retry-after: 5")


def bounded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a header read timeout and a connection cap (a class to pass
    as ``uvicorn.run(..., http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(TOO_MANY_CONNECTIONS_RESPONSE)
                transport.close()
                return
            self.arm()

        def data_received(self, data: bytes) -> None:
            if self.waiting_for_headers() and self.header_timer is None:
                self.arm()
            super().data_received(data)
            if not self.waiting_for_headers():
                self.disarm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            self.disarm()
            self.header_timer = self.loop.call_later(header_timeout, self.headers_too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.waiting_for_headers() and not self.transport.is_closing():
                self.transport.write(REQUEST_TIMEOUT_RESPONSE)
                self.transport.close()

    return BoundedH11Protocol
