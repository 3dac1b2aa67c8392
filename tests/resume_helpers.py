"""Kill-and-resume scaffolding: SIGKILL a running command once it has done some of its work."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, what: str,
               poll: float = 0.05) -> None:
    """Return once ``ready()`` is true (polled every ``poll`` seconds) while ``proc`` runs.

    Fails, naming ``what`` (e.g. "step 3"), when the process ends first or ``ready`` stays false
    for ``timeout`` seconds (the process is then killed)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"the command ended before {what}: {str(err)[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout)
            raise AssertionError(f"the command hung before {what}")
        time.sleep(poll)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, what: str,
              poll: float = 0.05) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (:func:`wait_until`) and wait for it to
    end; fails when it did not end by the signal."""
    wait_until(proc, ready, timeout=timeout, what=what, poll=poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def reached_step(metrics: Path, step: int) -> Callable[[], bool]:
    """``ready`` for :func:`kill_when`: the training log ``metrics`` (metrics.jsonl) has a record
    at ``step`` or later."""

    def ready() -> bool:
        if not metrics.exists():
            return False
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
        return bool(steps) and max(steps) >= step

    return ready
