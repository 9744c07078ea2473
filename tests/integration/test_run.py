"""End-to-end runs of `aha run` on tiny models: 2 engines, 2 reward workers, 2 learner ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aha.cluster.config_file import load_config

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"


def run_job(tmp_path, tiny_model, mode: str, extra: list[str] = (), resume: bool = False):
    from aha.cluster.driver import run

    cfg = load_config(
        DEMO,
        [
            f"name=e2e-{mode}",
            f"model.path={tiny_model}",
            f"logging.run_dir={tmp_path}/{{name}}",
            f"cluster.namespace=aha-e2e-{mode}",
            "logging.progress=false",
            "rollout.num_engines=2",
            "reward.num_workers=2",
            "learner.num_ranks=2",
            "learner.micro_batch_size=32",
            "imitation.steps=3",
            f"schedule.mode={mode}",
            "schedule.steps=4",
            "schedule.prompts_per_step=8",
            "schedule.eval_prompts=16",
            "schedule.eval_every=2",
            "buffer.max_staleness=1",
            *extra,
        ],
    )
    summary = run(cfg, resume=resume)
    records = [json.loads(line) for line in (Path(tmp_path) / f"e2e-{mode}" / "metrics.jsonl").open()]
    return summary, records


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_run_finishes_with_versions_and_bounded_staleness(ray_cluster, tiny_model, tmp_path, mode):
    summary, records = run_job(tmp_path, tiny_model, mode)
    run_dir = Path(tmp_path) / f"e2e-{mode}"
    assert summary["steps"] == 4 and summary["imitation_steps"] == 3 and summary["version"] == 7
    assert summary["failed_prompts"] == 0
    assert summary["prompts_consumed"] == 4 * 8  # async: none sampled ahead past the last step
    for name in ("metrics.jsonl", "summary.json", "report.png", "config.yaml", "final_model/config.json"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tensorboard").iterdir())
    steps = [r for r in records if "reward_mean" in r]
    assert [r["version"] for r in steps] == [4, 5, 6, 7]
    assert all(r["staleness_max"] <= 1 for r in steps)
    if mode == "sync":
        assert all(r["staleness_max"] == 0 for r in steps)  # strictly on-policy
        # the engine's generate calls lie inside the driver's wait for the step's groups
        assert all(0 < r["engine_busy_s"] <= r["generate_score_s"] for r in steps)
    else:  # the next step's batch is generated during this one, none after the last
        assert all(r["engine_busy_s"] > 0 for r in steps[:-1])
    # Every sample the buffer took reached the learner: 8 prompts x 8 samples per step, no loss, no duplicates
    # (those of advantage 0 skip the passes: learner.skip_zero_advantage).
    assert all(r["train/sequences"] + r["train/skipped_sequences"] == 64 for r in steps)
    last = steps[-1]
    assert last["buffer_dropped_stale"] == 0  # async: what was sampled ahead was fresh enough to train on
    assert (
        last["buffer_taken"] + last["buffer_dropped_stale"] + last["buffer_size"] + last["buffer_evicted"]
        == last["buffer_added"]
    )
    assert all(r["sync_probe_diff"] < 1e-3 for r in steps)
    assert any("eval/accuracy" in r for r in records)


def test_sync_mode_is_reproducible_with_a_seed(ray_cluster, tiny_model, tmp_path):
    small = ["rollout.num_engines=1", "reward.num_workers=1", "learner.num_ranks=1", "schedule.steps=3"]
    curves = []
    for attempt in ("a", "b"):
        _, records = run_job(tmp_path / attempt, tiny_model, "sync", small)
        # what the engines sampled (lengths, logprobs) and what the learner computed on it, step by step
        keys = ("completion_len", "train/logprob", "train/entropy", "reward_mean", "train/loss")
        curves.append([tuple(r[k] for k in keys) for r in records if "reward_mean" in r])
    assert len(curves[0]) == 3 and curves[0] == curves[1]


SMALL = ["rollout.num_engines=1", "reward.num_workers=1", "learner.num_ranks=1"]


def by_version(records: list[dict]) -> dict[int, dict]:
    """The last metrics line of each trial-and-error step (a step redone after a resume replaces the first)."""
    return {int(r["version"]): r for r in records if "reward_mean" in r}


def test_a_saturated_task_ends_the_run_cleanly_with_its_final_model(ray_cluster, tiny_model, tmp_path):
    """Every sample is correct, so dynamic sampling drops every group and the first step has none after
    buffer.max_refills: the run ends as a finished run does (final evaluation, checkpoint, export, summary),
    with no error, and the summary says why it stopped early."""
    always = "{function: 'tests.integration.run_rewards:always_one'}"
    extra = [*SMALL, "imitation.steps=0", f"reward.functions=[{always}]", "buffer.drop_zero_variance=true"]
    summary, records = run_job(tmp_path, tiny_model, "sync", [*extra, "buffer.max_refills=1"])
    run_dir = tmp_path / "e2e-sync"
    assert summary["steps"] == 0 and "the task is saturated" in summary["stopped_early"]
    assert summary["prompts_consumed"] == 2 * 8  # the first round and one refill
    assert summary["eval_accuracy_final"] == 1.0 and any(r.get("phase") == 2.0 for r in records)
    assert summary["final_model"] and (run_dir / "final_model" / "config.json").is_file()
    assert (run_dir / "checkpoints" / "latest_run").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["stopped_early"] == summary["stopped_early"]


def test_a_step_short_of_groups_trains_on_those_it_has(ray_cluster, tiny_model, tmp_path):
    """Prompts of odd sum are always solved (their groups are dropped), those of even sum score the digit share
    of the completion: with no refill each step has only part of its 8 groups, trains on them and counts it."""
    reward = "{function: 'tests.integration.run_rewards:digit_share_on_even_sums'}"
    extra = [*SMALL, f"reward.functions=[{reward}]", "buffer.drop_zero_variance=true", "buffer.max_refills=0"]
    summary, records = run_job(tmp_path, tiny_model, "sync", [*extra, "schedule.steps=3"])
    steps = list(by_version(records).values())
    assert summary["steps"] == 3 and summary["stopped_early"] is None
    assert len(steps) == 3 and all(0 < r["short_groups"] < 8 for r in steps)
    assert summary["steps_short"] == 3
    for r in steps:  # 8 samples of each group the step had, every one trained or skipped as advantage 0
        assert r["train/sequences"] + r["train/skipped_sequences"] == 8 * (8 - r["short_groups"])


def test_kl_reference_is_the_model_trial_and_error_starts_from(ray_cluster, tiny_model, tmp_path):
    """algorithm.kl_reference after imitation: `model` keeps model.path as the reference (KL > 0 at the first
    step: imitation moved the policy), `rl_start` (the default) the imitated weights (KL 0 at the first step).
    A run resumed from its step-1 checkpoint restores that reference: its step 2 has the uninterrupted KL."""
    common = [*SMALL, "algorithm.kl_coef=0.1", "imitation.steps=3", "schedule.eval_prompts=0"]
    _, model_records = run_job(
        tmp_path / "model", tiny_model, "sync", [*common, "schedule.steps=1", "algorithm.kl_reference=model"]
    )
    args = [*common, "schedule.steps=2", "checkpoint.every=1", "checkpoint.keep=3"]
    _, first = run_job(tmp_path / "rl_start", tiny_model, "sync", args)
    checkpoints = tmp_path / "rl_start" / "e2e-sync" / "checkpoints"
    assert (checkpoints / "reference.safetensors").is_file()
    (checkpoints / "latest_run").write_text(min(p.name for p in checkpoints.glob("step-*")))  # after step 1
    _, resumed = run_job(tmp_path / "rl_start", tiny_model, "sync", args, resume=True)
    assert by_version(model_records)[4]["train/kl"] > 1e-4  # versions: 3 imitation steps, then 4, 5
    assert by_version(first)[4]["train/kl"] < 1e-7
    assert by_version(first)[5]["train/kl"] > 1e-7
    assert by_version(resumed)[5]["train/kl"] == pytest.approx(by_version(first)[5]["train/kl"], rel=1e-3)


def test_a_hub_id_runs_from_its_cached_snapshot_and_a_rerun_keeps_the_run(
    ray_cluster, tiny_model, tmp_path, monkeypatch
):
    """model.path=org/name from a Hub cache (HF_HUB_OFFLINE=1): the driver resolves it once, the engines and the
    learner load the snapshot folder, and config.yaml records the snapshot as model.path with the id@commit as
    model.source. A plain rerun into the same run dir is refused (checkpoints and a final model are there)."""
    import yaml

    from aha.cluster.config_file import ConfigError
    from tests.unit.test_hub import REV, hub_cache_with

    snapshot = hub_cache_with(tmp_path / "hf", "org/tiny", tiny_model)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    extra = [
        *SMALL,
        "imitation.steps=0",
        "schedule.steps=2",
        "schedule.eval_prompts=0",
        "checkpoint.every=null",
    ]
    summary, records = run_job(tmp_path, "org/tiny", "sync", extra)
    run_dir = tmp_path / "e2e-sync"
    assert summary["steps"] == 2 and len(by_version(records)) == 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert saved["path"] == str(snapshot) and saved["source"] == f"org/tiny@{REV}"
    assert (run_dir / "final_model" / "config.json").is_file()
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 2  # unset, checkpoint.every is 1 here
    with pytest.raises(ConfigError, match="--resume .* --overwrite"):
        run_job(tmp_path, "org/tiny", "sync", extra)
    assert (run_dir / "final_model" / "config.json").is_file()


def test_a_chat_dataset_in_parquet_runs_with_a_system_prompt_and_mapped_columns(
    ray_cluster, tiny_model, tmp_path
):
    """`data.type: hf` end to end: chat messages (their final assistant turn is the demonstration imitation trains
    on), a system prompt through the model's chat template, the reward's `answer` mapped from another column, a
    held-out split carved out by seed, and the prompt too long for the context left out and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(40):
        a, b = 100 + 7 * i, 200 + 3 * i
        total = str(a + b).zfill(4)[::-1]
        turns = [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": total}]
        rows.append({"messages": turns, "sum": total})
    rows.append(
        {"messages": [{"role": "user", "content": "9" * 500}], "sum": "0"}
    )  # no room for a completion
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    data = (
        f"data={{type: hf, path: '{tmp_path / 'chat.parquet'}', eval_size: 8, seed: 1, system_prompt: 'Add.', "
        "columns: {prompt: messages, fields: {answer: sum}}}"
    )
    extra = [*SMALL, data, "model.chat_template=true", "imitation.steps=2", "imitation.demonstrations=16"]
    summary, records = run_job(
        tmp_path, tiny_model, "sync", [*extra, "schedule.steps=2", "schedule.eval_prompts=8"]
    )
    assert summary["steps"] == 2 and summary["imitation_steps"] == 2
    assert sum(summary["prompts_too_long"].values()) == 1  # in whichever split the seed put it
    assert summary["eval_accuracy_final"] is not None and summary["eval_reward_errors_final"] == 0
    assert all(r["reward_errors"] == 0 for r in records if "reward_errors" in r)
