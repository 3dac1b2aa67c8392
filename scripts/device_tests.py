"""pytest plugin for ``scripts/gpu_check.sh --tests device``: keep only the tests that exercise the
device (those taking the ``device`` fixture, which follows ``DIST_VIDEO_TEST_DEVICE``) and the
GPU-readiness tests; the CPU-only rest of the suite is CI's job.

Used as ``python -m pytest -p device_tests`` with this folder on ``PYTHONPATH``."""

from __future__ import annotations

READINESS = "test_gpu_readiness.py"


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        uses_device = "device" in getattr(item, "fixturenames", ())
        (keep if uses_device or item.path.name == READINESS else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
