"""The CLIP tokenizer against the ids of OpenAI's CLIP, open_clip and Hugging Face.

Expected ids come from ``scripts/make_tokenizer_fixture.py`` (run once with those libraries
installed elsewhere); nothing here needs them.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import dist_video
from dist_video import tokenizer as tk
from dist_video.tokenizer import Tokenizer, VocabNotFoundError, find_vocab, tokenize

ASSETS = Path(__file__).parent / "assets"
VOCAB = ASSETS / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
EXPECTED = json.loads((ASSETS / "tokenizer" / "expected_ids.json").read_text(encoding="utf-8"))
SMALL = EXPECTED["small_vocab"]
# The one documented divergence: which spelling of the special tokens counts as special text.
SPECIAL_SPELLINGS = {"<|startoftext|> hi <|endoftext|>", "<start_of_text> hello <end_of_text>"}


def unpadded(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(VOCAB)


def cases(group: str) -> list[dict]:
    return [c for c in EXPECTED["cases"] if c["group"] == group]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("group,count", [("kinetics400", 400), ("ssv2", 174), ("awkward", None)])
def test_ids_match_openai_clip(tok, group, count):
    group_cases = cases(group)
    if count is not None:
        assert len(group_cases) == count
    else:
        assert len(group_cases) >= 60
    rows = tok([c["text"] for c in group_cases])
    assert rows.shape == (len(group_cases), 77) and rows.dtype == torch.long
    wrong = [(c["text"], unpadded(r), c["openai"]) for c, r in zip(group_cases, rows) if unpadded(r) != c["openai"]]
    assert not wrong, wrong[:3]


def test_ids_match_open_clip_except_special_token_spellings(tok):
    differ = set()
    for c in EXPECTED["cases"]:
        ours = unpadded(tok([c["text"]])[0])
        if ours != c["open_clip"]:
            differ.add(c["text"])
    assert differ == SPECIAL_SPELLINGS
    # open_clip differs from OpenAI there too; we follow OpenAI (and Hugging Face's vocab names)
    for c in EXPECTED["cases"]:
        if c["text"] in SPECIAL_SPELLINGS:
            assert c["openai"] != c["open_clip"]
    assert EXPECTED["disagreements_with_open_clip"]["openai"] == len(SPECIAL_SPELLINGS)


def test_ids_match_hugging_face_where_it_agrees_with_open_clip(tok):
    agreeing = [c for c in EXPECTED["cases"] if c["hf"] == c["open_clip"]]
    assert len(agreeing) > 600  # every class name and most awkward strings
    for c in agreeing:
        assert unpadded(tok([c["text"]])[0]) == c["hf"], c["text"]


def test_special_ids_and_edge_strings(tok):
    assert (tok.start_id, tok.end_id) == (49406, 49407) == tuple(EXPECTED["special_ids"].values())
    assert tok.vocab_size == 49408
    assert unpadded(tok([""])[0]) == [49406, 49407]
    assert unpadded(tok(["   \t\n "])[0]) == [49406, 49407]
    long = [c for c in EXPECTED["cases"] if len(c["text"]) == 400]
    assert len(long) == 1
    row = tok([long[0]["text"]])[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row != 0).all()  # cut at 77, end token kept


def test_truncation_at_any_context_length(tok):
    assert len(EXPECTED["truncation"]) >= 30
    for c in EXPECTED["truncation"]:
        row = tok([c["text"]], context_length=c["context_length"])[0].tolist()
        assert row == c["open_clip"], (c["text"][:30], c["context_length"])


def test_tokenize_function(tok):
    one = tokenize("a photo of a dog", vocab=VOCAB)
    assert one.shape == (1, 77) and one.dtype == torch.long
    assert one[0, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]
    many = dist_video.tokenize(["a", "b c"], vocab=VOCAB, context_length=10)
    assert many.shape == (2, 10)
    assert torch.equal(many, tok(["a", "b c"], context_length=10))
    with pytest.raises(TypeError):
        tok(["fine", 3])
    with pytest.raises(ValueError, match="at least 2"):
        tok(["x"], context_length=1)


def test_decode_round_trip(tok):
    assert tok.decode(tok(["A Photo of a DOG!"])[0]) == "a photo of a dog !"
    assert tok.decode(tok.encode("café ☕")) == "café ☕"


# ----------------------------------------------------------------------------- vocabulary files
@pytest.mark.parametrize("layout", ["gz", "hf_pair", "hf_json"])
def test_small_vocabulary_in_every_layout(layout):
    t = Tokenizer(ASSETS / SMALL[layout])
    assert t.vocab_size == 512 + SMALL["merges"] + 2
    assert (t.start_id, t.end_id) == (SMALL["special_ids"]["start"], SMALL["special_ids"]["end"])
    hf_checked = 0
    for c in SMALL["cases"]:
        ours = unpadded(t([c["text"]])[0])
        assert ours == c["openai"], c["text"]
        if c["text"] not in SPECIAL_SPELLINGS:
            assert ours == c["open_clip"], c["text"]
        if c["hf"] == c["open_clip"]:
            assert ours == c["hf"], c["text"]
            hf_checked += 1
    assert hf_checked > 90


def test_vocab_is_parsed_once_per_file(tmp_path):
    a, b = Tokenizer(VOCAB), Tokenizer(VOCAB)
    assert a.encoder is b.encoder and a.bpe_ranks is b.bpe_ranks
    copy = tmp_path / "v.txt.gz"
    shutil.copyfile(ASSETS / SMALL["gz"], copy)
    first = Tokenizer(copy)
    assert Tokenizer(copy).encoder is first.encoder
    # a changed file is read again
    lines = gzip.decompress(copy.read_bytes()).decode().split("\n")[:1001]
    copy.write_bytes(gzip.compress("\n".join(lines).encode()))
    again = Tokenizer(copy)
    assert again.encoder is not first.encoder and again.vocab_size == 512 + 1000 + 2


def test_unreadable_vocab_names_the_file(tmp_path):
    bad = tmp_path / "broken.txt.gz"
    bad.write_bytes(VOCAB.read_bytes()[:5000])
    with pytest.raises(ValueError, match="broken.txt.gz"):
        Tokenizer(bad)
    not_bpe = tmp_path / "tokenizer.json"
    not_bpe.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a byte-pair-encoding tokenizer.json"):
        Tokenizer(not_bpe)
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "vocab.json").write_text(json.dumps({"a": 0}))
    (pair / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="no <\\|startoftext\\|> token"):
        Tokenizer(pair)


# ----------------------------------------------------------------------------- find_vocab
@pytest.fixture
def no_packages(monkeypatch):
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package",))


def test_find_vocab_explicit(tmp_path, no_packages):
    assert find_vocab(vocab=VOCAB) == VOCAB
    assert find_vocab(vocab=VOCAB.parent) == VOCAB.parent / tk.OPENAI_VOCAB_NAME
    pair = ASSETS / SMALL["hf_pair"]
    assert find_vocab(vocab=pair) == pair
    assert find_vocab(vocab=pair / "vocab.json") == pair
    hj = ASSETS / SMALL["hf_json"]
    assert find_vocab(vocab=hj) == hj / "tokenizer.json"
    with pytest.raises(VocabNotFoundError, match="nowhere.gz does not exist"):
        find_vocab(vocab=tmp_path / "nowhere.gz")
    with pytest.raises(VocabNotFoundError, match="not a BPE vocabulary"):
        find_vocab(vocab=tmp_path)  # an empty folder
    # an explicit vocabulary wins over one beside the checkpoint
    (tmp_path / tk.OPENAI_VOCAB_NAME).write_bytes(b"")
    assert find_vocab(checkpoint_path=tmp_path / "model.pt", vocab=pair) == pair


def test_find_vocab_beside_checkpoint_and_hf_folder(tmp_path, no_packages):
    ckpt = tmp_path / "ViT-B-16.pt"
    ckpt.write_bytes(b"x")
    shutil.copyfile(VOCAB, tmp_path / tk.OPENAI_VOCAB_NAME)
    assert find_vocab(checkpoint_path=ckpt) == tmp_path / tk.OPENAI_VOCAB_NAME
    hf = tmp_path / "hf"
    shutil.copytree(ASSETS / SMALL["hf_pair"], hf)
    assert find_vocab(checkpoint_path=hf) == hf
    assert find_vocab(checkpoint_path=hf / "model.safetensors") == hf
    js = tmp_path / "js"
    shutil.copytree(ASSETS / SMALL["hf_json"], js)
    assert find_vocab(checkpoint_path=js) == js / "tokenizer.json"


def test_find_vocab_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_open_clip"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('find_vocab must not import the package')\n")
    shutil.copyfile(VOCAB, pkg / tk.OPENAI_VOCAB_NAME)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("dist_video_test_no_such_package", "fake_open_clip"))
    assert find_vocab(checkpoint_path=tmp_path / "elsewhere" / "m.pt") == pkg / tk.OPENAI_VOCAB_NAME
    assert "fake_open_clip" not in sys.modules
    assert tokenize("a photo of a dog")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_find_vocab_error_lists_every_place(tmp_path, no_packages):
    with pytest.raises(VocabNotFoundError) as info:
        find_vocab(checkpoint_path=tmp_path / "model.pt")
    msg = str(info.value)
    assert "the vocab argument: not given" in msg
    assert str(tmp_path / tk.OPENAI_VOCAB_NAME) in msg
    assert str(tmp_path / "vocab.json") in msg and str(tmp_path / "tokenizer.json") in msg
    assert "installed package 'dist_video_test_no_such_package': not installed" in msg
    assert "vocab=PATH" in msg
    with pytest.raises(VocabNotFoundError, match="no checkpoint path given"):
        tokenize("x")


def test_missing_ftfy_is_explained(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ImportError, match="pip install ftfy"):
        tok(["hello"])


# ----------------------------------------------------------------------------- class lists
def test_builtin_class_lists_are_the_tokenized_ones():
    folder = resources.files("dist_video") / "assets" / "classnames"
    k400 = (folder / "kinetics400.txt").read_text(encoding="utf-8").splitlines()
    ssv2 = (folder / "ssv2.txt").read_text(encoding="utf-8").splitlines()
    assert len(k400) == len(set(k400)) == 400 and all(n.strip() == n and n for n in k400)
    assert len(ssv2) == len(set(ssv2)) == 174 and all(n.strip() == n and n for n in ssv2)
    assert not any("[" in n or "]" in n for n in ssv2)
    assert k400[:2] == ["abseiling", "air drumming"] and "passing American football (in game)" in k400
    assert ssv2[0] == "Approaching something with your camera"
    assert k400 == [c["text"] for c in cases("kinetics400")]
    assert ssv2 == [c["text"] for c in cases("ssv2")]
