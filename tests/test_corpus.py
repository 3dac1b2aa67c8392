"""Corpus jobs on Ray (dist_video.corpus): the same embeddings as the single-process embed, one
row per input whatever happens to it (broken, missing, killed driver, killed actor), WebDataset
shards and path lists as inputs, and the Parquet output readable by search.

Ray is started once for the module, with the loopback node address, and shut down after it."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_coded_video
from deploy_helpers import CLASS_NAMES, make_tiny_model_folder, make_tiny_text_model_folder

from dist_video.corpus import (MissingExtraError, corpus_uint8_clips, is_corpus_folder, list_inputs, read_corpus,
                               read_corpus_embeddings, run_corpus)
from dist_video.data.transforms import normalize_clips
from dist_video.engine import data as engine_data
from dist_video import load_model
from dist_video.cli import main
from dist_video.engine.embed import search_embeddings

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_clip):
    """A tiny model folder and five short videos of different lengths and shapes."""
    d = tmp_path_factory.mktemp("corpus")
    model = make_tiny_model_folder(d / "model", tiny_clip)
    (d / "videos").mkdir()
    videos = [write_coded_video(d / "videos" / f"v{i}.mp4", 12 + 5 * i, width=64 + 8 * i, height=64, seed=i)
              for i in range(5)]
    return model, [str(v) for v in videos]


#: Ray's servers listen on every interface, whatever node address they are given: the tests that
#: start Ray run in a private network namespace (only loopback), through
#: test_ray_jobs_run_in_a_private_network_namespace, which sets this variable.
IN_PRIVATE_NETWORK = os.environ.get("DIST_VIDEO_PRIVATE_NETWORK") == "1"
starts_ray = pytest.mark.skipif(not IN_PRIVATE_NETWORK,
                                reason="starts Ray: runs inside test_ray_jobs_run_in_a_private_network_namespace")


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray instance on 127.0.0.1 for the module (4 logical CPUs: 2 actors and 2 decode tasks),
    shut down after the last test."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def _copies(videos: list[str], folder: Path, n: int) -> list[str]:
    """``n`` distinct files (copies of ``videos`` in turn), for jobs long enough to interrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    return [str(shutil.copy(videos[i % len(videos)], folder / f"c{i:02d}.mp4")) for i in range(n)]


def _raw_ids(out: Path) -> list[str]:
    """Every id in every shard, duplicates included (not :func:`read_corpus`'s deduplicated view)."""
    import pyarrow.parquet as pq

    return [i for s in sorted(out.glob("part-*.parquet")) for i in pq.read_table(s).column("id").to_pylist()]


# ------------------------------------------------------------------------------- without Ray
def test_inputs_from_folders_lists_and_webdataset_shards(corpus, tmp_path):
    _, videos = corpus
    (tmp_path / "list.txt").write_text(f"# a comment\n{videos[0]}\n\n{videos[1]}\n{videos[0]}\n")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "path"], ["first", videos[2]], ["second", videos[3]]])
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        tar.add(videos[4], arcname="clips/sample-a.mp4")
        tar.add(videos[4], arcname="clips/sample-a.json")  # not a video member: ignored
        tar.add(videos[3], arcname="sample-b.x.mkv")
    rows = list_inputs([tmp_path / "list.txt", tmp_path / "list.csv", tmp_path / "shard-000.tar",
                        Path(videos[0]).parent, "missing.mp4"])
    ids = [r["id"] for r in rows]
    assert ids == [videos[0], videos[1], "first", "second", "clips/sample-a", "sample-b",
                   *videos[2:], "missing.mp4"]  # each id once, the first listing wins
    tar_rows = {r["id"]: r for r in rows if r["member"]}
    assert tar_rows["sample-b"]["member"] == "sample-b.x.mkv"
    assert tar_rows["clips/sample-a"]["path"].endswith("shard-000.tar#clips/sample-a.mp4")


def test_uint8_clips_normalised_are_the_test_clips(corpus):
    model, videos = corpus
    preprocess = load_model(str(model), device="cpu").preprocess
    for path in videos[:2]:
        clips = corpus_uint8_clips(path, preprocess, num_frames=8)
        assert clips.dtype == torch.uint8 and clips.shape == (2, 3, 8, 64, 64)
        want = engine_data.test_clips_of_file(path, preprocess, num_frames=8)
        torch.testing.assert_close(normalize_clips(clips, preprocess["mean"], preprocess["std"]), want,
                                   rtol=0, atol=0)


