"""Multi-turn episodes on the real stack: vLLM (CPU build) engines in Ray actors playing against environments in
their own actors; the learner's logprobs on the same sequences; failing environments; and short `aha run` jobs
with the guessing game (sync, async, checkpoint and resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aha.actors.config import EnvironmentConfig, ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.records import Prompt
from aha.cluster.config_file import load_config
from tests.integration.test_rollout import learner_logprobs  # the same oracle as single-turn

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [Prompt(id=f"p{i}", text=t) for i, t in enumerate(["123+456=", "hello", "Guess(1-9)"])]
SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=5)


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model):
    from aha.actors.rollout import RolloutPool

    cfg = RolloutConfig(num_engines=1, samples_per_prompt=2, sampling=SAMPLING, kv_cache_gib=0.25)
    env = EnvironmentConfig(
        class_path="tests.integration.fault_envs:TalkBack", max_turns=3, max_tokens=80, timeout_s=2
    )
    pool = RolloutPool(
        ModelConfig(path=str(tiny_model), max_model_len=256), cfg, namespace="aha-tests-env", environment=env
    )
    pool.start()
    yield pool
    pool.shutdown()


def test_multi_turn_episodes_keep_one_sequence_whose_model_tokens_match_the_learner(pool, tiny_model):
    from transformers import AutoTokenizer

    done = pool.generate_all(PROMPTS)
    assert not done.failed and len(done.trajectories) == 6
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    worst = 0.0
    for t in done.trajectories:
        assert t.turns == 3 and t.finish_reason == "turns" and t.env_error is None
        assert t.env_reward == pytest.approx(0.75)  # 0.25 per turn
        mask = torch.tensor(t.completion_mask, dtype=torch.bool)
        assert mask.sum() > 0 and (~mask).sum() > 0  # model and environment tokens in one sequence
        # the environment's tokens are exactly its observations, in place
        assert tokenizer.decode(t.prompt_ids[-3:]) == "ok:"
        env_text = tokenizer.decode([i for i, m in zip(t.completion_ids, t.completion_mask) if not m])
        assert env_text.count("next:") == 2
        ours = learner_logprobs(tiny_model, t, SAMPLING)
        engine = torch.tensor(t.logprobs)
        assert engine[~mask].eq(0).all()  # no behaviour logprob for environment tokens
        worst = max(worst, (ours[mask] - engine[mask]).abs().max().item())
    assert worst < 1e-3


def test_a_failing_environment_ends_its_episodes_with_an_error_not_the_engine(pool):
    import ray

    from aha.actors.config import RewardConfig
    from aha.actors.reward import RewardScorer

    def play(fault: str):
        return pool.generate_all([Prompt(id=f"f-{fault}", text="hello", fields={"fault": fault})], n=1)

    raised = play("raise").trajectories
    assert raised[0].finish_reason == "error" and raised[0].env_error.startswith("exception: ")
    hung = play("hang").trajectories  # past environment.timeout_s (2 s)
    assert hung[0].finish_reason == "error" and hung[0].env_error.startswith("timeout: ")
    crashed = play("exit").trajectories  # the environment's process dies
    assert crashed[0].finish_reason == "error" and crashed[0].env_error.startswith("crashed: ")
    scored = RewardScorer(RewardConfig(on_error="reward", error_reward=-1.0)).score(raised + hung + crashed)
    assert all(t.reward == -1.0 and t.reward_error.startswith("environment") for t in scored)
    # the engine lived through it, and its next episodes run against a fresh environment actor
    assert ray.get(pool.engines[0].health.remote(), timeout=30)["name"] == "rollout-0"
    again = play("").trajectories
    assert again[0].env_error is None and again[0].turns == 3


def run_guess_job(tmp_path, tiny_model, mode: str, steps: int, resume: bool = False, extra=()):
    from aha.cluster.driver import run

    cfg = load_config(
        ROOT / "deploy" / "examples" / "guess_cpu.yaml",
        [
            f"name=env-{mode}",
            f"model.path={tiny_model}",
            f"logging.run_dir={tmp_path}/{{name}}",
            f"cluster.namespace=aha-env-{mode}",
            "imitation.steps=2",
            f"schedule.mode={mode}",
            f"schedule.steps={steps}",
            "schedule.prompts_per_step=4",
            "schedule.eval_prompts=8",
            "schedule.eval_every=0",
            "rollout.samples_per_prompt=4",
            "checkpoint.every=1",
            "checkpoint.export_hf=false",
            *extra,
        ],
    )
    summary = run(cfg, resume=resume)
    records = [json.loads(line) for line in (Path(tmp_path) / f"env-{mode}" / "metrics.jsonl").open()]
    return summary, [r for r in records if "reward_mean" in r], records


def test_a_short_multi_turn_job_trains_on_episodes(ray_cluster, tiny_model, tmp_path):
    summary, steps, records = run_guess_job(tmp_path, tiny_model, "sync", steps=2)
    assert summary["steps"] == 2 and summary["failed_prompts"] == 0
    for r in steps:
        assert 1 <= r["env/turns_mean"] <= 4 and r["env/errors"] == 0 and 0 <= r["env/won"] <= 1
        assert r["train/sequences"] + r["train/skipped_sequences"] == 16 and r["sync_probe_diff"] < 1e-3
    assert any("eval/env/won" in r for r in records)


@pytest.mark.slow
def test_multi_turn_jobs_run_async_and_resume_from_a_checkpoint(ray_cluster, tiny_model, tmp_path):
    summary, steps, _ = run_guess_job(tmp_path, tiny_model, "async", steps=2)
    assert summary["steps"] == 2 and all(r["staleness_max"] <= 1 for r in steps)
    summary, steps, _ = run_guess_job(tmp_path, tiny_model, "async", steps=3, resume=True)
    assert summary["steps"] == 3 and [r["version"] for r in steps][-1] == 5  # 2 imitation + 3 RL steps
    prompts = [json.loads(line) for line in (Path(tmp_path) / "env-async" / "prompts.jsonl").open()]
    assert [p["step"] for p in prompts] == [1, 2, 3]  # resumed at step 3, nothing repeated


@pytest.mark.slow
def test_generate_writes_won_episodes_as_sft_data(ray_cluster, tiny_model, tmp_path):
    from aha.cluster.generate import generate

    cfg = load_config(
        ROOT / "deploy" / "examples" / "guess_cpu.yaml",
        [
            "name=env-gen",
            f"model.path={tiny_model}",
            "cluster.namespace=aha-env-gen",
            "generate.prompts=8",
            "generate.batch_prompts=4",
            f"generate.output={tmp_path}/won.jsonl",
            "generate.filter={type: pass_fail}",  # keep the episodes whose reward (the win) passes
            "rollout.sampling.temperature=1.0",
        ],
    )
    summary = generate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "won.all.jsonl").open()]
    assert len(rows) == 8 * 8 and summary["failed_prompts"] == 0
    # each row is an episode's transcript: guesses and the game's hints, ended by a win or the turn limit
    assert any(",lower>" in r["completion"] or ",higher>" in r["completion"] for r in rows)
    assert all(r["finish_reason"] in ("stop", "turns") for r in rows)
    kept = [json.loads(line) for line in (tmp_path / "won.jsonl").open()]
    assert all(r["reward"] == 1.0 and r["finish_reason"] == "stop" for r in kept)
    assert len(kept) == sum(r["reward"] == 1.0 for r in rows)
