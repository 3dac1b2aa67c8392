"""What the server accepts: its bounds, its access rule, and the host names it answers to."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["ServeSettings", "LOOPBACK_HOSTS", "allowed_host_names"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
#: Addresses that bind every interface: no single name the clients use.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass
class ServeSettings:
    """The server's bounds and its access rule (``docs/deploy.md`` lists them with the threat
    model). Every number is checked by :meth:`check` when the app is made."""

    token: str | None = None
    max_upload_bytes: int = 200 * 1024 ** 2
    timeout: float = 120.0          # seconds from the end of the upload to the answer (queue and work)
    upload_timeout: float = 60.0    # seconds for a request's body to arrive (408 above)
    header_timeout: float = 10.0    # seconds for a request's headers to arrive (the connection is closed)
    max_concurrent: int = 2         # requests decoding / predicting at once
    max_queue: int = 32             # uploaded requests waiting for one of those places; more get 503
    max_uploads: int = 64           # uploads being received at once; more get 503
    max_connections: int = 512      # open connections; more are closed at once
    max_batch: int = 16             # clips per forward pass of the model
    max_topk: int = 50
    max_views: int = 64             # test views a request may ask for
    max_windows: int = 10_000       # windows of a timeline request
    max_frame_pixels: int = 3840 * 2160   # width x height of the upload's frames (4K)
    max_frames: int = 512           # frames decoded per request for views: views x frames per clip
    max_decoded_bytes: int = 1024 ** 3   # RGB bytes of the frames a request holds decoded at once
    max_labels: int = 1000          # label names per request
    max_label_chars: int = 200      # characters per label name, and of a prompt
    max_label_sets: int = 16        # class-text heads kept (LRU) for the label sets requests name
    allowed_hosts: tuple[str, ...] = ()   # more names the Host and Origin headers may carry ("*": any)

    def check(self) -> "ServeSettings":
        """Raise ``ValueError`` naming the setting that is out of range, or a token that is
        empty, blank or not printable ASCII (HTTP clients cannot all send other characters in a
        header, and a browser never can). Returns ``self``."""
        if self.token is not None:
            if not self.token.strip():
                raise ValueError("the token is empty or blank: give a secret of printable ASCII characters")
            if not (self.token.isascii() and self.token.isprintable()) or self.token != self.token.strip() \
                    or " " in self.token:
                raise ValueError("the token must be printable ASCII without spaces (a header carries it; "
                                 "other characters cannot be sent by every client)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("token", "allowed_hosts"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{f.name} must be a finite positive number, got {value!r}")
        for name in self.allowed_hosts:
            if not name or not name.isascii() or not name.isprintable() or " " in name:
                raise ValueError(f"allowed host {name!r}: a host name or address, without spaces")
        return self


def allowed_host_names(host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str] | None:
    """The host names (no ports, lower case) that a server bound to ``host`` answers in its
    ``Host`` and ``Origin`` headers: the bound address, the loopback names when it is a loopback
    address, and ``extra``. None: any name (``extra`` holds ``*``, or ``host`` binds every
    interface and ``extra`` names nothing, so there is no name to check against)."""
    extra = [name.strip().lower().strip("[]") for name in extra]
    if "*" in extra:
        return None
    host = host.strip().lower().strip("[]")
    if host in WILDCARD_HOSTS:
        return frozenset(extra) or None
    names = {host, *extra}
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        names.update(LOOPBACK_HOSTS)
    return frozenset(names)
