"""The GPU check's report: each test's outcome and what it measured, written as JSON to $AHA_GPU_REPORT at the
end of the session (scripts/gpu_check.sh prints it as one summary)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

MEASURED: dict[str, Any] = {}  # test name -> its measurements
OUTCOMES: dict[str, str] = {}  # test name -> passed | failed | skipped (with the reason)


@pytest.fixture
def measure(request):
    """A dict the test fills with what it measured; it lands in the report under the test's name."""
    values: dict[str, Any] = {}
    MEASURED[request.node.name] = values
    return values


def pytest_runtest_logreport(report):
    name = report.nodeid.split("::", 1)[-1]
    if report.when == "call" or report.outcome != "passed":  # set-up failures and skips count too
        if report.skipped and isinstance(report.longrepr, tuple):
            OUTCOMES[name] = f"skipped: {report.longrepr[2]}"
        elif name not in OUTCOMES or report.failed:
            OUTCOMES[name] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("AHA_GPU_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"tests": OUTCOMES, "measured": MEASURED}, f, indent=2, default=str)
