"""Per-request labels: the class-text heads of the label sets requests name."""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["LabelHeads"]


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
        from ..prompts import label_embeddings, templates_of

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
