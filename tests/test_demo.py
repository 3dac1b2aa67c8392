"""`dist-video demo` with a tiny budget: the report's files and numbers exist and agree."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import run_cli


@pytest.mark.slow
def test_demo_with_a_tiny_budget(tmp_path):
    out = tmp_path / "report"
    proc = run_cli("demo", "--out", str(out), "--train-videos", "64", "--val-videos", "12", "--epochs", "1", "--quiet",
                   timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "metrics.json", "training_curves.png", "confusion_matrix.png", "film_strip.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("dist", "frozen-mean"):
        m = metrics[method]
        assert 0.0 <= m["top1"] <= 1.0 and m["num_videos"] == 12
        assert m["trainable_params"] > 0 and m["train_seconds"] > 0
        run = json.loads((out / "runs" / method / "summary.json").read_text())
        assert run["top1"] == m["top1"] and run["trainable_params"] == m["trainable_params"]
    assert metrics["dist"]["trainable_params"] > 100 * metrics["frozen-mean"]["trainable_params"]
    assert metrics["frozen-mean"]["appearance_ceiling"] == 0.5  # 12 balanced classes in time-reversed pairs
    # the report and the terminal table quote the same numbers
    report = (out / "report.md").read_text()
    assert f"{100 * metrics['dist']['top1']:.1f}%" in report
    table = proc.stdout.strip().splitlines()
    assert any(line.startswith("dist ") and f"{100 * metrics['dist']['top1']:.1f}%" in line for line in table)
    assert table[-1] == f"report: {out / 'report.md'}"
    assert metrics["prediction"]["top"][0]["class"] in (out / "data" / "classes.txt").read_text()
