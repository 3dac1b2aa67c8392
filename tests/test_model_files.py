"""Model files as an attacker or a crash leaves them: pickles with code never run, a kill while
saving leaves the old model or the new one, damaged or odd files are refused with a message
that names them (and never quotes them)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from dist_video import load_clip, load_official_checkpoint
from dist_video.checkpoints import read_official_state_dict
from dist_video.classifier import VideoClassifier
from dist_video.storage import UntrustedCheckpointError, new_folder_beside, read_torchscript_tensors

ASSETS = Path(__file__).parent / "assets"
TINY = ASSETS / "official-tiny"
JIT = ASSETS / "clip_formats" / "openai_jit" / "ViT-T-16.pt"
SRC = Path(__file__).parent.parent / "src"


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def clip_state_dict() -> dict:
    return torch.load(TINY / "clip_openai_state_dict.pt", weights_only=True)


def payload_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Every kind of file a loader reads, each carrying the payload."""
    files = {"pyth": tmp_path / "evil.pyth", "zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil-legacy.pt",
             "torchscript": tmp_path / "evil-jit.pt"}
    official = torch.load(TINY / "official_checkpoint.pyth", weights_only=True)
    torch.save({**official, "cfg": Payload(marker)}, files["pyth"])
    torch.save({"state_dict": clip_state_dict(), "args": Payload(marker)}, files["zip"])
    torch.save({"state_dict": clip_state_dict(), "args": Payload(marker)}, files["legacy"],
               _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(JIT) as src, zipfile.ZipFile(files["torchscript"], "w") as dst:
        for item in src.infolist():  # the real archive with its pickle replaced by the payload
            data = pickle.dumps(Payload(marker), protocol=2) if item.filename.endswith("/data.pkl") else src.read(item)
            dst.writestr(item, data)
    return files


def assert_refused(call, path: Path, marker: Path) -> None:
    with pytest.raises(UntrustedCheckpointError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "--trust-checkpoint" in message and "\n" not in message
    assert not marker.exists()


def test_payloads_never_run_through_any_loader(tmp_path, official_model):
    marker = tmp_path / "PWNED"
    files = payload_files(tmp_path, marker)
    assert_refused(lambda: read_official_state_dict(files["pyth"]), files["pyth"], marker)
    assert_refused(lambda: load_official_checkpoint(files["pyth"]), files["pyth"], marker)
    assert_refused(lambda: load_official_checkpoint(TINY / "official_checkpoint.pyth", clip=files["zip"]),
                   files["zip"], marker)
    for kind in ("zip", "legacy", "torchscript"):
        assert_refused(lambda: load_clip(files[kind]), files[kind], marker)
    # a model folder whose CLIP weights are referenced by path
    folder = official_model.set_class_embeddings(torch.randn(3, 64), ["a", "b", "c"]).save_pretrained(
        tmp_path / "model", clip_path=files["zip"])
    assert json.loads((folder / "config.json").read_text())["clip_weights"] == {"path": str(files["zip"])}
    assert_refused(lambda: VideoClassifier.from_pretrained(folder), files["zip"], marker)
    # trusting a payload is the user's explicit choice: then, and only then, it runs
    with pytest.warns(UserWarning, match="evil.pt: loaded with weights_only=False"):
        clip = load_clip(files["zip"], trust_checkpoint=True)
    assert clip.config.vision_width == 128 and marker.exists()


def test_old_style_files_load_when_trusted(tmp_path):
    official = torch.load(TINY / "official_checkpoint.pyth", weights_only=True)
    path = tmp_path / "with-config.pyth"
    torch.save({**official, "cfg": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"with-config.pyth: .*argparse.Namespace"):
        load_official_checkpoint(path)
    with pytest.warns(UserWarning, match="with-config.pyth: loaded with weights_only=False"):
        model = load_official_checkpoint(path, trust_checkpoint=True, clip_dtype="fp32")
    plain = load_official_checkpoint(TINY / "official_checkpoint.pyth", clip_dtype="fp32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_torchscript_tensors_without_running_the_archive():
    import warnings
    tensors = read_torchscript_tensors(JIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.jit.load(str(JIT), map_location="cpu").state_dict()
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in reference.items())


# ----------------------------------------------------------------------------- odd files, bad configs
def test_fifo_as_clip_weights_is_refused_without_hanging(tmp_path, official_model):
    fifo = tmp_path / "clip.pt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"clip.pt: the CLIP weights file is a FIFO"):
        load_clip(fifo)
    folder = official_model.set_class_embeddings(torch.randn(3, 64), ["a", "b", "c"]).save_pretrained(
        tmp_path / "model", clip_path=fifo)
    with pytest.raises(ValueError, match="FIFO"):
        VideoClassifier.from_pretrained(folder)


def test_messages_never_quote_the_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:*:2 secret-token-value\n")
    with pytest.raises(ValueError) as info:
        load_clip(secret)
    assert str(secret) in str(info.value) and "root" not in str(info.value).replace(str(secret), "")


def saved(tmp_path, official_model, name="model") -> Path:
    return official_model.set_class_embeddings(torch.randn(3, 64), ["a", "b", "c"]).save_pretrained(tmp_path / name)


def edit_config(folder: Path, change) -> None:
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(class_names=["a", "b", "a"]), r"'class_names' holds 'a' more than once"),
    (lambda m: m["clip"].update(vision_width="128"), r"'clip.vision_width' must be a int"),
    (lambda m: m["config"].update(num_frames="16"), r"'config.num_frames' must be a number, not the string '16'"),
    (lambda m: m.update(clip_weights="../../etc/passwd"), r"'clip_weights' must name a file inside the folder"),
    (lambda m: m.update(head=3), r"'head' must be"),
])
def test_config_json_types_and_duplicates(tmp_path, official_model, change, message):
    folder = saved(tmp_path, official_model)
    edit_config(folder, change)
    with pytest.raises(ValueError, match=message) as info:
        VideoClassifier.from_pretrained(folder)
    assert str(folder / "config.json") in str(info.value)


def test_duplicate_json_keys_are_refused(tmp_path, official_model):
    folder = saved(tmp_path, official_model)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"head":', '"head": "linear", "head":', 1))
    with pytest.raises(ValueError, match="config.json: the key 'head' appears twice"):
        VideoClassifier.from_pretrained(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "clip.safetensors"])
