"""Make a virtual environment whose Python has this interpreter's packages except some: how a
compute node's preinstalled Python without PyAV or ftfy looks, for checking
``scripts/gpu_check.sh --python ... --wheelhouse ...`` (see scripts/offline_wheelhouse_check.sh).

    python scripts/python_without.py DEST [--pip] MODULE...

DEST gets a venv (from this interpreter's base Python) whose site-packages links every entry of
this interpreter's site-packages but the named modules' (their package, ``.libs`` and
``.dist-info`` folders) and dist-video's own install. ``--pip``: with pip (ensurepip, offline)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dest", type=Path)
    ap.add_argument("modules", nargs="+")
    ap.add_argument("--pip", action="store_true")
    args = ap.parse_args()
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", *([] if args.pip else ["--without-pip"]), str(args.dest)], check=True)
    own = Path(sysconfig.get_paths()["purelib"])
    site = Path(subprocess.run([str(args.dest / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    names = "|".join(re.escape(m) for m in args.modules + ["dist_video", "__editable__.dist_video", "pip",
                                                           "setuptools", "_distutils_hack", "distutils-precedence"])
    hidden = re.compile(rf"^({names})([-_.].*)?$", re.IGNORECASE)
    for entry in own.iterdir():
        if not hidden.match(entry.name) and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    print(args.dest / "bin" / "python")


if __name__ == "__main__":
    main()
