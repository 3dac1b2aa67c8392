"""pytest plugin for ``scripts/gpu_check.sh --tests device``: keep only the tests that exercise the
device (those taking the ``device`` fixture, which follows ``DIST_VIDEO_TEST_DEVICE``, and those
marked ``gpu``) and the quick GPU-readiness tests; the CPU-only rest of the suite, the slow
readiness tests (which re-run this check on the CPU) included, is CI's job.

Used as ``python -m pytest -p device_tests`` with this folder on ``PYTHONPATH``."""

from __future__ import annotations

READINESS = "test_gpu_readiness.py"


def keeps(item) -> bool:
    """Whether the device run keeps this collected test."""
    if "device" in getattr(item, "fixturenames", ()) or "gpu" in item.keywords:
        return True
    return item.path.name == READINESS and "slow" not in item.keywords


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if keeps(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
