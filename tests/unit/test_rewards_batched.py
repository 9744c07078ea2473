"""TRL-style batched reward functions through the real scorer (no Ray), None as "not scorable", and what a failed
sample gets under `reward.on_error`."""

from __future__ import annotations

import textwrap
import threading
import time

import pytest
from pydantic import ValidationError

from aha.actors.config import RewardConfig
from aha.actors.records import Trajectory
from aha.actors.reward import RewardScorer
from aha.actors.reward_calls import RewardFunction, is_batched
from aha.actors.user_code import load_function

# Written as TRL's GRPOTrainer documentation shows reward functions: keyword lists in, a list out, the dataset's
# other columns as keyword lists, **kwargs for the rest, None where a function does not apply.
TRL_FILE = '''
import re

calls = []


def format_reward(completions, **kwargs):
    """1.0 if the completion is <think>...</think><answer>...</answer>."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    return [1.0 if re.match(pattern, c) else 0.0 for c in completions]


def accuracy_reward(completions, answer, **kwargs):
    """1.0 if the answer tag holds the row's answer; None for rows without an answer (another task's)."""
    rewards = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            rewards.append(None)
            continue
        found = re.search(r"<answer>(.*?)</answer>", completion)
        rewards.append(1.0 if found and found.group(1).strip() == gold else 0.0)
    return rewards


def code_only(prompts, completions, completion_ids, task, **kwargs):
    """Scores the rows of the code task only; records what it was called with."""
    calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                  "task": task, **kwargs})
    return [float(len(ids)) if t == "code" else None for t, ids in zip(task, completion_ids)]


def flexible(*args, **kwargs):
    """Either shape: a list when called batched, a number when called per sample."""
    if "completions" in kwargs:
        return [2.0] * len(kwargs["completions"])
    return 1.0


def boom(completions, **kwargs):
    raise RuntimeError("judge down")


def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def scalar(completions, **kwargs):
    return 1.0


def nan_at_b(completions, **kwargs):
    return [float("nan") if c == "b" else 1.0 for c in completions]


def none_for_all(completions, **kwargs):
    return [None] * len(completions)


def none_per_sample(prompt, completion, **fields):
    return None


def parts_with_none(prompt, completion, **fields):
    return {"kept": 0.5, "skipped": None}


def conversational_format(prompts, completions, **kwargs):
    """As TRL's docs write it for a conversational dataset: each completion a list with one assistant message."""
    calls.append({"prompts": prompts, "completions": completions})
    return [1.0 if completion[0]["content"].startswith("<think>") else 0.0 for completion in completions]
'''


def traj(completion: str, index: int = 0, **fields) -> Trajectory:
    ids = list(range(len(completion)))
    return Trajectory(
        prompt_id=f"p{index // 4}",
        sample_index=index % 4,
        prompt=f"question {index}",
        completion=completion,
        prompt_ids=[1],
        completion_ids=ids,
        logprobs=[0.0] * len(ids),
        finish_reason="stop",
        version=0,
        engine="test",
        fields=fields,
    )


