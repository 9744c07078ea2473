"""Each turn of a multi-turn episode keeps its finish reason, so `algorithm.mask_truncated` and `overlong_frac` see
an episode whose turn was cut at max_tokens, though the episode itself ended as the environment said. The engine
under a stand-in for vLLM (no model, no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from aha.actors.config import SamplingConfig
from aha.actors.engine import RolloutWorker
from aha.actors.environment import EnvironmentHost, Episode, Generated, run_episodes
from aha.actors.records import Prompt, Trajectory
from aha.learner.batch import samples_from_trajectories, step_batch
from aha.learner.config import AlgorithmConfig


class TwoTurns:
    """Answers `ok`; done after the second turn, with reward 1."""

    def start(self, prompt: str, **fields) -> str:
        self.turns = 0
        return ""

    def step(self, turn: str):
        self.turns += 1
        return ("ok", float(self.turns == 2), self.turns == 2)


def host() -> EnvironmentHost:
    return EnvironmentHost(f"{__name__}:TwoTurns", {}, timeout_s=5)


def test_each_turn_keeps_its_finish_reason():
    reasons = iter(["length", "stop"])  # the first turn ran into its max_tokens

    def generate(sequences, budgets):
        reason = next(reasons)
        return [Generated([5, 6], [-0.1, -0.2], "ab", reason) for _ in sequences]

    env = host()
    (ep,) = run_episodes(
        [Episode("p/0", "P", {}, [1, 2])],
        generate,
        env.start,
        env.step,
        env.close,
        lambda text: [9] * len(text),
        max_turns=3,
        max_tokens=50,
        max_model_len=512,
    )
    assert ep.finish == "stop" and ep.turn_finish == ["length", "stop"]


def trajectory(finish: str, turns: list[str] | None) -> Trajectory:
    return Trajectory(
        prompt_id="p",
        sample_index=0,
        prompt="P",
        completion="ab ok ab",
        prompt_ids=[1, 2],
        completion_ids=[5, 6, 9, 9, 5, 6],
        logprobs=[-0.1, -0.2, 0.0, 0.0, -0.1, -0.2],
        finish_reason=finish,
        version=0,
        engine="rollout-0",
        completion_mask=None if turns is None else [1, 1, 0, 0, 1, 1],
        turns=0 if turns is None else len(turns),
        turn_finish_reasons=turns,
        reward=1.0,
    )


def test_mask_truncated_leaves_out_an_episode_with_a_cut_turn():
    cut, whole = trajectory("stop", ["length", "stop"]), trajectory("stop", ["stop", "stop"])
    assert cut.truncated and not whole.truncated
    assert trajectory("length", None).truncated and not trajectory("stop", None).truncated  # single turn
    assert samples_from_trajectories([cut, whole], [1.0, -1.0], mask_truncated=True)[0].advantage == -1.0
    assert len(samples_from_trajectories([cut, whole], [1.0, -1.0], mask_truncated=False)) == 2
    other = trajectory("stop", ["stop", "stop"])
    other.reward, other.sample_index = 0.0, 1
    batch = step_batch([[cut, other]], AlgorithmConfig(mask_truncated=True))
    assert batch.overlong_masked == 1 and len(batch.samples) == 1


class FakeLLM:
    """vLLM's `generate` as `_play` reads it: the first turn is cut at its max_tokens, the second stops."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params, use_tqdm=False):
        self.calls += 1
        reason = "length" if self.calls == 1 else "stop"
        outs = []
        for _ in prompts:
            ids = [5, 6]
            logprobs = [{t: SimpleNamespace(logprob=-0.5)} for t in ids]
            sample = SimpleNamespace(token_ids=ids, logprobs=logprobs, text="ab", finish_reason=reason)
            outs.append(SimpleNamespace(outputs=[sample]))
        return outs


def test_the_engine_passes_each_turns_finish_reason_to_the_trajectory():
    engine = RolloutWorker.__new__(RolloutWorker)  # what _play reads
    env = host()
    engine.env = SimpleNamespace(
        cfg=SimpleNamespace(max_turns=3, max_tokens=50), start=env.start, step=env.step, close=env.close
    )
    engine.llm, engine.version, engine.name = FakeLLM(), 0, "rollout-0"
    engine.model_cfg = SimpleNamespace(max_model_len=512, chat_template=False)
    engine.tokenizer = lambda text, add_special_tokens: {"input_ids": [9] * len(text)}
    (traj,) = engine._play([Prompt("p", "P")], SamplingConfig(max_tokens=8), n=1)
    assert traj.finish_reason == "stop" and traj.turn_finish_reasons == ["length", "stop"]
    assert traj.truncated
