"""Writes aha-dashboard.json, a Grafana dashboard of aha's metrics, for Ray's Prometheus + Grafana setup.

    python deploy/grafana/dashboard.py > deploy/grafana/aha-dashboard.json     (a test checks the file is current)

aha's driver sets one Ray Gauge per metric (cluster/metrics.py): `aha_<metric, non-alphanumerics -> _>` with the
tag `aha_job` = the job's name. Ray exports it to Prometheus as `ray_aha_<...>`. The tag is not called `job`
because Prometheus renames a scraped `job` label to `exported_job`; the dashboard filters on `aha_job`. tests/integration/test_submit.py checks that every metric queried here is
exported by a real run.
"""

from __future__ import annotations

import json

JOB_LABEL = "aha_job"
"""The Prometheus label that holds the aha job's name (see the module docstring)."""

# (title, unit, [(metric, legend)], description) per panel; rows of three.
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    (
        "Learning",
        [
            (
                "Train reward",
                "none",
                [("reward_mean", "mean"), ("reward_std", "std"), ("accuracy", "share >= eval_threshold")],
                "Reward of the samples trained on at each step.",
            ),
            (
                "Held-out accuracy",
                "percentunit",
                [("eval_accuracy", "accuracy"), ("eval_reward_mean", "reward mean")],
                "Greedy evaluation on held-out prompts (at start, every schedule.eval_every steps, at the end).",
            ),
            (
                "Completion length (tokens)",
                "none",
                [("completion_len", "mean"), ("monitor_len_tokens_p90", "p90")],
                "Lengths of the sampled completions.",
            ),
        ],
    ),
    (
        "Learner",
        [
            (
                "Loss",
                "none",
                [("train_loss", "RL loss"), ("imitation_nll", "imitation NLL")],
                "Training loss per optimizer step.",
            ),
            (
                "Gradient norm and learning rate",
                "none",
                [("train_grad_norm", "grad norm"), ("train_lr", "lr")],
                "Global gradient norm before clipping, and the learning rate.",
            ),
            (
                "Policy drift",
                "none",
                [
                    ("train_entropy", "entropy"),
                    ("train_is_weight", "off-policy weight"),
                    ("train_engine_logprob_diff", "|learner - engine| logprob"),
                ],
                "Entropy of the policy, the truncated importance weight, and how far the engines' logprobs are "
                "from the learner's.",
            ),
        ],
    ),
    (
        "Throughput",
        [
            (
                "Step time",
                "s",
                [
                    ("step_s", "whole step"),
                    ("generate_score_s", "generate + score"),
                    ("train_step_s", "train"),
                    ("sync_s", "weight sync"),
                ],
                "Wall-clock time of each part of a training step.",
            ),
            (
                "Tokens per second",
                "none",
                [("rollout_tokens_per_s", "rollout"), ("train_tokens_per_s", "learner")],
                "Completion tokens generated per second, and tokens trained on per second.",
            ),
            (
                "Weight sync",
                "bytes",
                [("sync_bytes", "bytes per engine")],
                "Bytes sent to each engine per sync.",
            ),
        ],
    ),
    (
        "Versions, buffer and faults",
        [
            (
                "Staleness (versions)",
                "none",
                [("staleness_max", "max"), ("staleness_mean", "mean"), ("version", "policy version")],
                "How many versions behind the learner the trained samples were generated.",
            ),
            (
                "Replay buffer",
                "none",
                [
                    ("buffer_size", "held"),
                    ("buffer_dropped_stale", "dropped stale"),
                    ("buffer_dropped_zero_variance", "dropped zero variance"),
                    ("buffer_evicted", "evicted"),
                ],
                "Samples held now, and cumulative drops and evictions.",
            ),
            (
                "Faults",
                "none",
                [
                    ("reward_errors", "reward errors (this step)"),
                    ("failed_prompts", "failed prompts (total)"),
                    ("engines_live", "live engines"),
                    ("engine_restarts", "engine restarts (total)"),
                    ("sync_probe_diff", "sync probe mean diff"),
                ],
                "Samples whose scoring failed, prompts given up on, rollout engines serving and replaced, and the "
                "weight-sync logprob check.",
            ),
        ],
    ),
]


def _panel(panel_id: int, x: int, y: int, title: str, unit: str, series, description: str) -> dict:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": f'ray_aha_{metric}{{{JOB_LABEL}=~"$job"}}',
                "legendFormat": f"{{{{{JOB_LABEL}}}}} {legend}",
            }
            for i, (metric, legend) in enumerate(series)
        ],
    }


def dashboard() -> dict:
    panels = []
    y = 0
    next_id = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        for col, (title, unit, series, description) in enumerate(row_panels):
            panels.append(_panel(next_id, 8 * col, y, title, unit, series, description))
            next_id += 1
        y += 8
    return {
        "uid": "aha-rl",
        "title": "aha: RL on language models",
        "description": "Metrics of aha jobs (cluster/metrics.py), exported through Ray's metrics API.",
        "tags": ["aha", "ray"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "graphTooltip": 1,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "job",
                    "label": "aha job",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": f"label_values(ray_aha_version, {JOB_LABEL})", "refId": "jobs"},
                    "definition": f"label_values(ray_aha_version, {JOB_LABEL})",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2))
