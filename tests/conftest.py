"""Shared fixtures: the synthetic task (procedural, offline), a tiny transformer host, and the
project's shared data folder; and, under CI, no test passes by skipping."""

import os
from pathlib import Path

import pytest
import torch

from esper.kasmina import HOSTS
from esper.tolaria.data import make_synthetic
from support import CIFAR_DIR, TINY_LM

@pytest.fixture
def tiny_lm_registered(monkeypatch):
    """TINY_LM in the host table for this test: export and the environment build hosts by name."""
    monkeypatch.setitem(HOSTS, TINY_LM.name, TINY_LM)
    return TINY_LM


@pytest.fixture(scope="session")
def synthetic_data():
    return make_synthetic()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """One thread per test: results do not depend on test order, and a loaded 2-core machine does
    not thrash (2 threads under load measured 80 s against 1.2 s for the same test)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shared_cifar_dir() -> Path:
    """The shared CIFAR-10 folder; tests that need it skip where the checkout has no shared/ beside it."""
    if not (CIFAR_DIR / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"no shared CIFAR-10 at {CIFAR_DIR}")
    return CIFAR_DIR


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ESPER_CI (.ci/run sets it: it installs Prometheus, Chromium and g++, and the checkout has the
    shared data beside it) a test that skips for want of a tool or data fails instead, so no promise CI
    checks passes unchecked. A skip for CUDA stays a skip: CI machines have none."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("ESPER_CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "CUDA" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under ESPER_CI, where it must run: {reason}"
