"""Class lists and label maps: the shipped class lists, the Kinetics renames, a head's rows
carried over by class name (``model.init_from``) and logits restricted to a subset of classes.

Kinetics-710 (UniFormerV2's union of Kinetics-400, -600 and -700) names each class once; a few
classes are spelled differently in the three releases. :data:`KINETICS_RENAMES` lists them, per
release, as published in VideoMAE V2's ``misc/k710_identical_label_merge.json`` (15 pairs) and
checked against the releases' class lists (``assets/classnames/README.md``): with these renames
the union of the 400 + 600 + 700 names is exactly the 710 names of ``kinetics710.txt``.

Names are compared with :func:`class_key` (case, underscores and spacing do not matter), after
the rename table: ``"balloon blowing"`` (Kinetics-400) is the Kinetics-710 class
``"inflating balloons"``.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .classifier import VideoClassifier, model_class, read_model_config, read_safetensors

__all__ = ["BUILTIN_CLASS_LISTS", "KINETICS_RENAMES", "class_key", "builtin_class_names", "kinetics710_name",
           "class_index_map", "knows_classes", "restrict_classes", "carry_head_rows", "init_from",
           "read_source_weights"]

logger = logging.getLogger(__name__)

#: built-in class-list names -> files in ``assets/classnames``
BUILTIN_CLASS_LISTS = {
    "kinetics400": "kinetics400.txt", "k400": "kinetics400.txt",
    "kinetics600": "kinetics600.txt", "k600": "kinetics600.txt",
    "kinetics700": "kinetics700.txt", "k700": "kinetics700.txt",
    "kinetics710": "kinetics710.txt", "k710": "kinetics710.txt",
    "ssv2": "ssv2.txt",
}

#: release -> {name in that release: name in kinetics710.txt}, for the names that differ.
#: Source: VideoMAE V2, misc/k710_identical_label_merge.json (OpenGVLab/VideoMAEv2), which lists
#: the 15 pairs over all releases; here each pair sits under the release that uses the name.
#: kinetics710.txt keeps Kinetics-400's "throwing ball" (UniFormerV2's list), hence the
#: Kinetics-700 entry runs the other way round from VideoMAE V2's.
KINETICS_RENAMES: dict[str, dict[str, str]] = {
    "kinetics400": {
        "balloon blowing": "inflating balloons",
        "changing wheel": "changing wheel (not on bike)",
        "cooking sausages": "cooking sausages (not on barbeque)",
        "drinking": "sipping cup",
        "dying hair": "dyeing hair",
        "garbage collecting": "person collecting garbage",
        "hugging": "hugging (not baby)",
        "making bed": "making the bed",
        "opening bottle": "opening bottle (not wine)",
        "picking fruit": "picking apples",
        "skiing (not slalom or crosscountry)": "skiing mono",
        "sniffing": "smelling feet",
        "tying tie": "tying necktie",
    },
    "kinetics600": {
        "passing american football (not in game)": "passing American football (not in game)",
        "picking fruit": "picking apples",
    },
    "kinetics700": {
        "throwing ball (not baseball or American football)": "throwing ball",
    },
}


def class_key(name: str) -> str:
    """Comparison key for class names: case, underscores, ``[ ]`` and spacing do not matter."""
    return " ".join(name.replace("_", " ").replace("[", "").replace("]", "").lower().split())


_RENAMES_BY_KEY = {class_key(old): new for table in KINETICS_RENAMES.values() for old, new in table.items()}


def builtin_class_names(name: str) -> list[str]:
    """A shipped class list by name (``kinetics400`` / ``k400``, ``kinetics600``, ``kinetics700``,
    ``kinetics710``, ``ssv2``), one name per line in label-index order."""
    if name not in BUILTIN_CLASS_LISTS:
        raise KeyError(f"no built-in class list {name!r}; choose {', '.join(BUILTIN_CLASS_LISTS)}")
    path = resources.files("dist_video") / "assets" / "classnames" / BUILTIN_CLASS_LISTS[name]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def kinetics710_name(name: str) -> str:
    """The Kinetics-710 spelling of a Kinetics-400/600/700 class name (unchanged when the
    releases agree): ``"balloon blowing"`` -> ``"inflating balloons"``."""
    return _RENAMES_BY_KEY.get(class_key(name), name)


def class_index_map(source_names: Sequence[str], target_names: Sequence[str]) -> list[int | None]:
    """For each target class, the index of the source class of the same name (through the
    Kinetics rename table), or None when the source has no such class."""
    index: dict[str, int] = {}
    for i, name in enumerate(source_names):
        index.setdefault(class_key(kinetics710_name(name)), i)
    return [index.get(class_key(kinetics710_name(name))) for name in target_names]


def knows_classes(model: VideoClassifier, class_names: Sequence[str]) -> bool:
    """Whether every one of ``class_names`` is a class of ``model``'s head (through the rename
    table), so that :func:`restrict_classes` applies: e.g. a Kinetics-710 model and the
    Kinetics-400 names."""
    return bool(model.class_names) and None not in class_index_map(model.class_names, class_names)


def _head_rows(model: VideoClassifier) -> dict[str, torch.Tensor]:
    """The head's per-class tensors (first dimension: classes)."""
    if model.head_type == "linear":
        return {"head.weight": model.head.weight, "head.bias": model.head.bias}
    if model.head_type == "text":
        return {"class_embeddings": model.class_embeddings}
    raise ValueError("the model has no classifier head")


