"""Running a command in a private network namespace (``unshare -rn``, loopback up): only the
loopback interface exists there, so a server that listens on every interface (Ray's) is reachable
from loopback alone, and nothing can reach another address, this machine's own included."""

from __future__ import annotations

import shutil
import subprocess


def private_network(command: list[str]) -> tuple[list[str], str | None]:
    """``command`` wrapped to run in a new network namespace with only loopback, or ``command``
    as it is and the reason when this machine does not permit that."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return command, "unshare or ip is not installed"
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return command, f"unshare -rn is not permitted here: {probe.stderr.strip()}"
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command], None
