"""A request's options, read and bounded before any work: each problem is a
:class:`RequestError` with the HTTP status and a message naming the option and its bound."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .settings import ServeSettings

__all__ = ["RequestError", "RequestOptions", "parse_options", "parse_request_labels", "display_name"]


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class RequestOptions:
    """What a ``POST /predict`` asks for (None: the model's default)."""

    topk: int = 5
    views: int | None = None
    window: float | None = None
    stride: float | None = None
    labels: list[str] | None = None
    prompt: str | None = None


def parse_options(options: Mapping[str, str], settings: ServeSettings, labels_refusal: str | None) -> RequestOptions:
    """The request's query and form fields -> :class:`RequestOptions`; 400 for a value that is
    not a number, not finite or out of its bounds (the message names the bound).
    ``labels_refusal``: why this server's model cannot take ``labels`` (None: it can)."""
    topk = int_option(options.get("topk"), "topk", 1, settings.max_topk) or 5
    views = int_option(options.get("views"), "views", 1, settings.max_views)
    window = seconds_option(options.get("window"), "window")
    stride = seconds_option(options.get("stride"), "stride")
    if stride is not None and window is None:
        raise RequestError(400, "stride needs a window")
    labels = None
    if "labels" in options:
        if labels_refusal is not None:
            raise RequestError(400, f"labels: {labels_refusal}")
        try:
            labels = parse_request_labels(options["labels"], max_labels=settings.max_labels,
                                          max_chars=settings.max_label_chars)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
    prompt = prompt_option(options.get("prompt"), settings.max_label_chars)
    if prompt is not None and labels is None:
        raise RequestError(400, "prompt applies to labels: send labels too")
    return RequestOptions(topk=topk, views=views, window=window, stride=stride, labels=labels, prompt=prompt)


def int_option(value, name: str, low: int, high: int) -> int | None:
    """An integer between ``low`` and ``high``; None when not given."""
    if value is None or value == "":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {str(value)[:40]!r}") from None
    if not low <= number <= high:
        raise RequestError(400, f"{name} must be between {low} and {high}, got {number}")
    return number


def seconds_option(value, name: str) -> float | None:
    """A finite positive number of seconds; None when not given."""
    if value is None or value == "":
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise RequestError(400, f"{name} must be a number of seconds, got {str(value)[:40]!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise RequestError(400, f"{name} must be a finite positive number of seconds, got {str(value)[:40]!r}")
    return number


def prompt_option(value, max_chars: int) -> str | None:
    """A request's ``prompt`` (a template with one ``{}``, or a prefix); empty: not given."""
    if value is None or not isinstance(value, str) or not value.strip():
        return None
    if len(value) > max_chars:
        raise RequestError(400, f"prompt: longer than the limit of {max_chars} characters")
    if not value.isprintable():
        raise RequestError(400, "prompt: has control characters")
    rest = value.replace("{}", "", 1)
    if value.count("{}") > 1 or "{" in rest or "}" in rest:
        raise RequestError(400, f"prompt: {value[:40]!r} is not a template with one '{{}}' (where the label goes) "
                                "or a prefix without braces")
    return value


def display_name(filename: str | None) -> str:
    """The client's name for its file, kept only as a label (never a path on the server)."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "".join(ch for ch in name if ch.isprintable())[:200] or "upload"


def parse_request_labels(text: str, *, max_labels: int = 1000, max_chars: int = 200) -> list[str]:
    """A request's ``labels``: names separated by commas (``"juggling, archery"``) or, when the
    text has a line break, one per line (as the lines of ``--labels FILE``; the text is never a
    path). Raises ``ValueError`` naming the problem: no names, more than ``max_labels``, a name
    longer than ``max_chars`` or with control characters, a name given twice."""
    from ..prompts import parse_labels

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
