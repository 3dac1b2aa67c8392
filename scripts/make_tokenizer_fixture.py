"""Write the tokenizer fixtures and the built-in class-name lists, with the owning libraries.

Run once, in a separate virtual environment outside the repository (the libraries used here
are not dependencies of dist-video; the tests only read what this script writes):

    python -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/fixture-venv/bin/pip install open_clip_torch transformers ftfy regex
    /tmp/fixture-venv/bin/pip install --no-deps openai-clip      # OpenAI's own `clip` package
    /tmp/fixture-venv/bin/python scripts/make_tokenizer_fixture.py

(this run: torch 2.14.1, torchvision 0.29.1, open_clip_torch 3.3.0, transformers 5.23.0,
openai-clip 1.0.1, ftfy 6.3.1, regex 2026.11.15; the versions are recorded in the JSON.)

What it writes:

* ``src/dist_video/assets/classnames/kinetics400.txt``: torchvision's ``_KINETICS400_CATEGORIES``
  (``torchvision/models/_meta.py`` of the PyPI wheel), one class per line, in label order.
* ``src/dist_video/assets/classnames/ssv2.txt``: the 174 Something-Something v2 templates of
  gluoncv's ``SomethingSomethingV2`` dataset class (``gluoncv/data/somethingsomethingv2/
  classification.py`` in the PyPI wheel ``gluoncv==0.10.5.post0``, fetched with
  ``pip download --no-deps`` and read with ``ast``, not imported), ``[something]`` -> ``something``.
* ``tests/assets/vocab/bpe_simple_vocab_16e6.txt.gz``: the vocabulary bundled with open_clip
  (the same bytes as OpenAI's ``clip`` package's; checked).
* ``tests/assets/tokenizer/expected_ids.json``: for every class name and a list of awkward
  strings, the ids of open_clip's ``SimpleTokenizer`` (``open_clip.tokenize``), of OpenAI's
  ``clip.tokenize(..., truncate=True)`` and of Hugging Face's ``CLIPTokenizer`` (unpadded:
  start ... end), plus truncation cases at several context lengths.
* ``tests/assets/tokenizer/small/``: a small vocabulary (the first 2000 merges of OpenAI's)
  in the three file layouts: ``bpe_small_2000.txt.gz`` (OpenAI's format; ids from open_clip's
  ``SimpleTokenizer(bpe_path=...)``), ``hf_pair/`` (``vocab.json`` + ``merges.txt``, loaded
  back by Hugging Face's ``CLIPTokenizer`` as a check) and ``hf_json/`` (``tokenizer.json`` +
  ``tokenizer_config.json`` written by ``CLIPTokenizer.save_pretrained``), with the ids of
  open_clip and Hugging Face on that vocabulary.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSNAMES = ROOT / "src" / "dist_video" / "assets" / "classnames"
ASSETS = ROOT / "tests" / "assets"
SMALL_MERGES = 2000

AWKWARD = [
    "",
    " ",
    " \t\n  \r\n ",
    "a photo of a dog",
    "A Photo Of A DOG.",
    "Café crème brûlée",
    "naïve résumé façade",
    "Ångström Øresund Łódź",
    "ß straße STRASSE",
    "İstanbul ıi IJ ǅ",
    "e\u0301 combining acute vs é",
    "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312\u036bg\u030c\u0317\u035ao\u0308\u031c",
    "I ❤️ NY 🍕🍕",
    "family 👨\u200d👩\u200d👧\u200d👦 and flag 🏳️\u200d🌈 and thumbs 👍🏽",
    "rock &amp; roll",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;lt;b&amp;gt; double escaped",
    "&amp;amp; triple",
    "&#39;quoted&#39; &#x27;hex&#x27; &quot;dq&quot;",
    "fish &amp chips &copy; 2023 &nbsp;space &eacute;t&eacute;",
    "<b>real tags</b> &amp; an entity",
    "“Hello,” she said — it’s ‘fine’…",
    "don’t stop ‚low‘ „german“ «french» ‹single›",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３ ！？",
    "ｶﾀｶﾅ halfwidth katakana",
    "ﬁne ﬂow ﬀ ﬃ ﬄ ﬅ ﬆ",
    "Œuvre æsthetic Ĳssel",
    "Москва 北京 東京 서울 القاهرة עברית ελληνικά हिन्दी ไทย",
    "日本語のテキストと English mixed",
    "x² + y³ = z⁴ and H₂O",
    "½ ¼ ¾ ⅓ ① ② ③ Ⅻ ⅻ",
    "٣ ٤ ٥ ۱۲ १२३ ๑๒",
    "10,000.50 $ €100 ¥500 £3 1e-5 3.14159",
    "line one\nline two\tthree\r\nfour",
    "para\u2028sep\u2029end",
    "nbsp\u00a0here ideographic\u3000space en\u2002em\u2003thin\u2009",
    "zero\u200bwidth soft\u00adhyphen bom\ufeffhere",
    "bell\x07 and \x1b[31mred\x1b[0m",
    "file\x1cgroup\x1drecord\x1eunit\x1fsep and vt\x0bff\x0c",
    "Ã©tÃ© Ã  la plage",
    "â€œquotedâ€\x9d and doesnâ€™t",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "it's we're they've I'm you'll he'd can't won't",
    "IT'S WE'RE THEY'VE",
    "'s'''s rock'n'roll ''quoted'' o'clock",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "https://example.com/path?q=1&amp;r=2#frag",
    "snake_case_name and camelCase and kebab-case",
    "C++ / C# / F# / .NET",
    "!!!???... --- *** ~~~ ^^^",
    "1234567890",
    "𝕳𝖊𝖑𝖑𝖔 𝔀𝓸𝓻𝓵𝓭",
    "private \ue000 use",
    "<|startoftext|> hi <|endoftext|>",
    "!<|endoftext|>",
    "<start_of_text> hello <end_of_text>",
    "a video of a person playing guitar.",
    "a photo of a person {} doing something.",
    "(in game) [something] {braces}",
    "tab\tseparated\tvalues",
    "ends with spaces   ",
    "   starts with spaces",
]


def long_text() -> str:
    words = ("the quick brown fox jumps over the lazy dog while a video of people "
             "playing basketball is recorded in slow motion ").split()
    out, i = [], 0
    while len(" ".join(out)) < 400:
        out.append(words[i % len(words)])
        i += 1
    return " ".join(out)[:400]


def unpadded(row) -> list[int]:
    row = [int(x) for x in row]
    while row and row[-1] == 0:
        row.pop()
    return row


def truncated(ids: list[int], end: int, length: int = 77) -> list[int]:
    """OpenAI's clip.tokenize(truncate=True) rule, for its SimpleTokenizer's raw encode()."""
    return ids if len(ids) <= length else ids[:length - 1] + [end]


def kinetics400() -> list[str]:
    from torchvision.models._meta import _KINETICS400_CATEGORIES
    names = list(_KINETICS400_CATEGORIES)
    assert len(names) == 400 == len(set(names))
    return names


def ssv2(tmp: Path) -> list[str]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp),
                    "gluoncv==0.10.5.post0"], check=True)
    wheel = next(tmp.glob("gluoncv-*.whl"))
    src = zipfile.ZipFile(wheel).read("gluoncv/data/somethingsomethingv2/classification.py").decode()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and any(
                isinstance(t, ast.Attribute) and t.attr == "classes" for t in node.targets):
            names = [n.replace("[", "").replace("]", "") for n in ast.literal_eval(node.value)]
            assert len(names) == 174 == len(set(names))
            return names
    raise RuntimeError("no classes list in gluoncv's SomethingSomethingV2")


def import_openai_clip():
    """OpenAI's `clip` package imports `packaging` through pkg_resources, which recent setuptools
    no longer has; give it the real `packaging` module under that name."""
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            import packaging.version
            sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    import clip
    return clip


def write_small_vocab(full_gz: Path, out: Path) -> tuple[Path, Path, Path]:
    from transformers import CLIPTokenizer
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(full_gz).read().decode("utf-8").split("\n")
    header, merges = lines[0], lines[1:SMALL_MERGES + 1]
    out.mkdir(parents=True, exist_ok=True)
    gz = out / f"bpe_small_{SMALL_MERGES}.txt.gz"
    with gzip.GzipFile(gz, "wb", mtime=0) as f:
        f.write("\n".join([header, *merges]).encode("utf-8"))  # no trailing newline: no empty merge
    # Hugging Face's legacy pair: vocab.json is the same id order as OpenAI's gz
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] \
        + ["<|startoftext|>", "<|endoftext|>"]
    pair = out / "hf_pair"
    pair.mkdir(exist_ok=True)
    (pair / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    (pair / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    hf = CLIPTokenizer.from_pretrained(str(pair))  # Hugging Face reads the pair back
    hj = out / "hf_json"
    if hj.exists():
        shutil.rmtree(hj)
    hf.save_pretrained(str(hj))  # and writes its own tokenizer.json
    return gz, pair, hj


def main() -> None:
    import open_clip
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    clip = import_openai_clip()
    oc_gz = Path(open_clip.tokenizer.default_bpe())
    clip_gz = Path(clip.simple_tokenizer.default_bpe())
    assert oc_gz.read_bytes() == clip_gz.read_bytes(), "open_clip's and clip's vocabularies differ"

    with tempfile.TemporaryDirectory() as tmp:
        k400 = kinetics400()
        sth = ssv2(Path(tmp))
    CLASSNAMES.mkdir(parents=True, exist_ok=True)
    (CLASSNAMES / "kinetics400.txt").write_text("\n".join(k400) + "\n", encoding="utf-8")
    (CLASSNAMES / "ssv2.txt").write_text("\n".join(sth) + "\n", encoding="utf-8")

    (ASSETS / "vocab").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(oc_gz, ASSETS / "vocab" / "bpe_simple_vocab_16e6.txt.gz")

    # ---- full vocabulary: open_clip, OpenAI, Hugging Face
    oc = SimpleTokenizer()
    tmp_pair = Path(tempfile.mkdtemp())
    symbols = list(open_clip.tokenizer.bytes_to_unicode().values())
    lines = gzip.open(oc_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines] \
        + ["<|startoftext|>", "<|endoftext|>"]
    (tmp_pair / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (tmp_pair / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    hf = CLIPTokenizer.from_pretrained(str(tmp_pair))
    assert hf("a photo of a dog")["input_ids"] == unpadded(oc("a photo of a dog")[0])

    def hf_ids(text: str, length: int = 77) -> list[int]:
        return hf(text, truncation=True, max_length=length)["input_ids"]

    groups = [("kinetics400", k400), ("ssv2", sth), ("awkward", AWKWARD + [long_text()])]
    cases, disagree = [], {"openai": 0, "hf": 0}
    for group, texts in groups:
        ocr = oc(texts)
        oar = clip.tokenize(texts, truncate=True)
        for text, a, b in zip(texts, ocr, oar):
            c = dict(group=group, text=text, open_clip=unpadded(a), openai=unpadded(b), hf=hf_ids(text))
            disagree["openai"] += c["openai"] != c["open_clip"]
            disagree["hf"] += c["hf"] != c["open_clip"]
            cases.append(c)

    truncation = []
    for text in [long_text(), "a " * 75, "a " * 76, "a " * 74, k400[0], sth[-1], ""]:
        for length in (2, 3, 8, 16, 77):
            truncation.append(dict(text=text, context_length=length,
                                   open_clip=oc([text], context_length=length)[0].tolist()))

    # ---- small vocabulary in three layouts
    small = ASSETS / "tokenizer" / "small"
    gz, pair, hj = write_small_vocab(oc_gz, small)
    oc_small = SimpleTokenizer(bpe_path=str(gz))
    oa_small = clip.simple_tokenizer.SimpleTokenizer(bpe_path=str(gz))
    oa_start, oa_end = oa_small.encoder["<|startoftext|>"], oa_small.encoder["<|endoftext|>"]
    hf_small = CLIPTokenizer.from_pretrained(str(hj))
    small_cases = []
    for text in AWKWARD + k400[:40] + sth[:20]:
        small_cases.append(dict(text=text, open_clip=unpadded(oc_small([text])[0]),
                                openai=truncated([oa_start, *oa_small.encode(text), oa_end], oa_end),
                                hf=hf_small(text, truncation=True, max_length=77)["input_ids"]))

    out = dict(
        generated_by="scripts/make_tokenizer_fixture.py",
        versions={name: version(name) for name in ("open_clip_torch", "openai-clip", "transformers",
                                                     "tokenizers", "ftfy", "regex", "torch")},
        vocab="tests/assets/vocab/bpe_simple_vocab_16e6.txt.gz",
        vocab_sha256=hashlib.sha256(oc_gz.read_bytes()).hexdigest(),
        note=("ids are unpadded rows: start, ..., end (zeros follow up to the context length). "
              "open_clip: SimpleTokenizer / open_clip.tokenize; openai: clip.tokenize(truncate=True); "
              "hf: transformers.CLIPTokenizer (no ftfy / HTML clean-up, so it differs on some strings)."),
        special_ids=dict(start=oc.sot_token_id, end=oc.eot_token_id),
        disagreements_with_open_clip=disagree,
        cases=cases,
        truncation=truncation,
        small_vocab=dict(merges=SMALL_MERGES, gz=str(gz.relative_to(ASSETS)), hf_pair=str(pair.relative_to(ASSETS)),
                         hf_json=str(hj.relative_to(ASSETS)), special_ids=dict(start=oc_small.sot_token_id,
                                                                                  end=oc_small.eot_token_id),
                         cases=small_cases),
    )
    (ASSETS / "tokenizer").mkdir(parents=True, exist_ok=True)
    (ASSETS / "tokenizer" / "expected_ids.json").write_text(
        json.dumps(out, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{len(cases)} cases ({len(k400)} Kinetics-400, {len(sth)} SSv2), disagreements with open_clip: "
          f"{disagree}; torch {torch.__version__}")
    for c in cases:
        if c["openai"] != c["open_clip"]:
            print("openai != open_clip:", repr(c["text"]))


if __name__ == "__main__":
    main()