# ---------------------------------------------------------------------------------- with Ray
@pytest.mark.slow
@starts_ray
def test_embeddings_equal_the_single_process_embed_and_search_reads_them(corpus, ray_cluster, tmp_path):
    model, videos = corpus
    out = tmp_path / "out"
    summary = run_corpus(str(model), videos, out, actors=2, batch_size=2, shard_rows=2, progress=False)
    assert (summary.videos, summary.errors, summary.skipped, summary.total) == (5, 0, 0, 5)
    want = load_model(str(model), device="cpu").embed(videos)
    table = read_corpus(out)
    got = {i: np.asarray(e, dtype=np.float32) for i, e in zip(table.column("id").to_pylist(),
                                                              table.column("embedding").to_pylist())}
    assert sorted(got) == sorted(videos) and table.column("error").null_count == 5
    for path, row in zip(videos, want.embeddings):
        np.testing.assert_allclose(got[path], row.numpy(), rtol=0, atol=1e-5)
    kind = table.schema.field("embedding").type
    assert (kind.list_size, str(kind.value_type)) == (64, "float")
    assert is_corpus_folder(out) and not is_corpus_folder(tmp_path)
    index = read_corpus_embeddings(out)
    query = want.embeddings[3]
    assert search_embeddings(index, query, topk=1)[0]["video"] == videos[3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 5, "rows": 5, "errors": 0, "shards": 3}
    assert manifest["preprocess"]["crop_size"] == 64 and manifest["software"]["ray"]
    again = run_corpus(str(model), videos, out, progress=False)  # a rerun: nothing left to do
    assert (again.videos, again.skipped, again.total) == (0, 5, 5) and len(_raw_ids(out)) == 5


@pytest.mark.slow
@starts_ray
def test_good_broken_and_missing_files_and_predict_records(corpus, ray_cluster, tmp_path):
    model, videos = corpus
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    inputs = [videos[0], str(broken), str(tmp_path / "missing.mp4"), videos[1]]
    summary = run_corpus(str(model), inputs, tmp_path / "out", task="predict", topk=3, batch_size=4,
                         progress=False)
    assert (summary.videos, summary.errors, summary.total) == (4, 2, 4)
    rows = {r["id"]: r for r in read_corpus(tmp_path / "out").to_pylist()}
    assert sorted(rows) == sorted(inputs)
    assert "cannot open as a video" in rows[str(broken)]["error"] and rows[str(broken)]["top"] is None
    assert rows[str(tmp_path / "missing.mp4")]["error"] == "file not found"
    for want in load_model(str(model), device="cpu").predict([videos[0], videos[1]], topk=3):
        got = rows[want["video"]]
        assert got["error"] is None and len(got["logits"]) == len(CLASS_NAMES)
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in got["top"]],
                                   [t["probability"] for t in want["top"]], atol=1e-5)


@pytest.mark.slow
@starts_ray
def test_webdataset_shard_and_list_inputs(corpus, ray_cluster, tmp_path):
    model, videos = corpus
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in (0, 2):
            tar.add(videos[i], arcname=f"key{i}.mp4")
            tar.add(videos[i], arcname=f"key{i}.txt")
        tar.addfile(tarfile.TarInfo("key9.mp4"))  # an empty member: a row with its error
    (tmp_path / "more.txt").write_text(f"{videos[1]}\n{videos[3]}\n")
    summary = run_corpus(str(model), [tmp_path / "shard-000.tar", tmp_path / "more.txt"], tmp_path / "out",
                         embedding_dtype="float16", progress=False)
    assert (summary.videos, summary.errors) == (5, 1)
    table = read_corpus(tmp_path / "out")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(["key0", "key2", "key9", videos[1], videos[3]])
    assert rows["key9"]["error"] and rows["key9"]["path"].endswith("shard-000.tar#key9.mp4")
    kind = table.schema.field("embedding").type
    assert (kind.list_size, str(kind.value_type)) == (64, "halffloat")
    want = load_model(str(model), device="cpu").embed([videos[0], videos[2], videos[1]]).embeddings
    for key, row in zip(["key0", "key2", videos[1]], want):
        np.testing.assert_allclose(np.asarray(rows[key]["embedding"], dtype=np.float32), row.numpy(),
                                   rtol=1e-3, atol=1e-3)  # float16 storage


DRIVER = """
import sys
from dist_video.corpus import run_corpus
run_corpus(sys.argv[1], sys.argv[4:], sys.argv[2], ray_address=sys.argv[3], batch_size=1, shard_rows=1,
           progress=False)
"""


@pytest.mark.slow
@starts_ray
def test_a_driver_killed_part_way_then_rerun_gives_every_input_once(corpus, ray_cluster, tmp_path):
    model, videos = corpus
    inputs = _copies(videos, tmp_path / "many", 16)
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(model), str(out), address, *inputs], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while len(list(out.glob("part-*.parquet"))) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, f"the driver ended before it was killed: {driver.stderr.read()[-2000:]}"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    written = _raw_ids(out)
    assert 3 <= len(written) < 16 and len(set(written)) == len(written)
    summary = run_corpus(str(model), inputs, out, batch_size=4, progress=False)
    assert summary.skipped == len(written) and summary.videos == 16 - len(written)
    ids = _raw_ids(out)
    assert sorted(ids) == sorted(inputs)  # every input exactly once, nothing lost, no duplicate


