"""A run on a Ray cluster that outlives it waits, at close, until Ray has exported its last metric values."""

from __future__ import annotations

import time

import pytest
import ray  # noqa: F401 - imported here so that close() does not spend its first second importing it

from aha.cluster import metrics
from aha.cluster.config import LoggingConfig
from aha.cluster.metrics import MetricsLogger


@pytest.fixture
def slept(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(metrics.time, "sleep", waits.append)
    return waits


def logger(tmp_path, joined: bool) -> MetricsLogger:
    log = MetricsLogger(
        tmp_path, LoggingConfig(report_to=[], ray_metrics=True), "job", cluster_outlives_run=joined
    )
    log._gauges["aha_reward_mean"] = object()  # as after a logged step
    log._last_set = time.monotonic()
    return log


def test_a_run_that_joined_a_cluster_waits_one_report_interval_after_its_last_values(tmp_path, slept):
    logger(tmp_path, joined=True).close()
    # Ray's default report interval is 10 s; one second of margin for the export itself.
    assert len(slept) == 1 and 10.0 < slept[0] <= 11.0


def test_the_wait_counts_from_the_last_values_not_from_close(tmp_path, slept):
    log = logger(tmp_path, joined=True)
    log._last_set -= 30  # the last values went out long ago
    log.close()
    assert slept == [0.0]


def test_a_local_ray_or_a_run_without_ray_metrics_does_not_wait(tmp_path, slept):
    logger(tmp_path, joined=False).close()
    quiet = MetricsLogger(
        tmp_path, LoggingConfig(report_to=[], ray_metrics=False), "job", cluster_outlives_run=True
    )
    quiet.log(0, {"reward_mean": 0.5})
    quiet.close()
    assert slept == []