def test_flipped_payload_bytes_are_refused(tmp_path, official_model, name):
    folder = saved(tmp_path, official_model)
    VideoClassifier.from_pretrained(folder)  # intact: loads
    data = bytearray((folder / name).read_bytes())
    data[-5] ^= 0x40  # a tensor byte, not the header: safetensors itself would not notice
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name}: damaged or not a safetensors file: its contents do not match"):
        VideoClassifier.from_pretrained(folder)


def test_saving_keeps_other_files_and_follows_the_umask(tmp_path, official_model):
    folder = saved(tmp_path, official_model)
    (folder / "README.md").write_text("notes\n")
    saved(tmp_path, official_model)
    assert (folder / "README.md").read_text() == "notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    mask = os.umask(0)
    os.umask(mask)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((folder / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="other: a folder that is not a dist-video model folder"):
        official_model.save_pretrained(tmp_path / "other")


# ----------------------------------------------------------------------------- SIGKILL while saving
KILLER = """
import os, shutil, signal, sys
from dist_video import storage
count, step = [0], int(sys.argv[1])
def counted(fn):
    def call(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return call
def arm():
    for name in ("fsync", "rename", "replace", "link", "chmod", "unlink", "rmdir", "mkdir"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.rmtree = counted(shutil.rmtree)
    storage._exchange = counted(storage._exchange)
"""

SAVE = KILLER + """
import torch
from dist_video.classifier import VideoClassifier
model = VideoClassifier.from_pretrained(sys.argv[2], clip_dtype="fp32")
arm()
model.save_pretrained(sys.argv[3])
print("steps", count[0])
"""


def run_killed(script: str, step: int, *args) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(step), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)
    if proc.returncode == 0:
        return False, proc.stdout
    assert proc.returncode == -9, proc.stderr
    return True, ""


