"""Metrics: one `log(step, values)` call writes a JSONL line, the trackers' scalars (TensorBoard, wandb, MLflow,
trackio: cluster/trackers.py) and Ray metrics (Prometheus, the Ray dashboard); `log_samples` writes sample
completions to samples.jsonl and the trackers' tables. `write_report` turns the JSONL into plots and a summary at
the end of a run."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from aha.cluster.config import LoggingConfig
from aha.cluster.trackers import Opening, Trackers


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        job: str,
        config: dict[str, Any] | None = None,
        cluster_outlives_run: bool = False,
    ):
        """`config`: what the trackers record as the run's config (the resolved job config, the code's commit).
        `cluster_outlives_run`: the run joined a Ray cluster (cluster.address) whose Prometheus endpoint stays up
        after it: `close` then waits until Ray has exported the last values (see `_flush_ray_metrics`)."""
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.job = job
        self.ray_metrics = cfg.ray_metrics
        self.cluster_outlives_run = cluster_outlives_run
        self._gauges: dict[str, Any] = {}
        self._last_set = 0.0  # time.monotonic() of the last gauge update
        self.started = time.time()
        self.trackers = Trackers(cfg.report_to, Opening(run_dir, job, cfg.project, config or {}))
        self.file = self.path.open("a")

    def log(self, step: int, values: dict[str, float]) -> None:
        clean = {
            k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(float(v))
        }
        record = {"step": step, "time_s": round(time.time() - self.started, 3), **clean}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.trackers.log_scalars(step, clean)
        if self.ray_metrics:
            self._export(clean)

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Sample completions of one step (cluster/samples.py): a line each in samples.jsonl, a table in each
        tracker (under `samples` or `eval/samples`). No rows, nothing written."""
        if not rows:
            return
        with (self.run_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        key = "eval/samples" if rows[0]["phase"] == "eval" else "samples"
        self.trackers.log_samples(rows[0]["step"], key, rows)

    def _export(self, values: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for k, v in values.items():
            # tag "aha_job", not "job": Prometheus renames a scraped "job" label to "exported_job"
            name = "aha_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=f"aha metric {k}", tag_keys=("aha_job",))
            self._gauges[name].set(v, tags={"aha_job": self.job})
        self._last_set = time.monotonic()

    def _flush_ray_metrics(self) -> float:
        """Ray's core worker hands gauge values to the node's metrics agent once per report interval (10 s by
        default), and the agent forgets a process's values two intervals after it stops reporting. A driver that
        exits right after its last values (the final evaluation) would never export them: wait until one more
        report has gone out. Returns the seconds waited."""
        if not (self._gauges and self.cluster_outlives_run):
            return 0.0
        import ray

        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000  # Ray floors it at 1 s
        wait = max(0.0, self._last_set + interval_s + 1.0 - time.monotonic())
        time.sleep(wait)
        return wait

    def close(self, failed: bool = False) -> None:
        """`failed`: the run ends on an error (the trackers that record it mark their run failed)."""
        self.file.close()
        self.trackers.close(failed)
        self._flush_ray_metrics()


def read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


PLOTS = (
    ("reward_mean", "train reward (mean)"),
    ("eval/accuracy", "held-out accuracy"),
    ("rollout_tokens_per_s", "rollout tokens/s"),
    ("step_s", "step time (s)"),
    ("monitor/phrase_rate", "share with self-check phrases"),
    ("monitor/len_tokens_p90", "completion length p90 (tokens)"),
)


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """report.png (one panel per key metric over steps) and summary.json in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    cols = 3
    rows = math.ceil(len(PLOTS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, PLOTS):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"aha run: {run_dir.name}")
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=110)
    plt.close(fig)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return run_dir / "report.png"
