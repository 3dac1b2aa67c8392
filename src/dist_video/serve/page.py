"""The page ``GET /`` serves: pick a video, watch it, see the top classes and the timeline."""

from __future__ import annotations

from importlib import resources

__all__ = ["page"]


def page() -> str:
    """The page's HTML (``assets/serve/index.html``)."""
    return (resources.files("dist_video") / "assets" / "serve" / "index.html").read_text()