def model_state(model: VideoClassifier) -> tuple:
    return model.class_names, {k: v.clone() for k, v in model.state_dict().items()}


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.slow
def test_sigkill_at_each_step_of_save_pretrained_leaves_old_or_new(tmp_path, official_model):
    old_model = official_model.set_class_embeddings(torch.randn(3, 64), ["a", "b", "c"])
    pristine = old_model.save_pretrained(tmp_path / "old")
    old = model_state(VideoClassifier.from_pretrained(pristine, clip_dtype="fp32"))
    new_model = VideoClassifier.from_pretrained(pristine, clip_dtype="fp32")
    with torch.no_grad():  # other weights everywhere (the CLIP too) and other classes
        for p in new_model.state_dict().values():
            p.add_(0.5) if p.is_floating_point() else None
    new_model.set_class_embeddings(torch.randn(4, 64), ["w", "x", "y", "z"])
    source = new_model.save_pretrained(tmp_path / "new")
    new = model_state(VideoClassifier.from_pretrained(source, clip_dtype="fp32"))
    assert not same(old, new)
    seen, step = [], 1
    while True:
        target = tmp_path / f"step{step}" / "model"
        shutil.copytree(pristine, target)
        killed, out = run_killed(SAVE, step, source, target)
        loaded = model_state(VideoClassifier.from_pretrained(target, clip_dtype="fp32"))
        assert same(loaded, old) or same(loaded, new), f"killed at step {step}: a mix of the two models"
        seen.append("old" if same(loaded, old) else "new")
        if not killed:
            break
        step += 1
    assert step > 8 and seen[0] == "old" and seen[-1] == "new", seen


EXPORT = KILLER + """
import torch
from dist_video import export as ex, load_official_checkpoint
names = sys.argv[3].split(",")
torch.manual_seed(len(names))
model = load_official_checkpoint(sys.argv[2], clip_dtype="fp32")
model.set_class_embeddings(torch.randn(len(names), 64), names)
def fake_onnx(wrapper, example, path, opset, external):  # the exporter is slow and not what is tested here
    path.write_bytes(("onnx for " + sys.argv[3]).encode())
    return 18
ex._torch_onnx_export, ex._verify = fake_onnx, lambda *args: (0.0, 0.0)
preprocess = {"sampling": "segment", "interval": 4, "crop_size": 64, "test_scale": 64, "num_views": 1,
              "num_crops": 1, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
fused = model.fuse(torch.float32)
arm()
ex.export_fused_onnx(fused, preprocess, sys.argv[4], name=sys.argv[3])
print("steps", count[0])
"""


def export_contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_sigkill_at_each_step_of_export_leaves_old_or_new(tmp_path):
    checkpoint = TINY / "official_checkpoint.pyth"
    assert not run_killed(EXPORT, 0, checkpoint, "a,b,c", tmp_path / "old")[0]
    assert not run_killed(EXPORT, 0, checkpoint, "w,x,y,z", tmp_path / "new")[0]
    old, new = export_contents(tmp_path / "old"), export_contents(tmp_path / "new")
    assert old["labels.txt"] == b"a\nb\nc\n" and new["labels.txt"] == b"w\nx\ny\nz\n"
    seen, step = [], 1
    while True:
        target = tmp_path / f"step{step}" / "onnx"
        shutil.copytree(tmp_path / "old", target)
        killed, _ = run_killed(EXPORT, step, checkpoint, "w,x,y,z", target)
        found = export_contents(target)
        assert found in (old, new), f"killed at step {step}: a mix of the two exports"
        seen.append("old" if found == old else "new")
        if not killed:
            break
        step += 1
    assert step > 4 and seen[0] == "old" and seen[-1] == "new", seen