def restrict_classes(model: VideoClassifier, class_names: Sequence[str]) -> VideoClassifier:
    """Keep only the head rows of ``class_names`` (in that order), in place: the logits become
    the columns of those classes, e.g. a Kinetics-710 model evaluated on Kinetics-400. A name
    the model does not know (after the rename table) is a ``ValueError`` naming it."""
    if not model.class_names:
        raise ValueError("the model has no class names to restrict by")
    rows = class_index_map(model.class_names, class_names)
    unknown = [n for n, r in zip(class_names, rows) if r is None]
    if unknown:
        raise ValueError(f"{len(unknown)} of {len(class_names)} classes are not among the model's "
                         f"{len(model.class_names)} classes, e.g. {unknown[0]!r}")
    index = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        if model.head_type == "linear":
            head = torch.nn.Linear(model.head.in_features, len(rows)).to(model.head.weight.device,
                                                                        model.head.weight.dtype)
            head.weight.copy_(model.head.weight[index.to(head.weight.device)])
            head.bias.copy_(model.head.bias[index.to(head.bias.device)])
            model.head = head
            model.class_names = list(class_names)
        else:
            rows_e = model.class_embeddings[index.to(model.class_embeddings.device)]
            model.set_class_embeddings(rows_e, class_names)
    return model


def carry_head_rows(model: VideoClassifier, source_names: Sequence[str],
                    source_rows: Mapping[str, torch.Tensor]) -> int:
    """Copy a linear head's rows from a source head (``head.weight`` / ``head.bias``, one row per
    source class) into ``model``'s rows of the classes of the same name; the other rows keep
    their initialisation. A text head is left as it is (its rows are the class names' text
    embeddings, already computed for the new names). Returns the number of rows carried."""
    if model.head_type == "text":
        return 0
    if model.head_type != "linear" or not model.class_names:
        raise ValueError("the model needs a head with class names before rows can be carried over")
    rows = class_index_map(source_names, model.class_names)
    pairs = [(t, s) for t, s in enumerate(rows) if s is not None]
    with torch.no_grad():
        for key, own in _head_rows(model).items():
            if key not in source_rows:
                raise ValueError(f"the source model has no {key} to carry over (its head is not linear)")
            src = source_rows[key].to(own.device, own.dtype)
            if src.shape[1:] != own.shape[1:]:
                raise ValueError(f"{key}: the source rows are {tuple(src.shape[1:])} wide, the model's "
                                 f"{tuple(own.shape[1:])}")
            for t, s in pairs:
                own[t] = src[s]
    missing = [n for n, r in zip(model.class_names, rows) if r is None]
    if missing:
        logger.info("%d of %d classes have no row in the source head (e.g. %r): they start fresh",
                    len(missing), len(rows), missing[0])
    return len(pairs)


def read_source_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str], str | None]:
    """A dist-video model folder's weights (CLIP's too when they are saved in the folder, as
    ``clip.*``), its class names and its head type; or an authors' ``.pyth`` checkpoint's weights
    (CLIP's included), which carry no class names and no head (the authors classify through
    CLIP's text tower)."""
    if Path(path).is_file():
        from .checkpoints import load_official_checkpoint

        return load_official_checkpoint(path, clip_dtype=torch.float32).state_dict(), [], None
    directory = Path(path)
    meta = read_model_config(directory)
    tensors = model_class(meta.get("method", "dist")).upgrade_saved_tensors(
        read_safetensors(directory / "model.safetensors", "cpu"), meta["saved_format_version"])
    if isinstance(meta.get("clip_weights"), str) and model_class(meta.get("method", "dist")).trains_clip:
        clip = read_safetensors(directory / meta["clip_weights"], "cpu")
        tensors.update({f"clip.{k}": v for k, v in clip.items()})
    return tensors, list(meta.get("class_names") or []), meta.get("head")


def init_from(model: VideoClassifier, path: str | os.PathLike) -> VideoClassifier:
    """``model.init_from``: start ``model`` (built, with its head for the new classes) from the
    dist-video model folder or the authors' ``.pyth`` checkpoint ``path``. Every weight but the
    head must be there with the same shape (else a ``ValueError`` naming the first that is not);
    a folder's linear head rows are carried over by class name through the Kinetics rename table
    (:func:`carry_head_rows`); a ``.pyth`` has none to carry."""
    tensors, source_names, _ = read_source_weights(path)
    head_keys = set(_head_rows(model))
    state = model.state_dict()
    wanted = {k: v for k, v in state.items() if k not in head_keys and
              (model.trains_clip or not k.startswith("clip."))}
    for key, own in wanted.items():
        if key not in tensors:
            raise ValueError(f"{path}: model.init_from has no weight {key!r} (a different method or size)")
        if tensors[key].shape != own.shape:
            raise ValueError(f"{path}: model.init_from's {key} is {tuple(tensors[key].shape)}, the model's "
                             f"{tuple(own.shape)} (a different model size)")
    with torch.no_grad():
        for key, own in wanted.items():
            own.copy_(tensors[key].to(own.device, own.dtype))
    source_head = {k: v for k, v in tensors.items() if k in ("head.weight", "head.bias")}
    # an authors' checkpoint has neither class names nor a head: the new head starts fresh
    carried = carry_head_rows(model, source_names, source_head) if source_names or source_head else 0
    logger.info("model.init_from %s: %d weights, %d head rows carried over", path, len(wanted), carried)
    return model
