"""Export to ONNX: the folder's contract, onnxruntime against PyTorch, and prediction from an
exported folder equal to prediction from the model folder. (An export traces the model with
torch.export, about half a minute even for the tiny model: those tests are marked slow.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cli_helpers import run_cli  # noqa: E402
from deploy_helpers import CLASS_NAMES, TINY_PREPROCESS, make_tiny_model_folder, write_test_videos  # noqa: E402

from dist_video.engine.predict import predict_files  # noqa: E402
from dist_video.export import ExportError, export_fused_onnx, export_onnx  # noqa: E402
from dist_video.loading import load_model  # noqa: E402
from dist_video import onnx_runner  # noqa: E402
from dist_video.onnx_runner import OnnxVideoClassifier, is_exported_folder  # noqa: E402
from dist_video.storage import file_record  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
OFFICIAL = ASSETS / "official-tiny" / "official_checkpoint.pyth"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("export")
    folder = make_tiny_model_folder(root / "model", tiny_clip)
    report = export_onnx(folder, root / "onnx")
    return folder, root / "onnx", report


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_test_videos(tmp_path_factory.mktemp("videos"))


@pytest.mark.slow
def test_export_writes_the_folder_contract(exported):
    folder, out, report = exported
    assert is_exported_folder(out)
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "model.onnx", "preprocess.json"]
    assert (out / "labels.txt").read_text().splitlines() == CLASS_NAMES
    record = json.loads((out / "preprocess.json").read_text())
    assert record["format"] == "dist-video-onnx" and record["model"]["name"] == "model"
    assert record["model"]["num_frames"] == 8 and record["model"]["alpha"] == 2
    assert record["preprocess"] == {**TINY_PREPROCESS, "num_frames": 8}
    assert record["input"]["shape"] == ["batch", 3, 8, 64, 64]
    assert record["outputs"] == {"logits": ["batch", 5], "embeddings": ["batch", 64]}
    assert record["dist_video_version"]
    assert record["verification"]["max_abs_diff_logits"] == report.max_abs_diff_logits <= 1e-4
    assert report.num_classes == 5 and report.embedding_dim == 64


@pytest.mark.slow
def test_onnxruntime_matches_pytorch_within_1e4_for_any_batch(exported):
    import onnx

    folder, out, _ = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["video"] and [o.name for o in graph.output] == ["logits", "embeddings"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    model = load_model(str(folder), device="cpu", clip_dtype="fp32").model
    fused = model.fuse(torch.float32)
    runner = OnnxVideoClassifier(out)
    for batch in (1, 3):
        video = torch.randn(batch, 3, 8, 64, 64, generator=torch.Generator().manual_seed(batch))
        logits, embeddings = runner.run(video)
        with torch.no_grad():
            assert np.abs(logits - fused(video).numpy()).max() <= 1e-4
            assert np.abs(embeddings - fused.encode_video(video).numpy()).max() <= 1e-4
        assert logits.shape == (batch, 5) and embeddings.shape == (batch, 64)


@pytest.mark.slow
def test_predict_on_the_exported_folder_equals_the_model_folder(exported, videos):
    folder, out, _ = exported
    loaded = load_model(str(folder), device="cpu", clip_dtype="fp32")
    model, preprocess = loaded.model, loaded.preprocess
    expected = predict_files(model, [str(v) for v in videos], preprocess, topk=5)
    runner = OnnxVideoClassifier(out)
    got = predict_files(runner, [str(v) for v in videos], runner.preprocess, topk=5)
    assert [r["video"] for r in got] == [r["video"] for r in expected]
    for g, e in zip(got, expected):
        assert g["views"] == e["views"] == 2
        assert [t["class"] for t in g["top"]] == [t["class"] for t in e["top"]]
        np.testing.assert_allclose([t["probability"] for t in g["top"]], [t["probability"] for t in e["top"]],
                                   atol=1e-6)


@pytest.mark.slow
def test_export_of_the_official_checkpoint_with_a_class_text_head(tmp_path, official_model):
    """The authors' ``.pyth`` (official-tiny), with a class-text head: its logits carry CLIP's
    logit scale (x100), and onnxruntime still matches PyTorch within 1e-4."""
    names = ["archery", "bowling", "cooking", "dancing", "fencing"]
    torch.manual_seed(0)
    model = official_model.set_class_embeddings(torch.randn(5, 64), names)
    fused = model.fuse(torch.float32)
    preprocess = {**TINY_PREPROCESS, "num_frames": 16}
    report = export_fused_onnx(fused, preprocess, tmp_path / "onnx", name="official_checkpoint",
                               source=str(OFFICIAL))
    record = json.loads((tmp_path / "onnx" / "preprocess.json").read_text())
    assert record["model"]["head"] == "text" and record["model"]["num_frames"] == 16
    assert (tmp_path / "onnx" / "labels.txt").read_text().split() == names
    video = torch.randn(2, 3, 16, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = fused(video).numpy()
    logits = OnnxVideoClassifier(tmp_path / "onnx").run(video)[0]
    assert np.abs(expected).max() > 1  # the logit scale is in the graph
    assert np.abs(logits - expected).max() <= report.tolerance == 1e-4


@pytest.mark.slow
def test_an_export_that_does_not_verify_fails_and_writes_nothing(tmp_path, tiny_clip, monkeypatch):
    import dist_video.export as export

    folder = make_tiny_model_folder(tmp_path / "model", tiny_clip)
    real = export.open_session

    class Drifting:  # a runtime whose logits are off by 1e-3
        def __init__(self, path):
            self.session = real(path)

        def run(self, names, feeds):
            logits, embeddings = self.session.run(names, feeds)
            return logits + 1e-3, embeddings

    monkeypatch.setattr(export, "open_session", Drifting)
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        export_onnx(folder, tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # no work folder left


def test_export_refuses_to_write_into_a_model_folder(tmp_path, tiny_clip):
    folder = make_tiny_model_folder(tmp_path / "model", tiny_clip)
    with pytest.raises(ExportError, match="holds a dist-video model folder"):
        export_onnx(folder, folder)


@pytest.mark.slow
def test_cli_export_and_predict_on_the_exported_folder(tmp_path, tiny_clip, videos):
    """The CLI: export prints its verification; ``predict --json`` on the exported folder prints
    what it prints for the model folder, and runs no PyTorch model code."""
    folder = make_tiny_model_folder(tmp_path / "model", tiny_clip)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    printed = cli("export", str(folder), str(tmp_path / "onnx"), "--opset", "18")
    assert "verified with onnxruntime" in printed and "logits max |diff|" in printed
    assert json.loads((tmp_path / "onnx" / "preprocess.json").read_text())["opset"] == 18
    paths = [str(v) for v in videos]
    from_folder = json.loads(cli("predict", str(folder), *paths, "--json", "--clip-dtype", "fp32"))
    from_onnx = json.loads(cli("predict", str(tmp_path / "onnx"), *paths, "--json"))
    assert [r["video"] for r in from_onnx] == paths
    for g, e in zip(from_onnx, from_folder):
        assert [t["class"] for t in g["top"]] == [t["class"] for t in e["top"]]
        np.testing.assert_allclose([t["probability"] for t in g["top"]], [t["probability"] for t in e["top"]],
                                   atol=1e-6)
    # no torch module runs on that path: calling one would fail
    code = ("import sys, torch\n"
            "def refuse(*args, **kwargs):\n    raise AssertionError('a torch module ran')\n"
            "torch.nn.Module.__call__ = refuse\n"
            "from dist_video.cli import main\nsys.exit(main(['predict', sys.argv[1], sys.argv[2], '--json']))")
    assert json.loads(cli_python(code, str(tmp_path / "onnx"), paths[0], env=env)) == from_onnx[:1]


def cli_python(code: str, *args: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ----------------------------------------------------------------------------- recorded hashes, odd files
def no_onnxruntime(path, threads=None):
    raise AssertionError(f"onnxruntime was asked to read {path}")


def copy_of_export(out: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    shutil.copytree(out, folder)
    return folder


def flip_middle_byte(path: Path) -> bytes:
    """Flip one bit in the middle of ``path``; returns the original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return original


