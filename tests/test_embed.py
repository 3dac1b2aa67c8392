"""Embeddings: rows equal ``encode_video`` of the same clips, bad files are reported without
losing the others, an interrupted run resumes with only the missing files, windows give one
row each, and text search ranks by cosine similarity."""

from __future__ import annotations

import csv
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_cli, start_cli
from data_helpers import write_coded_video
from resume_helpers import kill_when
from safetensors.torch import load_file
from zero_shot_helpers import ModuloTokenizer

from dist_video.engine import data as engine_data
from dist_video.engine.embed import EmbeddingIndex, embed_files, read_embeddings, search_embeddings
from dist_video.engine.predict import DEFAULT_PREPROCESS, text_query

PREPROCESS = {**DEFAULT_PREPROCESS, "crop_size": 64, "test_scale": 64, "num_views": 2, "num_frames": 16}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("embed")
    return [str(write_coded_video(d / f"v{i}.mp4", 20 + 6 * i, width=80, height=64, seed=i)) for i in range(5)]


class Counting:
    """An inference model that counts the files it embeds (one ``encode_video`` call per file)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.config, self.class_names, self.num_classes = inner.config, inner.class_names, inner.num_classes

    def __call__(self, video):
        return self.inner(video)

    def encode_video(self, video):
        self.calls += 1
        return self.inner.encode_video(video)


class Interrupt(Exception):
    pass


def test_rows_equal_encode_video_of_the_same_clips(official_model, files, tmp_path):
    fused = official_model.fuse()
    result = embed_files(fused, files[:3], PREPROCESS, out=tmp_path / "out")
    assert result.embeddings.shape == (3, 64) and [r[0] for r in result.rows] == files[:3]
    with torch.no_grad():
        for i, path in enumerate(files[:3]):
            clips = engine_data.test_clips_of_file(path, PREPROCESS, num_frames=16)
            torch.testing.assert_close(result.embeddings[i], fused.encode_video(clips).mean(0), rtol=0, atol=1e-6)
    saved = load_file(str(tmp_path / "out" / "embeddings.safetensors"))
    torch.testing.assert_close(saved["embeddings"], result.embeddings, rtol=0, atol=0)
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [(r["row"], r["video"], r["start"], r["end"]) for r in rows] == [(str(i), f, "", "") for i, f in
                                                                            enumerate(files[:3])]
    assert not (tmp_path / "out" / ".partial").exists()
    unit = embed_files(fused, files[:2], PREPROCESS, normalize=True)
    torch.testing.assert_close(unit.embeddings, F.normalize(result.embeddings[:2], dim=1), rtol=0, atol=1e-6)


def test_bad_files_are_reported_and_the_others_embedded(official_model, files, tmp_path):
    (tmp_path / "bad.mp4").write_text("not a video")
    paths = [files[0], str(tmp_path / "bad.mp4"), str(tmp_path / "missing.mp4"), files[1]]
    result = embed_files(official_model, paths, PREPROCESS, out=tmp_path / "out")
    assert [r[0] for r in result.rows] == [files[0], files[1]]
    assert [e["video"] for e in result.errors] == paths[1:3]
    assert result.errors[1]["error"] == "file not found"


def test_an_interrupted_run_resumes_with_only_the_missing_files(official_model, files, tmp_path):
    fused = official_model.fuse()
    reference = embed_files(fused, files, PREPROCESS)
    first = Counting(fused)

    def stop_after_three(path):
        if first.calls == 3:
            raise Interrupt  # as if the process were killed after the third file

    with pytest.raises(Interrupt):
        embed_files(first, files, PREPROCESS, out=tmp_path / "out", progress=stop_after_three)
    assert not (tmp_path / "out" / "embeddings.safetensors").exists()
    assert (tmp_path / "out" / ".partial" / "files.txt").read_text().split() == files[:3]
    second = Counting(fused)
    result = embed_files(second, files, PREPROCESS, out=tmp_path / "out")
    assert second.calls == 2  # only the two files the first run did not finish
    assert [r[0] for r in result.rows] == files
    torch.testing.assert_close(result.embeddings, reference.embeddings, rtol=0, atol=1e-6)
    third = Counting(fused)
    again = embed_files(third, files[::-1], PREPROCESS, out=tmp_path / "out")
    assert third.calls == 0 and [r[0] for r in again.rows] == files[::-1]  # rows follow the list given
    assert read_embeddings(tmp_path / "out").rows == again.rows


def test_a_partial_file_of_a_killed_run_is_recomputed(official_model, files, tmp_path):
    """Rows written for a file that files.txt does not list (killed in the middle) are dropped."""
    fused = official_model.fuse()
    out = tmp_path / "out"
    embed_files(fused, files[:2], PREPROCESS, out=out)  # complete
    partial = out / ".partial"
    first = Counting(fused)

    def stop_after_one(path):
        if first.calls == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        embed_files(first, files[:4], PREPROCESS, out=out, progress=stop_after_one)
    lines = (partial / "files.txt").read_text().split()
    (partial / "files.txt").write_text("\n".join(lines[:-1]) + "\n")  # the last file's end marker never written
    second = Counting(fused)
    result = embed_files(second, files[:4], PREPROCESS, out=out)
    assert second.calls == 2 and [r[0] for r in result.rows] == files[:4]


def test_windows_give_one_row_each(official_model, tmp_path):
    path = write_coded_video(tmp_path / "long.mp4", 90, width=80, height=64, fps=10)
    result = embed_files(official_model.fuse(), [str(path)], PREPROCESS, window=3, stride=2, out=tmp_path / "out")
    assert [(r[1], r[2]) for r in result.rows] == [(0.0, 3.0), (2.0, 5.0), (4.0, 7.0), (6.0, 9.0)]
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [(r["start"], r["end"]) for r in rows][1] == ("2.0", "5.0")
    assert result.embeddings.shape == (4, 64)


def test_search_ranks_by_cosine_similarity():
    index = EmbeddingIndex(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.1], [0.0, 5.0]]),
                           [("a.mp4", None, None), ("b.mp4", 0.0, 4.0), ("c.mp4", None, None), ("d.mp4", None, None)])
    hits = search_embeddings(index, torch.tensor([0.0, 2.0]), topk=3)
    assert [h["video"] for h in hits] == ["d.mp4", "b.mp4", "c.mp4"]
    expected = [1.0, 0.8, 0.1 / 1.01 ** 0.5]  # cosines with (0, 1)
    assert [h["score"] for h in hits] == [pytest.approx(e, abs=1e-6) for e in expected]
    assert hits[1]["start"] == 0.0 and hits[0]["rank"] == 1
    with pytest.raises(ValueError, match="3 dimensions but the embeddings have 2"):
        search_embeddings(index, torch.zeros(3))
    # a query as a model gives it: another dtype, attached to autograd (on a GPU: another device)
    query = torch.tensor([0.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    assert [h["video"] for h in search_embeddings(index, query, topk=3)] == ["d.mp4", "b.mp4", "c.mp4"]


def test_text_query_is_the_normalised_text_embedding(official_model):
    official_model.clip.tokenizer = ModuloTokenizer()
    q = text_query(official_model, "a person juggling")
    expected = F.normalize(official_model.encode_text(ModuloTokenizer()(["a person juggling"]))[0], dim=0)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_cli_embed_and_search(official_model, files, tmp_path):
    official_model.clip.tokenizer = ModuloTokenizer()
    from dist_video.engine.predict import use_labels
    use_labels(official_model, "a, b", prompt="{}")
    official_model.save_pretrained(tmp_path / "model", metadata={"preprocess": PREPROCESS})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return run_cli(*args, env=env)

    bad = tmp_path / "bad.mp4"
    bad.write_text("x")
    proc = cli("embed", str(tmp_path / "model"), files[0], str(bad), files[1], "--out", str(tmp_path / "emb"),
               "--normalize", "--device", "cpu", "--no-progress")
    assert proc.returncode == 1 and f"dist-video embed: error: {bad}: " in proc.stderr, proc.stderr
    index = read_embeddings(tmp_path / "emb")
    assert [r[0] for r in index.rows] == [files[0], files[1]]
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(2))
    proc = cli("embed", str(tmp_path / "model"), files[0], files[1], "--out", str(tmp_path / "emb"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    # official-tiny's text tower has 512 tokens: search needs its own vocabulary, and says so
    proc = cli("search", str(tmp_path / "emb"), "a person juggling", "--model", str(tmp_path / "model"))
    assert proc.returncode == 2 and "text tower embeds 512" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_embed_killed_half_way_resumes_with_the_missing_files(official_model, tmp_path):
    """SIGKILL in the middle of `dist-video embed`; the same command again embeds only the files
    the killed run had not finished (its .partial/files.txt), and the result equals one run's."""
    import re

    paths = [str(write_coded_video(tmp_path / f"k{i}.mp4", 24, width=80, height=64, seed=i)) for i in range(24)]
    official_model.set_linear_head(3).save_pretrained(tmp_path / "model", metadata={"preprocess": PREPROCESS})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["embed", str(tmp_path / "model"), *paths, "--device", "cpu", "--no-progress"]
    finished = tmp_path / "out" / ".partial" / "files.txt"
    proc = start_cli(*args, "--out", str(tmp_path / "out"), env=env, stdout=subprocess.DEVNULL)
    kill_when(proc, lambda: finished.exists() and len(finished.read_text().split()) >= 3, timeout=240,
              what="3 files were embedded")
    done_before = len(finished.read_text().split())
    assert 3 <= done_before < len(paths), "the run was not killed half-way"
    resumed = run_cli(*args, "--out", str(tmp_path / "out"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    computed = int(re.search(r"(\d+) file\(s\) embedded now", resumed.stderr).group(1))
    assert computed == len(paths) - done_before
    whole = run_cli(*args, "--out", str(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr
    a, b = read_embeddings(tmp_path / "out"), read_embeddings(tmp_path / "whole")
    assert a.rows == b.rows
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=0, atol=1e-6)