@pytest.fixture
def trl_file(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(textwrap.dedent(TRL_FILE))
    monkeypatch.chdir(tmp_path)
    return "trl_rewards.py"


def scorer(*functions: dict, on_error: str = "mask", timeout_s: float = 5.0) -> RewardScorer:
    error_reward = -1.0 if on_error == "reward" else None
    return RewardScorer(
        RewardConfig(
            functions=list(functions), on_error=on_error, error_reward=error_reward, timeout_s=timeout_s
        )
    )


def test_trl_file_unchanged_with_columns_and_none(trl_file):
    tags = {"tags": ["think", "answer"]}
    s = scorer(
        {"function": f"{trl_file}:format_reward", "weight": 0.5},
        {"function": f"{trl_file}:accuracy_reward"},
        {"function": f"{trl_file}:code_only", "kwargs": {"scale": 3}},
        {
            "function": "aha.actors.rewards.format:format_reward",
            "name": "tags",
            "weight": 0.25,
            "kwargs": tags,
        },
    )
    assert [f.batched for f in s.functions] == [True, True, True, False]  # from the signatures
    right = traj("<think>2+2</think><answer>4</answer>", 0, task="math", answer="4")
    wrong = traj("<answer>5</answer>", 1, task="math", answer="4")
    code = traj("<think>x</think><answer>ok</answer>", 2, task="code")  # no answer column: accuracy passes
    chat = traj("hi", 3, task="chat")
    out = s.score([right, wrong, code, chat])
    assert all(t.reward_error is None for t in out)
    assert out[0].reward == pytest.approx(0.5 * 1 + 1 + 0.25 * 1)
    assert out[0].reward_parts == {"format_reward": 1.0, "accuracy_reward": 1.0, "tags": 1.0}
    assert out[1].reward == 0.0 and out[3].reward == 0.0
    # the code row: accuracy_reward returned None, so its reward is the sum over the functions that scored it
    assert out[2].reward == pytest.approx(0.5 * 1 + len(code.completion_ids) + 0.25 * 1)
    assert set(out[2].reward_parts) == {"format_reward", "code_only", "tags"}
    # one call per batch, the dataset's columns as keyword lists (None where a row lacks one), and the extras
    (call,) = load_function(f"{trl_file}:code_only").__globals__["calls"]
    assert call["prompts"] == [f"question {i}" for i in range(4)]
    assert call["completions"] == [t.completion for t in (right, wrong, code, chat)]
    assert call["answer"] == ["4", "4", None, None] and call["task"] == ["math", "math", "code", "chat"]
    assert call["completion_ids"][1] == list(range(len(wrong.completion))) and call["scale"] == 3
    assert call["finish_reason"] == ["stop"] * 4 and call["completion_tokens"][0] == len(right.completion)


def test_a_sample_no_function_scores_has_no_reward(trl_file):
    s = scorer({"function": f"{trl_file}:none_for_all"}, {"function": f"{trl_file}:none_per_sample"})
    batch = s.score_batch(1, [traj("a", 0), traj("b", 1)])
    assert [(t.reward, t.reward_error) for t in batch.trajectories] == [(None, None)] * 2
    assert batch.unscorable == 2 and s.unscorable == 2 and batch.errors == {}
    # a dict's None entries are left out; the sample is scored by what is left
    (t,) = scorer({"function": f"{trl_file}:parts_with_none"}).score([traj("a")])
    assert t.reward == 0.5 and t.reward_parts == {"parts_with_none/kept": 0.5}


def test_batched_field_decides_the_call(trl_file):
    """`batched` acts: the same function is called per sample by default (no `completions` parameter) and
    once per batch with batched: true."""
    samples = [traj("a", 0), traj("b", 1)]
    per_sample = scorer({"function": f"{trl_file}:flexible"})
    assert not per_sample.functions[0].batched and [t.reward for t in per_sample.score(samples)] == [1.0, 1.0]
    batched = scorer({"function": f"{trl_file}:flexible", "batched": True})
    assert [t.reward for t in batched.score([traj("a", 0), traj("b", 1)])] == [2.0, 2.0]
    assert is_batched(lambda prompts, completions, **kw: [], None)
    assert not is_batched(lambda prompt, completion, /, **kw: 0.0, None)
    assert not is_batched(lambda completions, **kw: [], False)  # declared wins


@pytest.mark.parametrize(
    "fn, kind, reason",
    [
        ("boom", "exception", "RuntimeError: judge down"),
        ("short", "wrong_length", "returned 2 rewards for 3 samples"),
        ("scalar", "not_a_list", "returned float, not a list of 3 rewards"),
    ],
)
def test_a_failed_batched_call_fails_its_samples(trl_file, fn, kind, reason):
    s = scorer({"function": f"{trl_file}:{fn}"}, {"function": f"{trl_file}:format_reward"})
    out = s.score([traj("a", 0), traj("b", 1), traj("c", 2)])
    assert [t.reward for t in out] == [None] * 3  # on_error: mask, the default
    assert all(t.reward_error == f"{fn}: {reason}" for t in out)
    assert all(t.reward_parts == {"format_reward": 0.0} for t in out)  # what scored is still recorded
    assert s.errors == {f"{fn}/{kind}": 3}


def test_a_bad_value_fails_only_its_sample(trl_file):
    s = scorer({"function": f"{trl_file}:nan_at_b"}, on_error="reward")
    out = s.score([traj("a", 0), traj("b", 1), traj("c", 2)])
    assert [t.reward for t in out] == [1.0, -1.0, 1.0]
    assert out[1].reward_error == "nan_at_b: returned nan" and s.errors == {"nan_at_b/not_finite": 1}


def test_a_batched_call_has_timeout_s_per_sample():
    release = threading.Event()

    def slow(completions, **kwargs):
        release.wait(30)
        return [1.0] * len(completions)

    s = scorer({"function": "aha.actors.rewards.match:exact_match"}, timeout_s=0.2)
    s.functions.append(RewardFunction("slow", slow, 1.0, {}, batched=True))
    start = time.monotonic()
    out = s.score([traj("4", i, answer="4") for i in range(3)])
    assert 0.6 <= time.monotonic() - start < 2.5  # 3 samples x 0.2 s, then the per-sample function
    assert [t.reward_error for t in out] == ["slow: timeout after 0.6 s (a batch of 3)"] * 3
    assert [t.reward_parts for t in out] == [{"exact_match": 1.0}] * 3 and s.hung_threads == 1
    assert s.ping() == 2  # time limits per sample a batch may use: the per-sample functions, and `slow`
    release.set()


def test_on_error_decides_what_a_failed_sample_gets(trl_file):
    """The same failure: left without a reward (mask, the default), or trained with error_reward (reward)."""
    for on_error, expected in (("mask", None), ("reward", -1.0)):
        (t,) = scorer({"function": f"{trl_file}:boom"}, on_error=on_error).score([traj("a")])
        assert (t.reward, t.reward_error) == (expected, "boom: RuntimeError: judge down")
    assert RewardConfig(on_error="reward").failed_reward == 0.0  # error_reward unset: 0.0
    assert RewardConfig().failed_reward is None


def test_error_reward_with_mask_is_refused():
    with pytest.raises(ValidationError, match="reward.error_reward is set but reward.on_error is mask"):
        RewardConfig(error_reward=-1.0)
    assert RewardConfig(on_error="reward", error_reward=-1.0).failed_reward == -1.0


def test_an_environment_error_follows_on_error_too():
    broken = traj("x")
    broken.env_error, broken.env_reward, broken.completion_mask = "timeout: after 10 s", 0.0, [1]
    (t,) = RewardScorer(RewardConfig()).score([broken])  # no functions: the environment's reward alone
    assert t.reward is None and t.reward_error == "environment: after 10 s"


def test_a_chat_datasets_samples_reach_a_batched_function_as_messages(trl_file):
    """A prompt the data gave as messages reaches a batched function as its turns, and the completion as one
    assistant turn, the way TRL calls a function written for a conversational dataset."""
    s = scorer({"function": f"{trl_file}:conversational_format"})
    turns = [{"role": "system", "content": "Think."}, {"role": "user", "content": "2+2?"}]
    samples = [traj("<think>4</think>", 0), traj("4", 1)]
    for t in samples:
        t.prompt_messages = turns
    assert [t.reward for t in s.score(samples)] == [1.0, 0.0]
    (call,) = load_function(f"{trl_file}:conversational_format").__globals__["calls"]
    assert call["prompts"] == [turns, turns]
    assert call["completions"][0] == [{"role": "assistant", "content": "<think>4</think>"}]
