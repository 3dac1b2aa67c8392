"""Label names -> class-text embeddings: prompt templates, CLIP's Kinetics prompt ensemble,
and the tokenizer that fits a model's text tower.

Zero-shot classification with CLIP (Radford et al., 2021, section 3.1.4) embeds each label
inside one or more prompt templates ("a video of a person {}.") with the frozen text tower;
with several templates, a label's embedding is the mean of its L2-normalised embeddings over
the templates (the "prompt ensemble"). Classifier logits are cosine similarities, so the
ensemble mean is used as it is (normalising it again would not change a score).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["KINETICS_TEMPLATES", "parse_labels", "templates_of", "label_embeddings", "text_tokenizer"]

#: CLIP's zero-shot prompt templates for Kinetics-700 (OpenAI's CLIP repository,
#: ``data/prompts.md``): 4 phrasings x 7 ways of naming the action.
KINETICS_TEMPLATES: tuple[str, ...] = tuple(
    f"{lead} {body}."
    for lead in ("a photo of", "a video of", "a example of", "a demonstration of")
    for body in ("{}", "a person {}", "a person using {}", "a person doing {}", "a person during {}",
                 "a person performing {}", "a person practicing {}")
)


def parse_labels(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Label names from a file (one per line), a comma-separated string, or a list.
    Raises ``ValueError`` for an empty list or a repeated name."""
    if not isinstance(spec, (str, os.PathLike)):
        names = [str(s).strip() for s in spec]
    elif Path(spec).is_file():
        names = [line.strip() for line in Path(spec).read_text().splitlines()]
    else:
        names = [part.strip() for part in str(spec).split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no label names in {spec!r} (give a comma-separated list or a file with one per line)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"label names given more than once: {', '.join(repeated)}")
    return names


def templates_of(prompt: str | Sequence[str] | None) -> list[str]:
    """Prompt templates: ``None`` -> :data:`KINETICS_TEMPLATES`; a template with ``{}`` -> that
    template; a text without ``{}`` -> a prefix (``"a video of "`` -> ``"a video of {}"``)."""
    if prompt is None:
        return list(KINETICS_TEMPLATES)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt template given")
    return [p if "{}" in p else p + "{}" for p in prompts]


@torch.no_grad()
def label_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer, labels: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """Class-text embeddings C x E: for every label, the mean over ``templates`` of the
    L2-normalised ``encode_text(tokenizer([template.format(label)]))``. ``encode_text``: token ids
    C x L -> C x E (e.g. ``model.encode_text``)."""
    total = None
    for template in templates:
        z = F.normalize(encode_text(tokenizer([template.format(label) for label in labels])).float(), dim=-1)
        total = z if total is None else total + z
    return total / len(templates)


def text_tokenizer(clip, *, vocab: str | os.PathLike | None = None,
                   checkpoint: str | os.PathLike | None = None):
    """The tokenizer for ``clip``'s text tower: its own (set by :func:`dist_video.load_clip`) unless
    ``vocab`` is given, else one found by :func:`dist_video.tokenizer.find_vocab` (beside
    ``checkpoint``, an installed package, or the copy shipped here). Raises ``ValueError`` when
    the model has no text tower or the vocabulary has more tokens than the tower embeds."""
    from .tokenizer import Tokenizer, VocabNotFoundError, find_vocab

    if not clip.has_text:
        raise ValueError("the CLIP weights have no text tower, so label names cannot be embedded")
    tokenizer = None if vocab else clip.tokenizer
    if tokenizer is None:
        try:
            tokenizer = Tokenizer(find_vocab(checkpoint_path=checkpoint, vocab=vocab),
                                  context_length=clip.config.context_length)
        except VocabNotFoundError as e:
            raise ValueError(str(e).splitlines()[0] + " (pass --vocab PATH)") from None
    if tokenizer.vocab_size > clip.config.vocab_size:
        raise ValueError(f"the BPE vocabulary {tokenizer.vocab_path} has {tokenizer.vocab_size} tokens but the "
                         f"text tower embeds {clip.config.vocab_size}: pass the model's own vocabulary (--vocab)")
    return tokenizer