def edit_record(folder: Path, change) -> None:
    record = json.loads((folder / "preprocess.json").read_text())
    change(record)
    (folder / "preprocess.json").write_text(json.dumps(record))


def assert_refused_as_changed(folder: Path, name: str, load=OnnxVideoClassifier) -> None:
    with pytest.raises(ValueError) as info:
        load(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / name}: not the file that was exported: its contents do not match "
                              f"the SHA-256 recorded in {folder / 'preprocess.json'}"), message
    assert "\n" not in message


def fake_export(folder: Path, record: dict | None = None) -> Path:
    """A folder with an export's files (a model.onnx onnxruntime is never given), its hashes recorded."""
    folder.mkdir()
    (folder / "model.onnx").write_bytes(bytes(range(256)) * 4)
    (folder / "labels.txt").write_text("a\nb\n")
    files = {name: file_record(folder / name) for name in ("model.onnx", "labels.txt")}
    (folder / "preprocess.json").write_text(json.dumps({"format": "dist-video-onnx", "files": files, **(record or {})}))
    return folder


def test_a_changed_model_onnx_is_refused_before_onnxruntime_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runner, "open_session", no_onnxruntime)
    folder = fake_export(tmp_path / "onnx")
    original = flip_middle_byte(folder / "model.onnx")
    assert_refused_as_changed(folder, "model.onnx")
    (folder / "model.onnx").write_bytes(original[:-1])  # truncated
    assert_refused_as_changed(folder, "model.onnx", load=lambda f: load_model(str(f)))
    (folder / "model.onnx").write_bytes(original)
    (folder / "model.onnx.data").write_bytes(b"weights nobody recorded")
    with pytest.raises(ValueError, match=r"preprocess.json: 'files' has no valid entry for model.onnx.data"):
        OnnxVideoClassifier(folder)
    (folder / "model.onnx.data").unlink()
    edit_record(folder, lambda r: r["files"].update({"model.onnx.data": {"bytes": 1, "sha256": "0" * 64}}))
    with pytest.raises(FileNotFoundError, match=r"model.onnx.data: missing \(the export folder is incomplete\)"):
        OnnxVideoClassifier(folder)


