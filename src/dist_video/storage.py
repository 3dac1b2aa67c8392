"""Files on disk: atomic writes, whole folders replaced in one step, weights read without running code.

Writing. :func:`atomic_write` / :func:`atomic_path` write a file under a temporary name in its
folder, fsync it, rename it over the target and fsync the folder: a reader (or a machine that
lost power) sees the old file or the new one, never part of one. :func:`replace_folder` does the
same for a whole folder (a model): it is written complete beside the target and exchanged with it
in one rename. New files and folders get the modes the user's umask gives (:func:`new_file_mode`).
A temporary folder's name carries the host and the process that made it; the next writer of the
same target removes those whose process is gone (:func:`remove_dead_leftovers`).

Reading. :func:`torch_load` is ``torch.load(weights_only=True)``: tensors, containers and plain
values only. A file that needs more (pickled Python objects, which can run code while they are
read) is refused with :class:`UntrustedCheckpointError` unless the caller passes ``trust=True``
(the ``--trust-checkpoint`` option). :func:`read_torchscript_tensors` takes the tensors out of a
TorchScript archive without running its code. Every reader first checks that the path is a
regular file (:func:`check_regular_file`: a FIFO or device would block or never end) and no
message quotes a file's contents.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import pickle
import re
import shutil
import socket
import stat
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Iterator

import torch

__all__ = ["atomic_write", "atomic_path", "write_text_atomic", "replace_file", "replace_folder", "fsync_dir",
           "new_file_mode", "new_dir_mode", "new_folder_beside", "remove_dead_leftovers", "check_regular_file",
           "file_sha256", "read_safetensors", "torch_load", "read_torchscript_tensors", "file_record",
           "check_file_record", "UntrustedCheckpointError", "TRUST_OPTION"]

logger = logging.getLogger(__name__)

#: How a user loads a file that needs more than tensors (named in every refusal).
TRUST_OPTION = "--trust-checkpoint (trust_checkpoint=True in Python)"


class UntrustedCheckpointError(ValueError):
    """A checkpoint that cannot be read as plain tensors and was not trusted explicitly."""


# ============================================================================ modes
def new_file_mode() -> int:
    """The mode ``open()`` gives a new file here: 0o666 less the process's umask (read from
    /proc where it can be, so the umask is never changed, not even for an instant)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder here: 0o777 less the process's umask."""
    return 0o777 & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ============================================================================ atomic files
def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or creation inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems do not fsync folders
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the complete file ``tmp`` (in the same folder) at ``path``: fsync it, rename it, fsync the folder."""
    _fsync_file(Path(tmp))
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``safetensors``,
    ``torch.save``); when the block ends without an error the file gets the umask's mode and is
    moved to ``path`` with :func:`replace_file`. On an error it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        replace_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` for writing, made atomic with :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


# ============================================================================ atomic folders
def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_dir(root)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _carry_over(old: Path, new: Path, owned: set[str]) -> None:
    """Hard-link (or copy) into ``new`` what ``old`` holds that the writer does not own."""
    for entry in old.iterdir():
        if entry.name in owned or (new / entry.name).exists() or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        elif entry.is_file():
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _host_label() -> str:
    """This machine's name without dots (``%`` and ``.`` escaped, so the label is unambiguous
    between the dots of a temporary folder's name)."""
    host = socket.gethostname() or "unknown-host"
    return host.replace("%", "%25").replace(".", "%2E")