def _descendants(root: int) -> list[int]:
    """Process ids under ``root`` (children, their children, ...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        found += children
        frontier = children
    return found


def _model_actor_pids() -> list[int]:
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "MapWorker" in cmd and "CorpusModel" in cmd:
            pids.append(pid)
    return pids


@pytest.mark.slow
@starts_ray
def test_a_model_actor_killed_part_way_is_replaced_and_the_job_completes(corpus, ray_cluster, tmp_path):
    model, videos = corpus
    inputs = _copies(videos, tmp_path / "many", 16)
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_an_actor_after_two_shards():
        deadline = time.monotonic() + 90
        while not killed and time.monotonic() < deadline:
            pids = _model_actor_pids()
            if pids and len(list(out.glob("part-*.parquet"))) >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor_after_two_shards)
    killer.start()
    try:
        summary = run_corpus(str(model), inputs, out, actors=1, batch_size=1, shard_rows=1, progress=False)
    finally:
        killer.join()
    assert killed, "no model actor was found to kill"
    assert (summary.videos, summary.errors, summary.total) == (16, 0, 16)
    assert sorted(_raw_ids(out)) == sorted(inputs)


LOCAL = """
import sys
import ray
from dist_video.cli import main
status = main(["embed", sys.argv[1], *sys.argv[3:], "--out", sys.argv[2], "--ray", "--quiet"])
print("status", status, "ray still connected:", ray.is_initialized())
"""


@pytest.mark.slow
@starts_ray
def test_cli_ray_local_starts_on_loopback_shuts_down_and_search_reads_the_output(corpus, tmp_path, capsys):
    pytest.importorskip("ray")
    _, videos = corpus
    model = make_tiny_text_model_folder(tmp_path / "text-model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", LOCAL, str(model), str(tmp_path / "out"), *videos[:3]], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["status", "0", "ray", "still", "connected:", "False"]
    assert "3 videos (0 errors)" in done.stderr and "videos/s" in done.stderr
    assert sorted(read_corpus(tmp_path / "out").column("id").to_pylist()) == sorted(videos[:3])
    assert main(["search", str(tmp_path / "out"), "juggling", "--model", str(model), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(h["video"] for h in hits) == sorted(videos[:3])


def test_without_ray_the_message_names_the_extra(corpus, tmp_path, monkeypatch, capsys):
    model, videos = corpus
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"dist-video\[ray\]"):
        run_corpus(str(model), videos[:1], tmp_path / "out")
    assert main(["predict", str(model), videos[0], "--ray", "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'dist-video[ray]'" in capsys.readouterr().err
    assert main(["predict", str(model), videos[0], "--ray"]) == 2  # no --out
    assert "needs --out DIR" in capsys.readouterr().err


TWO_NODES = """
import sys
from ray.cluster_utils import Cluster
import ray
from dist_video.corpus import run_corpus
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                          "include_dashboard": False})
cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, logging_level="WARNING")
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    summary = run_corpus(sys.argv[1], sys.argv[3:], sys.argv[2], ray_address=cluster.address, actors=2,
                         batch_size=1, shard_rows=1, progress=False)
    print("nodes", nodes, "videos", summary.videos, "errors", summary.errors)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
@starts_ray
def test_a_two_node_cluster_on_this_machine_gives_the_single_process_embeddings(corpus, tmp_path):
    model, videos = corpus
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", TWO_NODES, str(model), str(tmp_path / "out"), *videos], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-6:] == ["nodes", "2", "videos", str(len(videos)), "errors", "0"]
    table = read_corpus(tmp_path / "out")
    got = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
    assert sorted(got) == sorted(videos)
    for path, row in zip(videos, load_model(str(model), device="cpu").embed(videos).embeddings):
        np.testing.assert_allclose(np.asarray(got[path], dtype=np.float32), row.numpy(), rtol=0, atol=1e-5)

@pytest.mark.slow
@pytest.mark.skipif(IN_PRIVATE_NETWORK, reason="the wrapper itself")
def test_ray_jobs_run_in_a_private_network_namespace():
    """Every test above that starts Ray, run in a network namespace of its own with only loopback
    (``unshare -rn``), so that Ray's servers, which listen on every interface, are reachable from
    loopback alone and no job traffic can go to any other address."""
    pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    from net_helpers import private_network

    command, why_not = private_network([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
                                        __file__])
    if why_not:
        pytest.skip(f"the Ray tests need a private network namespace ({why_not})")
    done = subprocess.run(command, env={**os.environ, "DIST_VIDEO_PRIVATE_NETWORK": "1"}, capture_output=True,
                          text=True, timeout=900, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    ray_tests = sum(1 for name, f in globals().items() if name.startswith("test_") and hasattr(f, "pytestmark")
                    and any(m.name == "skipif" and m.kwargs.get("reason", "").startswith("starts Ray")
                            for m in f.pytestmark))
    assert re.search(rf"\b{ray_tests} passed", done.stdout), done.stdout[-3000:]
