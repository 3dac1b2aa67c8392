"""The README's runnable Python example runs as written, and its claims hold."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    runnable = [b for b in blocks if "builtin:digits" in b]
    assert len(runnable) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(runnable[0], "README.md", "exec"), {})
    lines = out.getvalue().strip().splitlines()
    assert lines[0] == "torch.Size([2, 128])"
    assert lines[-1] == "True"


def test_readme_opens_with_the_demo_and_test_commands():
    head = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert head[0].startswith("make demo") and head[1].startswith("make test")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci  # CI runs the README's test command


def test_readme_is_a_front_door_and_the_docs_carry_no_dates():
    """The README stays short; dated measurements live in benchmarks/README.md only."""
    assert len(README.read_text().splitlines()) <= 150
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        dated = re.findall(r"20\d\d-\d\d-\d\d|\d\d:\d\d UTC", page.read_text())
        assert not dated, f"{page.name}: {dated} (measurements and their dates go to benchmarks/README.md)"
