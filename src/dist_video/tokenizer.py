"""CLIP's byte-level BPE tokenizer, giving the token ids of OpenAI's CLIP and open_clip.

Text goes through the same clean-up as OpenAI's ``simple_tokenizer``: ``ftfy.fix_text``, HTML
unescaping applied twice, whitespace runs collapsed to one space, lower-casing. It is then
pre-split into words, numbers (one digit at a time), runs of other symbols and the English
contractions, with Unicode letter/number classes (the ``regex`` package's ``\\p{L}``/``\\p{N}``,
as upstream), and each piece is byte-pair encoded. Sequences are
``[start] + ids + [end]``, zero-padded to the context length; a longer sequence is cut to the
context length and its last position becomes the end token (open_clip's behaviour, and
OpenAI's ``truncate=True``).

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (ids: 256 byte symbols, the same
with ``</w>``, then one id per merge, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` =
49407) or a Hugging Face tokenizer's ``vocab.json`` + ``merges.txt``. :func:`find_vocab`
searches for one; parsed vocabularies are cached per file.

One known divergence: the literal texts ``<|startoftext|>`` / ``<|endoftext|>`` inside a string
become the special ids, as in OpenAI's CLIP and Hugging Face's ``CLIPTokenizer``; open_clip
spells its special tokens ``<start_of_text>`` / ``<end_of_text>`` instead, so it treats the
other spelling as special. No class name or ordinary prompt contains either.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["Tokenizer", "tokenize", "find_vocab", "clean_text", "OPENAI_VOCAB_NAME",
           "VOCAB_PACKAGES", "VocabNotFoundError"]

#: File name of OpenAI's vocabulary (as shipped inside the ``clip`` and ``open_clip`` packages).
OPENAI_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: Packages whose bundled vocabulary :func:`find_vocab` uses as a last resort, in this order: an
#: installed ``open_clip`` or ``clip``, then this package's own copy of OpenAI's file
#: (``dist_video/assets/vocab``, MIT licence: see the README beside it).
VOCAB_PACKAGES = ("open_clip", "clip", "dist_video.assets.vocab")

START_TEXT = "<|startoftext|>"
END_TEXT = "<|endoftext|>"
#: OpenAI's vocabulary keeps this many merges (the merges file holds more lines than it uses);
#: Hugging Face's ``CLIPTokenizer`` applies the same cap to ``merges.txt``.
_MAX_MERGES = 49152 - 256 - 2
_HF_FILES = ("vocab.json", "merges.txt")


class VocabNotFoundError(FileNotFoundError):
    """No BPE vocabulary was found; the message lists every place that was searched."""


# --------------------------------------------------------------------------- text clean-up
def _ftfy():
    try:
        import ftfy
    except ImportError as e:  # a declared dependency; say so plainly if it is missing
        raise ImportError("dist_video.tokenize needs the 'ftfy' package (CLIP cleans text with "
                          "ftfy.fix_text): pip install ftfy") from e
    return ftfy


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, HTML unescape (twice), whitespace collapse, lower case."""
    text = _ftfy().fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def _splitter():
    """The pre-tokenisation pattern: the two special tokens, English contractions, letter runs,
    single digits, runs of anything that is neither space, letter nor number. Matched
    case-insensitively, as upstream (the text is already lower-case)."""
    try:
        import regex
    except ImportError as e:
        raise ImportError("dist_video.tokenize needs the 'regex' package (CLIP's pre-tokenisation "
                          "uses Unicode classes \\p{L}, \\p{N}): pip install regex") from e
    specials = [regex.escape(START_TEXT), regex.escape(END_TEXT)]
    contractions = ["'" + c for c in ("s", "t", "re", "ve", "m", "ll", "d")]
    pieces = specials + contractions + [r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+"]
    return regex.compile("|".join(pieces), regex.IGNORECASE)


# --------------------------------------------------------------------------- byte symbols
@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[list[str], dict[int, str]]:
    """The 256 printable symbols standing for bytes, in vocabulary order, and byte -> symbol.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and
    come first; every other byte b gets chr(256 + k), k counting those bytes in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    keep = set(printable)
    order = list(printable)
    table = {b: chr(b) for b in printable}
    k = 0
    for b in range(256):
        if b not in keep:
            table[b] = chr(256 + k)
            order.append(b)
            k += 1
    return [table[b] for b in order], table


# --------------------------------------------------------------------------- vocabularies
@dataclass(frozen=True)
class _Vocab:
    path: str
    encoder: dict[str, int]
    ranks: dict[tuple[str, str], int]

    @property
    def size(self) -> int:
        return max(self.encoder.values()) + 1


def _parse_merges(lines: Iterable[str]) -> list[tuple[str, str]]:
    merges = []
    for line in lines:
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"malformed merge line {line!r} (expected two symbols)")
        merges.append((parts[0], parts[1]))
    return merges


def _read_openai_vocab(path: Path) -> _Vocab:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    merges = _parse_merges(lines[1:_MAX_MERGES + 1])
    symbols, _ = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TEXT, END_TEXT]
    encoder = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as upstream
    return _Vocab(str(path), encoder, {m: i for i, m in enumerate(merges)})


def _check_specials(encoder: dict, where: Path) -> None:
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise ValueError(f"{where}: not a token -> id mapping")
    for name in (START_TEXT, END_TEXT):
        if name not in encoder:
            raise ValueError(f"{where}: no {name} token: not a CLIP vocabulary")


def _read_hf_pair(folder: Path) -> _Vocab:
    """Hugging Face's ``vocab.json`` + ``merges.txt`` (``CLIPTokenizer`` files)."""
    encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    _check_specials(encoder, folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    merges = _parse_merges(lines[1:_MAX_MERGES + 1])  # the first line is the '#version' header
    return _Vocab(str(folder), encoder, {m: i for i, m in enumerate(merges)})


def _read_tokenizer_json(path: Path) -> _Vocab:
    """A ``tokenizers`` ``tokenizer.json`` holding a CLIP BPE model (what recent transformers save)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: not a byte-pair-encoding tokenizer.json")
    if model.get("end_of_word_suffix") not in (None, "</w>"):
        raise ValueError(f"{path}: end-of-word suffix {model.get('end_of_word_suffix')!r} is not CLIP's '</w>'")
    encoder = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
        encoder.setdefault(added["content"], int(added["id"]))
    _check_specials(encoder, path)
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: malformed merges")
    return _Vocab(str(path), encoder, {m: i for i, m in enumerate(merges[:_MAX_MERGES])})


def _read_vocab(p: Path) -> _Vocab:
    if p.is_dir():
        return _read_hf_pair(p)
    if p.suffix == ".json":
        return _read_tokenizer_json(p)
    return _read_openai_vocab(p)


@lru_cache(maxsize=8)
def _load_vocab_cached(path: str, stamp: tuple) -> _Vocab:
    try:
        return _read_vocab(Path(path))
    except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the BPE vocabulary: {e}") from e


def _file_stamp(path: Path) -> tuple:
    files = [path / n for n in _HF_FILES] if path.is_dir() else [path]
    return tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def _load_vocab(path: Path) -> _Vocab:
    path = path.resolve()
    return _load_vocab_cached(str(path), _file_stamp(path))


# --------------------------------------------------------------------------- vocabulary search
def _vocab_in(path: Path) -> Path | None:
    """The vocabulary a file or folder provides, or None. A folder provides OpenAI's gz, else
    Hugging Face's vocab.json + merges.txt (the folder is returned), else a tokenizer.json."""
    if path.is_dir():
        if (path / OPENAI_VOCAB_NAME).is_file():
            return path / OPENAI_VOCAB_NAME
        if all((path / n).is_file() for n in _HF_FILES):
            return path
        if (path / "tokenizer.json").is_file():
            return path / "tokenizer.json"
        return None
    if path.is_file():
        if path.name in _HF_FILES:
            return path.parent if all((path.parent / n).is_file() for n in _HF_FILES) else None
        return path
    return None


def _package_dirs(name: str) -> list[Path]:
    """Folders of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin).parent] if spec.origin else []


def find_vocab(checkpoint_path: str | os.PathLike | None = None,
               vocab: str | os.PathLike | None = None) -> Path:
    """Where CLIP's BPE vocabulary is: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (or the same
    merges uncompressed), a folder with Hugging Face's ``vocab.json`` + ``merges.txt``, or a
    Hugging Face ``tokenizer.json``.

    Searched in order: ``vocab`` (a file, or a folder holding one of the above; when given it
    must be valid), the checkpoint's folder (``checkpoint_path`` itself if it is a folder, such
    as a Hugging Face model folder: its tokenizer files), then the vocabulary bundled with an
    installed ``open_clip`` or ``clip`` package, then the copy shipped with this package
    (:data:`VOCAB_PACKAGES`). Raises :class:`VocabNotFoundError` listing
    every place looked at."""
    if vocab is not None:
        p = Path(vocab)
        found = _vocab_in(p)
        if found is None:
            if not p.exists():
                raise VocabNotFoundError(f"BPE vocabulary not found: {p} does not exist")
            raise VocabNotFoundError(
                f"{p}: not a BPE vocabulary (expected {OPENAI_VOCAB_NAME}, Hugging Face's "
                f"vocab.json + merges.txt or tokenizer.json, or a folder holding one of them)")
        return found
    looked: list[str] = ["the vocab argument: not given"]
    if checkpoint_path is not None:
        ckpt = Path(checkpoint_path)
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        found = _vocab_in(folder)
        if found is not None:
            return found
        looked.append(f"beside the checkpoint: no {folder / OPENAI_VOCAB_NAME}, no "
                      f"{folder / 'vocab.json'} + merges.txt, no {folder / 'tokenizer.json'}")
    else:
        looked.append("beside the checkpoint: no checkpoint path given")
    for name in VOCAB_PACKAGES:
        dirs = _package_dirs(name)
        for d in dirs:
            if (d / OPENAI_VOCAB_NAME).is_file():
                return d / OPENAI_VOCAB_NAME
        where = ", ".join(str(d / OPENAI_VOCAB_NAME) for d in dirs)
        looked.append(f"installed package {name!r}: " + (f"no {where}" if dirs else "not installed"))
    raise VocabNotFoundError(
        "no CLIP BPE vocabulary found. Looked at:\n  - " + "\n  - ".join(looked)
        + f"\nPass vocab=PATH ({OPENAI_VOCAB_NAME}, or a Hugging Face folder with vocab.json and "
          "merges.txt or tokenizer.json), put the file beside the checkpoint, or install open_clip_torch.")


# --------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """CLIP's tokenizer over one vocabulary.

    ``Tokenizer(path)``: ``path`` as accepted by :func:`find_vocab`'s ``vocab`` (None: search
    the installed packages). ``tokenizer(texts) -> LongTensor C x context_length``;
    :meth:`encode` gives the ids of one text without start/end tokens; :meth:`decode` inverts.
    """

    def __init__(self, vocab: str | os.PathLike | None = None, context_length: int = 77):
        self.vocab_path = find_vocab(vocab=vocab)
        v = _load_vocab(self.vocab_path)
        self.encoder = v.encoder
        self.bpe_ranks = v.ranks
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.vocab_size = v.size
        self.start_id = self.encoder[START_TEXT]
        self.end_id = self.encoder[END_TEXT]
        self.context_length = int(context_length)
        _, self._byte_to_symbol = _byte_symbols()
        self._symbol_to_byte = {s: b for b, s in self._byte_to_symbol.items()}
        self._cache: dict[str, tuple[int, ...]] = {START_TEXT: (self.start_id,), END_TEXT: (self.end_id,)}

    def __reduce__(self):  # pickles as its vocabulary path (parsed files are cached per process)
        return (type(self), (str(self.vocab_path), self.context_length))

    def __deepcopy__(self, memo):  # immutable but for its cache: copies of a model share it
        return self

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.vocab_path)!r}, vocab_size={self.vocab_size}, "
                f"context_length={self.context_length})")

    # -- BPE of one pre-split piece
    def _merge(self, symbols: list[str]) -> list[str]:
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:  # merge every non-overlapping occurrence, left to right
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        symbols = [self._byte_to_symbol[b] for b in piece.encode("utf-8")]
        symbols[-1] = symbols[-1] + "</w>"
        try:
            ids = tuple(self.encoder[s] for s in self._merge(symbols))
        except KeyError as e:
            raise ValueError(f"{self.vocab_path}: BPE symbol {e.args[0]!r} has no id: the vocabulary "
                             "and its merges do not belong together") from None
        if len(self._cache) > 200_000:  # bounded; losing it only costs time
            self._cache = {START_TEXT: (self.start_id,), END_TEXT: (self.end_id,)}
        self._cache[piece] = ids
        return ids

    # -- public API
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned), without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in _splitter().findall(clean_text(text)):
            ids.extend(self._piece_ids(piece))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; the start token is skipped and decoding stops at the end token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        symbols = []
        for i in ids:
            i = int(i)
            if i == self.start_id:
                continue
            if i == self.end_id:
                break
            symbols.append(self.decoder[i])
        data = bytearray(self._symbol_to_byte[c] for c in "".join(symbols))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").rstrip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor C x context_length: ``[start] + ids + [end]``, zero-padded; too-long
        sequences are cut to ``context_length`` with the end token in the last position."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        if length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {length}")
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at position {row}")
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.end_id
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


_TOKENIZERS: dict[tuple, Tokenizer] = {}


def tokenize(texts: str | Sequence[str], vocab: str | os.PathLike | None = None,
             context_length: int = 77) -> torch.Tensor:
    """CLIP token ids of ``texts`` (a string or a list of strings): LongTensor C x context_length.

    ``vocab``: see :func:`find_vocab` (default: an installed ``open_clip``/``clip`` package's)."""
    path = find_vocab(vocab=vocab)
    key = (str(Path(path).resolve()), _file_stamp(Path(path).resolve()))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = Tokenizer(path)
    return tok(texts, context_length=context_length)