def _leftover_pattern(target: Path) -> re.Pattern:
    """The names of the temporary folders of writers of ``target``: ``.NAME.HOST.PID.RANDOM.tmp``
    (:func:`new_folder_beside`) and ``.NAME.HOST.PID.old`` (:func:`replace_folder`'s fallback)."""
    return re.compile(re.escape(f".{target.name}.") + r"(?P<host>[^./]+)\.(?P<pid>[0-9]+)\."
                      r"(?:[A-Za-z0-9_]+\.tmp|(?P<old>old))")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def remove_dead_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that writers of ``target`` on this host left when they were
    killed (their process no longer exists); returns them. Folders of other hosts (a shared file
    system), of live processes and every name outside the exact pattern are never touched. An
    ``.old`` folder (the previous ``target``, renamed aside) is put back when ``target`` is missing."""
    target = Path(target)
    pattern, host = _leftover_pattern(target), _host_label()
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if (found is None or found["host"] != host or not entry.is_dir(follow_symlinks=False)
                or _process_exists(int(found["pid"]))):
            continue
        path = Path(entry.path)
        if found["old"] and not os.path.lexists(target):
            try:
                os.rename(path, target)
            except OSError:  # another writer put it back, or wrote the target, first
                continue
            logger.info("%s: put back the previous folder %s, left by process %s that was killed while "
                        "replacing it", target, path.name, found["pid"])
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            logger.info("%s: removed %s, left by process %s that was killed while writing it",
                        target, path.name, found["pid"])
            removed.append(path)
    return removed


def new_folder_beside(target: str | os.PathLike) -> Path:
    """An empty temporary folder ``.NAME.HOST.PID.RANDOM.tmp`` beside ``target`` (same file
    system) with the umask's mode, made after removing dead writers' leftovers of the same target
    (:func:`remove_dead_leftovers`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(target)
    prefix = f".{target.name}.{_host_label()}.{os.getpid()}."
    work = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    os.chmod(work, new_dir_mode())
    return work


def replace_folder(new: str | os.PathLike, target: str | os.PathLike, owned: set[str] = frozenset()) -> None:
    """Put the complete folder ``new`` (from :func:`new_folder_beside`) at ``target`` in one step.

    Everything in ``new`` is fsynced first. An existing ``target`` keeps the entries that the
    writer does not own (``owned``: the names it writes; the others are linked into ``new``) and
    is exchanged with ``new`` in one rename, then deleted: whenever the process dies, ``target``
    is the old folder or the new one. Where the kernel cannot exchange, the old folder is renamed
    aside first (a moment in which ``target`` does not exist)."""
    new, target = Path(new), Path(target)
    if target.is_dir():
        _carry_over(target, new, set(owned))
    _fsync_tree(new)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        fsync_dir(target.parent)
        shutil.rmtree(new)
    else:
        old = target.with_name(f".{target.name}.{_host_label()}.{os.getpid()}.old")
        os.rename(target, old)
        os.rename(new, target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
    fsync_dir(target.parent)


# ============================================================================ reading
def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` (symbolic links followed) if it is a regular file; else a one-line error naming
    it: ``FileNotFoundError`` when missing, ``ValueError`` for a FIFO, device, socket or folder."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise ValueError(f"{path}: the {what} is {kind}, not a regular file: refusing to read it")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(check_regular_file(path), "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a missing file raises ``FileNotFoundError`` and a
    damaged or truncated one ``ValueError``, each with a one-line message naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (the model folder is incomplete)")
    check_regular_file(path, "weights file")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: damaged or not a safetensors file ({cause})") from None


def _refusal(path, needs: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path}: needs more than tensors to load ({needs}), and reading that can run code from the file: "
        f"refused. Convert it to safetensors, or load a file you made or trust with {TRUST_OPTION}")


def _needed_global(error: Exception) -> str:
    """The global a weights-only unpickler refused, as torch names it (not file contents)."""
    found = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", str(error))
    # without a named global, the unpickler met an instruction it does not run: a damaged file
    # (random bytes) reads the same as one built from other Python objects
    return f"it holds {found.group(1)[:120]}" if found else "it is damaged, or holds Python objects besides tensors"


def torch_load(path: str | os.PathLike, *, trust: bool = False, mmap: bool = False,
               allowed: tuple = ()) -> object:
    """``torch.load`` on the CPU with ``weights_only=True`` (``allowed``: the exact non-tensor
    classes a caller's own files hold). A file that needs more raises
    :class:`UntrustedCheckpointError` naming it and :data:`TRUST_OPTION`; with ``trust=True`` it
    is loaded with ``weights_only=False`` and a warning. A damaged file raises ``ValueError``."""
    path = check_regular_file(path, "checkpoint")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e):
            raise ValueError(f"{path}: damaged or not a PyTorch checkpoint (cannot unpickle it)") from None
        needs = _needed_global(e)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        cause = (str(e).strip().splitlines() or ["?"])[0][:200]
        raise ValueError(f"{path}: damaged or not a PyTorch checkpoint ({type(e).__name__}: {cause})") from None
    if not trust:
        raise _refusal(path, needs)
    warnings.warn(f"{path}: loaded with weights_only=False ({needs}) because it is trusted "
                  f"({TRUST_OPTION})", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__})") from None


# ============================================================================ TorchScript archives
_STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands for any TorchScript class in the archive's pickle: it only keeps its state."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(size, stride, offset).clone()


class _TensorsOnly(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive: tensors and attribute dicts, nothing callable
    besides rebuilding a tensor and making a dict or list."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list
        raise pickle.UnpicklingError(f"{module}.{name}"[:120])

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError("an unknown persistent record")
        dtype, numel = pid[1], int(pid[4])
        data = self.archive.read(f"{self.prefix}/data/{pid[2]}")
        if len(data) != numel * torch.empty((), dtype=dtype).element_size():
            raise pickle.UnpicklingError(f"storage {pid[2]!r} has the wrong size")
        return torch.frombuffer(bytearray(data), dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def _collect(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, _ScriptObject) and isinstance(getattr(obj, "state", None), dict):
        for key, value in obj.state.items():
            if isinstance(key, str):
                _collect(value, f"{prefix}{key}.", out)


def read_torchscript_tensors(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (``torch.jit.save``, OpenAI's CLIP ``.pt`` files) by
    attribute path (``visual.conv1.weight``...), read from its pickle without running its code.

    ``torch.jit.load`` runs code from the archive (its classes' ``__setstate__``), so an archive
    that the reader cannot take apart raises :class:`UntrustedCheckpointError` unless
    ``trust=True``, which loads it with ``torch.jit.load`` instead."""
    path = check_regular_file(path, "checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
            prefix = pkl.rsplit("/", 1)[0]
            with archive.open(pkl) as f:
                root = _TensorsOnly(f, archive, prefix).load()
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: damaged or truncated TorchScript archive ({type(e).__name__})") from None
    except (StopIteration, pickle.UnpicklingError, TypeError, ValueError, AttributeError, IndexError) as e:
        needs = f"its pickle needs {e}" if isinstance(e, pickle.UnpicklingError) else "an unusual layout"
        if not trust:
            raise _refusal(path, f"a TorchScript archive, {needs}; torch.jit.load runs its code") from None
        return _jit_load(path)
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out)
    return out


def _jit_load(path: Path) -> dict[str, torch.Tensor]:
    warnings.warn(f"{path}: loaded with torch.jit.load, which runs code from the archive, because it is "
                  f"trusted ({TRUST_OPTION})", stacklevel=3)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # RuntimeError and friends from the C++ reader
        raise ValueError(f"{path}: cannot read the TorchScript archive (truncated or damaged?): "
                         f"{type(e).__name__}") from None
    return {k: v.detach() for k, v in module.state_dict().items()}


# ============================================================================ recorded hashes
def file_record(path: str | os.PathLike) -> dict:
    """What a folder's manifest records of one file: ``{"bytes": size, "sha256": hex digest}``."""
    return {"bytes": os.stat(path).st_size, "sha256": file_sha256(path)}


def check_file_record(folder: str | os.PathLike, records: object, name: str, manifest: str = "config.json",
                      *, kind: str = "model") -> None:
    """Refuse ``folder/name`` when the manifest's ``records`` (``{name: file_record(...)}``, or
    None for folders written before hashes were recorded) list it with another size or SHA-256.
    ``kind``: ``"model"`` (a model folder's weight file) or ``"export"`` (a file of an ONNX export)."""
    if records is None:
        return
    path = Path(folder) / name
    where = Path(folder) / manifest
    what, damaged, written = _RECORD_WORDS[kind]
    record = records.get(name) if isinstance(records, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ValueError(f"{where}: 'files' has no valid entry for {name}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (the {kind} folder is incomplete)")
    if os.stat(check_regular_file(path, what)).st_size != record.get("bytes") \
            or file_sha256(path) != record["sha256"]:
        raise ValueError(f"{path}: {damaged}: its contents do not match the SHA-256 recorded in {where} "
                         f"(changed or damaged after {written}); refusing to load it")


#: For :func:`check_file_record`: what the file is, what a mismatch means, when it was recorded.
_RECORD_WORDS = {"model": ("weights file", "damaged or not a safetensors file", "the model was saved"),
                 "export": ("exported file", "not the file that was exported", "the model was exported")}
