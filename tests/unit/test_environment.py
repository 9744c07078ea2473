"""Environments without Ray: the protocol's loading and replies, the host's isolation of user code, the batched
turn loop (masks, budgets, limits, errors), the shipped game, the reward pool's use of the environment's reward,
the env/* metrics, the config and `aha validate` checks, and the loss mask (environment tokens: zero gradient)."""

from __future__ import annotations

import time

import pytest
import torch

from aha.actors.config import EnvironmentConfig, RewardConfig
from aha.actors.environment import (
    EnvironmentHost,
    Episode,
    Generated,
    Reply,
    StepResult,
    as_reply,
    crashed_replies,
    load_environment,
    run_episodes,
)
from aha.actors.envs.guess import GuessNumber
from aha.actors.records import Trajectory
from aha.cluster.config import JobConfig
from aha.cluster.config_file import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# test environments (loaded by name, like a user's)


class Echo:
    """Answers every turn with `<turn>!`, done when the turn contains `stop`; reward 1 per turn."""

    def __init__(self, mark: str = "!"):
        self.mark = mark

    def start(self, prompt: str, **fields) -> str:
        return fields.get("first", ">")

    def step(self, turn: str):
        return (turn + self.mark, 1.0, "stop" in turn)


class Broken:
    def start(self, prompt: str, **_) -> str:
        return ""

    def step(self, turn: str):
        if turn == "raise":
            raise RuntimeError("boom")
        if turn == "hang":
            time.sleep(5)
        if turn == "nan":
            return ("", float("nan"), False)
        if turn == "shape":
            return "just text"
        return StepResult("ok", 0.5, True, {"won": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# protocol and host


def test_load_environment_names_what_is_wrong(tmp_path):
    assert load_environment("aha.actors.envs.guess:GuessNumber") is GuessNumber
    with pytest.raises(ValueError, match="not a class"):
        load_environment("aha.actors.envs.guess:prompt_text")
    with pytest.raises(ValueError, match="has no callable"):
        load_environment("aha.actors.envs.guess:Nope")
    path = tmp_path / "my_env.py"
    path.write_text("class NoStep:\n    def start(self, prompt, **f):\n        return ''\n")
    with pytest.raises(ValueError, match="no step method"):
        load_environment(f"{path}:NoStep")
    with pytest.raises(FileNotFoundError, match="environment file"):
        load_environment("missing_env.py:X")


def test_as_reply_accepts_tuples_and_step_results_and_refuses_the_rest():
    assert as_reply(("obs", 1, True)) == Reply("obs", 1.0, True, {})
    assert as_reply(("obs", 0.5, False, {"won": 0})) == Reply("obs", 0.5, False, {"won": 0.0})
    assert as_reply(StepResult("o", 2.0, True, {"x": 1})).info == {"x": 1.0}
    for bad in (
        "text",
        ("o", float("inf"), True),
        (3, 1.0, True),
        ("o", 1.0, False, {"k": "v"}),
        ("o", True, 1),
    ):
        with pytest.raises(ValueError):
            as_reply(bad)


def test_host_builds_one_instance_per_episode_with_the_kwargs():
    host = EnvironmentHost(f"{__name__}:Echo", {"mark": "?"}, timeout_s=5)
    assert [r.observation for r in host.start([("a", "p", {"first": "A"}), ("b", "p", {})])] == ["A", ">"]
    replies = host.step([("a", "x"), ("b", "stop")])
    assert [(r.observation, r.reward, r.done) for r in replies] == [("x?", 1.0, False), ("stop?", 1.0, True)]
    assert set(host.episodes) == {"a"}  # a done episode is forgotten
    host.close(["a"])
    assert host.episodes == {}


def test_host_ends_only_the_failing_episode_with_its_kind():
    host = EnvironmentHost(f"{__name__}:Broken", {}, timeout_s=0.5)
    keys = ["raise", "hang", "nan", "shape", "fine"]
    host.start([(k, "p", {}) for k in keys])
    started = time.monotonic()
    replies = dict(zip(keys, host.step([(k, k) for k in keys])))
    assert time.monotonic() - started < 3  # the hung call was abandoned at timeout_s
    assert replies["raise"].kind == "exception" and "boom" in replies["raise"].error
    assert replies["hang"].kind == "timeout"
    assert replies["nan"].kind == "bad_value" and replies["shape"].kind == "bad_value"
    assert replies["fine"] == Reply("ok", 0.5, True, {"won": 1.0})
    assert all(replies[k].done for k in keys) and host.episodes == {}


def test_host_reports_a_constructor_that_rejects_its_kwargs():
    host = EnvironmentHost(f"{__name__}:Echo", {"nope": 1}, timeout_s=5)
    (reply,) = host.start([("a", "p", {})])
    assert reply.done and reply.kind == "exception" and "nope" in reply.error


# ---------------------------------------------------------------------------------------------------------------
# the turn loop


class FakeEngine:
    """Generates `turn` tokens per call: token 100 + turn index, logprob -0.1 each; records the calls."""

    def __init__(self, tokens_per_turn: int = 2, text: str = "t"):
        self.calls: list[tuple[list[list[int]], list[int]]] = []
        self.tokens_per_turn, self.text = tokens_per_turn, text

    def __call__(self, sequences, budgets):
        self.calls.append((sequences, budgets))
        outs = []
        for budget in budgets:
            n = min(self.tokens_per_turn, budget)
            outs.append(Generated([100 + len(self.calls)] * n, [-0.1] * n, self.text))
        return outs


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def play(env: str, engine, episodes, *, kwargs=None, max_turns=3, max_tokens=100, max_model_len=512):
    host = EnvironmentHost(env, kwargs or {}, timeout_s=1)
    closed: list[str] = []
    run_episodes(
        episodes,
        engine,
        host.start,
        host.step,
        closed.extend,
        encode,
        max_turns=max_turns,
        max_tokens=max_tokens,
        max_model_len=max_model_len,
    )
    return closed


def test_turn_loop_batches_turns_and_masks_environment_tokens():
    engine = FakeEngine()
    episodes = [Episode(f"e{i}", "p", {}, [1, 2]) for i in range(3)]
    closed = play(f"{__name__}:Echo", engine, episodes, max_turns=2)
    assert len(engine.calls) == 2 and all(len(seqs) == 3 for seqs, _ in engine.calls)  # one call per turn
    ep = episodes[0]
    assert ep.prompt_ids == [1, 2, ord(">")]  # the first observation belongs to the prompt
    # turn 1 (2 model tokens), "t!" (2 env tokens), turn 2 (2 model tokens); then the turn limit
    assert ep.ids == [101, 101, ord("t"), ord("!"), 102, 102]
    assert ep.mask == [1, 1, 0, 0, 1, 1]
    assert ep.logprobs == [-0.1, -0.1, 0.0, 0.0, -0.1, -0.1]
    assert ep.turns == 2 and ep.reward == 2.0 and ep.finish == "turns"
    assert "".join(ep.text) == ">tt!t"
    assert sorted(closed) == ["e0", "e1", "e2"]  # the host is told to forget episodes the engine ended
    # the second call continued the same sequences
    assert engine.calls[1][0][0] == [1, 2, ord(">"), 101, 101, ord("t"), ord("!")]


def test_turn_loop_stops_at_done_and_keeps_the_others_going():
    class StopFirst(FakeEngine):
        def __call__(self, sequences, budgets):
            outs = super().__call__(sequences, budgets)
            if len(self.calls) == 1:
                outs[0] = Generated([7], [-0.5], "stop")
            return outs

    engine = StopFirst()
    episodes = [Episode("a", "p", {}, [1]), Episode("b", "p", {}, [1])]
    closed = play(f"{__name__}:Echo", engine, episodes, max_turns=3)
    assert episodes[0].finish == "stop" and episodes[0].turns == 1 and episodes[0].mask == [1]
    assert episodes[1].finish == "turns" and episodes[1].turns == 3
    assert [len(seqs) for seqs, _ in engine.calls] == [2, 1, 1]
    assert closed == ["b"]  # "a" ended by the environment itself


def test_turn_loop_token_budget_bounds_turns_and_observations():
    engine = FakeEngine(tokens_per_turn=4)
    episodes = [Episode("a", "p", {}, [1])]
    play(f"{__name__}:Echo", engine, episodes, max_turns=10, max_tokens=9)
    ep = episodes[0]
    # 4 model + 2 env, then the budget of 3 lets a 3-token turn through; no room for another observation
    assert engine.calls[0][1] == [9] and engine.calls[1][1] == [3]
    assert len(ep.ids) == 9 and ep.mask == [1] * 4 + [0] * 2 + [1] * 3 and ep.finish == "length"
    # max_model_len bounds the same way (prompt of 1 + 1 observation token already used)
    episodes = [Episode("b", "p", {}, [1])]
    engine = FakeEngine(tokens_per_turn=4)
    play(f"{__name__}:Echo", engine, episodes, max_turns=10, max_model_len=8)
    assert engine.calls[0][1] == [6] and len(episodes[0].prompt_ids) + len(episodes[0].ids) <= 8


def test_turn_loop_ends_failing_episodes_with_their_error():
    engine = FakeEngine(text="raise")
    episodes = [Episode("a", "p", {}, [1])]
    play(f"{__name__}:Broken", engine, episodes)
    assert episodes[0].finish == "error" and episodes[0].error.startswith("exception: ")
    # a start that fails ends the episode before any generation
    engine = FakeEngine()
    episodes = [Episode("a", "p", {}, [1])]
    play(f"{__name__}:Echo", engine, episodes, kwargs={"nope": 1})
    assert episodes[0].finish == "error" and episodes[0].turns == 0 and engine.calls == []
    # a crashed host: every episode of the call ends with kind "crashed"
    episodes = [Episode("a", "p", {}, [1]), Episode("b", "p", {}, [1])]
    run_episodes(
        episodes,
        FakeEngine(),
        lambda items: [Reply()] * len(items),
        lambda items: crashed_replies(len(items), "rollout-0-env: died"),
        lambda keys: None,
        encode,
        max_turns=3,
        max_tokens=50,
        max_model_len=512,
    )
    assert all(e.finish == "error" and e.error == "crashed: rollout-0-env: died" for e in episodes)


# ---------------------------------------------------------------------------------------------------------------
# the shipped game


def binary_search(env: GuessNumber, turns: int) -> bool:
    low, high = 1, env.high
    for _ in range(turns):
        guess = (low + high) // 2
        result = env.step(str(guess))
        if result.done:
            return True
        if result.observation == ",higher>":
            low = guess + 1
        else:
            high = guess - 1
    return False


def test_guess_number_hints_lead_binary_search_to_every_secret_in_four_turns():
    for secret in range(1, 10):
        env = GuessNumber(high=9)
        assert env.start("Guess(1-9)", secret=secret) == ">"
        assert binary_search(env, 4)
    env = GuessNumber(high=9)
    env.start("", secret=3)
    assert env.step("5") == StepResult(",lower>", 0.0, False, {"won": 0.0})
    assert env.step("x").observation == ",invalid>"
    assert env.step(" 3 ") == StepResult("", 1.0, True, {"won": 1.0})
    with pytest.raises(ValueError):
        GuessNumber(high=9).start("", secret=10)


def test_guess_demo_data_is_what_the_generator_writes_and_fits_the_tiny_tokenizer(tmp_path):
    import json
    from pathlib import Path

    from aha.actors.envs.guess import write_data
    from aha.cluster.models import CHARACTERS

    write_data(tmp_path)  # the defaults and seed that wrote deploy/examples/guess/
    committed = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "guess"
    for name in ("train.jsonl", "eval.jsonl", "demos.jsonl"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
    rows = [json.loads(line) for p in tmp_path.glob("*.jsonl") for line in p.read_text().splitlines()]
    text = "".join(r["prompt"] + r.get("completion", "") for r in rows)
    # the tiny tokenizer (as AutoTokenizer loads it) drops whitespace: the game's text has none
    assert set(text) <= set(CHARACTERS) and not any(c.isspace() for c in text)
    train = {(r["prompt"], r["secret"]) for r in rows if "secret" in r}
    assert {secret for _, secret in train} == set(range(1, 10))


# ---------------------------------------------------------------------------------------------------------------
# rewards and metrics


def episode_trajectory(**kw) -> Trajectory:
    base = dict(
        prompt_id="p",
        sample_index=0,
        prompt="Guess",
        completion="\n5 lower\n3",
        prompt_ids=[1, 2],
        completion_ids=[5, 6, 7],
        logprobs=[-0.1, 0.0, -0.2],
        finish_reason="stop",
        version=0,
        engine="rollout-0",
        completion_mask=[1, 0, 1],
        turns=2,
        env_reward=1.0,
        env_info={"won": 1.0},
    )
    return Trajectory(**{**base, **kw})


def test_scorer_adds_the_environment_reward_and_counts_environment_errors():
    from aha.actors.reward import RewardScorer

    # no functions: the environment's reward alone; a failed episode trains with error_reward
    scorer = RewardScorer(RewardConfig(on_error="reward", error_reward=-1.0))
    ok, broken = episode_trajectory(), episode_trajectory(env_error="timeout: after 10 s", env_reward=0.0)
    scorer.score([ok, broken])
    assert ok.reward == 1.0 and ok.reward_parts == {"environment": 1.0} and ok.reward_error is None
    assert broken.reward == -1.0 and "environment" in broken.reward_error
    assert scorer.errors == {"environment/timeout": 1}
    # with reward functions, the environment's reward is added to theirs
    cfg = RewardConfig(functions=[{"function": "aha.actors.rewards.match:exact_match", "weight": 2.0}])
    scored = RewardScorer(cfg).score([episode_trajectory(env_reward=0.5, fields={"answer": "\n5 lower\n3"})])[
        0
    ]
    assert scored.reward == 2.5 and scored.reward_parts == {"environment": 0.5, "exact_match": 1.0}


def test_mask_length_is_checked():
    with pytest.raises(ValueError, match="mask"):
        episode_trajectory(completion_mask=[1, 0])


def test_environment_metrics():
    from aha.cluster.monitor import environment_metrics

    trajs = [
        episode_trajectory(),
        episode_trajectory(
            turns=4, finish_reason="turns", env_info={"won": 0.0, "tool_calls": 2, "tool_failures": 1}
        ),
        episode_trajectory(
            turns=1, finish_reason="error", env_error="crashed: x", env_info={"tool_calls": 2}
        ),
    ]
    m = environment_metrics(trajs)
    assert m["env/turns_mean"] == pytest.approx(7 / 3) and m["env/errors"] == 1.0
    assert m["env/won"] == 0.5 and m["env/tool_calls"] == 2.0 and m["env/tool_failure_rate"] == 0.25
    assert m["env/finish_stop"] == m["env/finish_turns"] == m["env/finish_error"] == pytest.approx(1 / 3)
    assert environment_metrics([episode_trajectory(completion_mask=None)]) == {}


# ---------------------------------------------------------------------------------------------------------------
# config and validation


def job(**env) -> dict:
    return {
        "model": {"path": "m", "max_model_len": 512},
        "data": {"type": "jsonl", "path": "deploy/examples/guess/train.jsonl"},
        "environment": {"class_path": "aha.actors.envs.guess:GuessNumber", **env},
    }


def test_config_needs_a_reward_or_an_environment_and_bounds_the_episode():
    JobConfig.model_validate(job())  # no reward function: the environment's reward is enough
    with pytest.raises(ValueError, match="no environment"):
        JobConfig.model_validate({"model": {"path": "m"}})
    with pytest.raises(ValueError, match="environment.max_tokens"):
        JobConfig.model_validate(job(max_tokens=512))
    for bad in ("guess", "a b:C", "x.py:1C"):
        with pytest.raises(ValueError):
            EnvironmentConfig(class_path=bad)


def test_validate_checks_the_class_its_kwargs_and_the_fields_start_needs(tmp_path):
    from aha.cluster.preflight import environment_problems, job_demands

    assert environment_problems(JobConfig.model_validate(job(kwargs={"high": 9})), files=True) == []
    (problem,) = environment_problems(JobConfig.model_validate(job(kwargs={"hgih": 9})), files=True)
    assert problem.startswith("environment.kwargs") and "hgih" in problem
    (problem,) = environment_problems(
        JobConfig.model_validate(job(class_path="aha.actors.envs.guess:Nope")), True
    )
    assert problem.startswith("environment.class_path")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Guess 1-9.", "number": 3}\n')
    cfg = JobConfig.model_validate({**job(), "data": {"type": "jsonl", "path": str(data)}})
    (problem,) = environment_problems(cfg, files=True)
    assert "start needs secret" in problem
    demands = {d.names: d for d in job_demands(JobConfig.model_validate(job(cpus_per_actor=0.5)))}
    assert demands["rollout-0..0-env"].each == {"CPU": 0.5}


def test_validate_rejects_a_bad_environment_at_the_cli(tmp_path):
    from aha.cluster.config_file import load_config
    from aha.cluster.preflight import check_references

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(
        "model: {path: m, max_model_len: 512}\ndata: {type: jsonl, path: deploy/examples/guess/train.jsonl}\n"
        "environment: {class_path: 'aha.actors.envs.guess:GuessNumber', kwargs: {size: 3}}\n"
    )
    with pytest.raises(ConfigError, match="environment.kwargs"):
        check_references(load_config(cfg_file), files=False)


# ---------------------------------------------------------------------------------------------------------------
# the learner: environment tokens get no loss and no gradient


def test_environment_tokens_contribute_exactly_zero_gradient():
    from aha.learner.batch import collate, samples_from_trajectories, step_totals
    from aha.learner.config import AlgorithmConfig
    from aha.learner.micro_batch import micro_batch_loss
    from aha.learner.token_stats import token_stats

    traj = episode_trajectory(
        prompt_ids=[1, 2],
        completion_ids=[3, 4, 5, 6, 7],
        logprobs=[-1.0, 0.0, 0.0, -2.0, -1.5],
        completion_mask=[1, 0, 0, 1, 1],
    )
    (sample,) = samples_from_trajectories([traj], [1.0])
    mb = collate([sample], pad_id=0)
    assert mb.loss_mask.tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0, 1.0]]
    totals = step_totals([sample], max_tokens=8)
    assert totals.total_tokens == 3  # model tokens only: the token-mean normaliser
    for algo in (AlgorithmConfig(loss="pg"), AlgorithmConfig(loss="ppo", kl_coef=0.1, entropy_coef=0.01)):
        logits = torch.randn(1, 6, 11, requires_grad=True)
        logprobs, entropy = token_stats(logits, mb.targets, entropy_grad=algo.entropy_coef > 0)
        ref = logprobs.detach() - 0.3
        loss, _ = micro_batch_loss(logprobs, entropy, mb, totals, algo, ref_logprobs=ref)
        loss.backward()
        grad = logits.grad[0].abs().sum(-1)  # (T,)
        assert grad[[0, 2, 3]].eq(0).all()  # prompt and the two environment tokens: exactly zero
        assert grad[[1, 4, 5]].gt(0).all()  # the model's tokens learn


# ---------------------------------------------------------------------------------------------------------------
# the python tool


def test_python_tool_runs_blocks_in_the_sandbox_and_verifies_the_final_answer():
    from aha.actors.envs.python_tool import PythonTool
    from aha.actors.sandbox import isolation_available

    if isolation_available() not in ("namespaces", "rlimits"):
        pytest.skip("no sandbox on this host")
    env = PythonTool(max_calls=2, allow_rlimits_only=True)
    assert env.start("What is 17*23?", answer="391") == ""
    first = env.step("Let me compute.\n```python\nprint(17 * 23)\n```")
    assert first == StepResult(
        "\n```output\n391\n```\n", 0.0, False, {"tool_calls": 1.0, "tool_failures": 0.0}
    )
    failing = env.step("```python\n1/0\n```")
    assert (
        not failing.done
        and "ZeroDivisionError" in failing.observation
        and failing.info["tool_failures"] == 1.0
    )
    assert "no more tool calls" in env.step("```python\nprint(1)\n```").observation  # max_calls spent
    final = env.step("The answer is 391.")
    assert final.done and final.reward == 1.0
    assert final.info == {"tool_calls": 2.0, "tool_failures": 1.0, "correct": 1.0}
    env = PythonTool(allow_rlimits_only=True)
    env.start("q", answer="5")
    assert env.step("It is 4.") == StepResult(
        "", 0.0, True, {"tool_calls": 0.0, "tool_failures": 0.0, "correct": 0.0}
    )


def test_the_learner_normalises_episodes_by_the_episode_length():
    from aha.cluster.driver import learner_sampling

    cfg = JobConfig.model_validate({**job(max_tokens=40), "rollout": {"sampling": {"max_tokens": 1}}})
    sampling = learner_sampling(cfg)
    assert sampling.max_tokens == 40 and sampling.temperature == cfg.rollout.sampling.temperature
    single = JobConfig.model_validate(
        {"model": {"path": "m"}, "reward": {"functions": [{"function": "a:b"}]}}
    )
    assert learner_sampling(single) is single.rollout.sampling