# ----------------------------------------------------------------------------- leftovers of killed writers
def unused_pid() -> int:
    """A pid no process can have: Linux gives pids below ``pid_max``."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def work_folder_host(target: Path) -> str:
    """This host's label as :func:`new_folder_beside` writes it (``.NAME.HOST.PID.RANDOM.tmp``)."""
    work = new_folder_beside(target)
    try:
        host, pid, random, suffix = work.name[len(f".{target.name}."):].split(".")
    finally:
        work.rmdir()
    assert pid == str(os.getpid()) and random and suffix == "tmp", work.name
    return host


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_dead_writers_leftovers_are_removed_by_the_next_save(tmp_path, official_model, caplog):
    folder = saved(tmp_path, official_model)
    host, dead = work_folder_host(folder), unused_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        gone = [f".model.{host}.{dead}.abcd_123.tmp", f".model.{host}.{dead}.old"]
        kept = [f".model.{host}.{os.getpid()}.live0001.tmp",  # this process: alive
                f".model.{host}.{sleeper.pid}.live0002.tmp",  # a sleeping child: alive
                f".model.other-{host}.{dead}.abcd1234.tmp",  # another host's (a shared file system)
                ".model.backup", f".model.{host}.{dead}.tmp", f".model.{host}.x{dead}.abcd1234.tmp",  # not the pattern
                f".model.v2.{host}.{dead}.abcd1234.tmp", f".model2.{host}.{dead}.abcd1234.tmp"]  # other targets'
        for name in gone + kept:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        plain_file = f".model.{host}.{dead}.file0001.tmp"  # only folders are a writer's leftovers
        (tmp_path / plain_file).write_bytes(b"x")
        with caplog.at_level(logging.INFO, logger="dist_video.storage"):
            saved(tmp_path, official_model)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert hidden(tmp_path) == sorted(kept + [plain_file])
    removals = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "removed" in r.getMessage()]
    assert len(removals) == 2 and all(f"process {dead} that was killed" in m for m in removals)
    assert {m.split(": removed ")[1].split(",")[0] for m in removals} == set(gone)
    VideoClassifier.from_pretrained(folder)  # the new save is in place


def test_a_folder_renamed_aside_by_a_killed_writer_is_put_back_first(tmp_path, official_model, caplog):
    """Where the kernel cannot exchange two folders, the old model is renamed aside before the
    new one moves in; a writer killed between the two renames leaves no model at the target.
    The next save puts the old folder back first, so the files it kept (a README) survive."""
    folder = saved(tmp_path, official_model)
    (folder / "README.md").write_text("notes\n")
    host, dead = work_folder_host(folder), unused_pid()
    folder.rename(tmp_path / f".model.{host}.{dead}.old")
    with caplog.at_level(logging.INFO, logger="dist_video.storage"):
        saved(tmp_path, official_model)
    assert (folder / "README.md").read_text() == "notes\n" and hidden(tmp_path) == []
    assert any("put back the previous folder" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_save_killed_after_making_its_work_folder_is_cleaned_up_by_the_next(tmp_path, official_model):
    source = saved(tmp_path, official_model, "source")
    target = tmp_path / "out" / "model"
    target.parent.mkdir()
    for step in range(1, 12):  # kill earlier steps until one leaves the temporary folder behind
        killed, _ = run_killed(SAVE, step, source, target)
        assert killed
        left = hidden(target.parent)
        if left:
            break
    assert len(left) == 1 and left[0].startswith(".model.") and left[0].endswith(".tmp"), left
    VideoClassifier.from_pretrained(source, clip_dtype="fp32").save_pretrained(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_a_file_of_random_bytes_is_not_taken_for_a_file_that_only_needs_trust(tmp_path):
    """The weights-only unpickler stops at an instruction it does not run without naming a global
    when the file is damaged: the message says it may be damaged, not only that it needs trust."""
    from dist_video.storage import torch_load

    path = tmp_path / "garbage.pyth"
    path.write_bytes(bytes([0x80, 0x02, 0xE7]) + bytes(range(97)))  # a pickle header, then opcode 231
    with pytest.raises((UntrustedCheckpointError, ValueError), match=r"garbage.pyth: .*damaged") as info:
        torch_load(path)
    assert "\\x" not in str(info.value)  # nothing of the file's bytes in the message