def test_a_fifo_in_an_export_is_refused_without_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runner, "open_session", no_onnxruntime)
    for name in ("model.onnx", "labels.txt"):
        for recorded in (True, False):
            folder = fake_export(tmp_path / f"{name}-{recorded}")
            if not recorded:  # an export written before hashes were recorded
                edit_record(folder, lambda r: r.pop("files"))
            (folder / name).unlink()
            os.mkfifo(folder / name)
            assert is_exported_folder(folder)
            with pytest.raises(ValueError, match=rf"{name}: the .* is a FIFO \(named pipe\), not a regular file"):
                load_model(str(folder))
    monkeypatch.undo()  # the real open_session refuses a FIFO too
    with pytest.raises(ValueError, match=r"model.onnx: the ONNX model is a FIFO"):
        onnx_runner.open_session(tmp_path / "model.onnx-True" / "model.onnx")


@pytest.mark.slow
def test_an_export_records_its_files_and_refuses_changed_ones(exported, tmp_path, monkeypatch):
    _, out, _ = exported
    record = json.loads((out / "preprocess.json").read_text())
    assert record["files"] == {name: {"bytes": (out / name).stat().st_size,
                                      "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}
                               for name in ("labels.txt", "model.onnx")}
    folder = copy_of_export(out, tmp_path)
    flip_middle_byte(folder / "model.onnx")
    monkeypatch.setattr(onnx_runner, "open_session", no_onnxruntime)
    assert_refused_as_changed(folder, "model.onnx")
    shutil.copy(out / "model.onnx", folder / "model.onnx")
    (folder / "labels.txt").write_text((out / "labels.txt").read_text().replace("knitting", "kn1tting"))
    assert_refused_as_changed(folder, "labels.txt", load=lambda f: load_model(str(f)))


@pytest.mark.slow
def test_an_export_without_records_still_loads(exported, tmp_path):
    _, out, _ = exported
    folder = copy_of_export(out, tmp_path)
    edit_record(folder, lambda r: r.pop("files"))
    video = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(3))
    loaded = load_model(str(folder))
    assert loaded.kind == "exported" and loaded.model.class_names == CLASS_NAMES
    np.testing.assert_array_equal(loaded.model.run(video)[0], OnnxVideoClassifier(out).run(video)[0])


@pytest.mark.slow
def test_cli_predict_on_a_changed_export_prints_one_line(exported, tmp_path, videos):
    _, out, _ = exported
    folder = copy_of_export(out, tmp_path)
    flip_middle_byte(folder / "model.onnx")
    proc = run_cli("predict", str(folder), str(videos[0]))
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"dist-video predict: error: {folder / 'model.onnx'}: not the file that was exported"), proc.stderr
