"""Running ``dist-video`` as a user does: ``python -m dist_video.cli`` in a child process."""

from __future__ import annotations

import os
import subprocess
import sys

#: The command line before the command's own arguments.
CLI = [sys.executable, "-m", "dist_video.cli"]

#: Seconds a command may run before the test fails.
TIMEOUT = 300


def cli_env(**extra: str) -> dict:
    """The child's environment: this one, unbuffered output, one intra-op thread, plus ``extra``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_cli(*args: str, env: dict | None = None, timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """``dist-video ARGS`` to completion, output captured as text (``env``: the whole environment,
    default :func:`cli_env`)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env() if env is None else env, **kw)


def start_cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """``dist-video ARGS`` started in the background, standard output and error as text pipes."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    return subprocess.Popen([*CLI, *args], env=cli_env() if env is None else env, **kw)
