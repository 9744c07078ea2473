"""Environments: multi-turn episodes played by the rollout engines (docs/environments.md).

The protocol is a small class the user writes, named `module:Class` or `path/to/file.py:Class` in the job's
`environment.class_path`. One instance per episode, built with `environment.kwargs`:

    class MyEnv:
        def __init__(self, **kwargs): ...
        def start(self, prompt: str, **fields) -> str:            # the first observation ("" for none)
        def step(self, turn: str) -> (observation, reward, done)  # or a StepResult (adds `info`)

An episode in the engine (`run_episodes`): the prompt's tokens, then the first observation's; then turn after turn
the model generates, the environment answers, and the answer's tokens are appended to the same sequence, until
the environment says done, `environment.max_turns` model turns were taken, or `environment.max_tokens` tokens
follow the prompt. The turn loop is batched: one generate call per turn over every live episode of the chunk.

Environments run in their own Ray actor next to each engine (`EnvironmentHost`, named `rollout-<i>-env`), so
one that hangs or kills its process cannot take the engine along: each call has `environment.timeout_s`; an
episode whose call raises, hangs or returns something malformed ends with an error (the reward pool fails it as
`reward.on_error` says, and counts it as `environment/<kind>`). A host process that dies ends the episodes of
that call with an error and is replaced at the next call.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aha.actors.user_code import CallTimeout, TimedCaller, describe, load_function

# ---------------------------------------------------------------------------------------------------------------
# the protocol


@dataclass
class StepResult:
    """What an environment's `step` may return (a plain `(observation, reward, done)` tuple also works).
    `info`: numbers to report with the episode (e.g. `won`, `tool_calls`, `tool_failures`); the last step's
    values are kept."""

    observation: str = ""
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


class Environment:
    """Optional base class: subclass it, or write any class with the same two methods."""

    def start(self, prompt: str, **fields: Any) -> str:
        """Begin an episode for a prompt (its `fields` are the data row's other keys); return the first
        observation, appended after the prompt ("" appends nothing)."""
        return ""

    def step(self, turn: str) -> StepResult | tuple[str, float, bool]:
        """The model's turn (its text); return the next observation, this turn's reward and whether the
        episode is over."""
        raise NotImplementedError


def load_environment(spec: str, base_dir: str | None = None) -> type:
    """The class named by `module:Class` or `path/to/file.py:Class`; raises naming what is wrong."""
    cls = load_function(spec, base_dir, what="environment")
    if not inspect.isclass(cls):
        raise ValueError(f"environment {spec!r}: {cls!r} is not a class")
    missing = [m for m in ("start", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"environment {spec!r}: the class has no {' or '.join(missing)} method")
    return cls


@dataclass
class Reply:
    """The environment's answer for one episode, as it crosses from the host actor to the engine."""

    observation: str = ""
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the call failed: the episode is over
    kind: str = "exception"  # of the failure: exception | timeout | bad_value | crashed


class Malformed(ValueError):
    """An environment returned something that is not an observation, a finite reward and a done flag."""


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise Malformed(f"{what} must be a finite number, got {value!r}")
    return float(value)


def as_reply(out: Any) -> Reply:
    """A step's return value as a Reply; raises Malformed for a malformed one."""
    if isinstance(out, StepResult):
        observation, reward, done, info = out.observation, out.reward, out.done, out.info
    elif isinstance(out, tuple) and len(out) in (3, 4):
        observation, reward, done, *rest = out
        info = rest[0] if rest else {}
    else:
        raise Malformed(
            f"step returned {type(out).__name__}, not (observation, reward, done) or a StepResult"
        )
    if not isinstance(observation, str):
        raise Malformed(f"the observation must be a str, got {type(observation).__name__}")
    if not isinstance(info, dict):
        raise Malformed(f"info must be a dict, got {type(info).__name__}")
    numbers_ = {str(k): _finite(v, f"info[{k!r}]") for k, v in info.items()}
    return Reply(observation, _finite(reward, "the reward"), bool(done), numbers_)


# ---------------------------------------------------------------------------------------------------------------
# the host actor


class EnvironmentHost:
    """Holds the live episodes of one engine, one environment instance each. A plain class: the engine wraps
    it in a Ray actor. Every call of user code runs under `timeout_s` (a hung call is abandoned on its thread)."""

    def __init__(
        self, class_path: str, kwargs: dict[str, Any], timeout_s: float, base_dir: str | None = None
    ):
        self.cls = load_environment(class_path, base_dir)
        self.kwargs = dict(kwargs)
        self.timeout_s = timeout_s
        self.episodes: dict[str, Any] = {}
        self._call = TimedCaller("environment-call")

    def ping(self) -> str:
        return "ok"

    def _guarded(self, key: str, fn: Callable[[], Any]) -> Reply:
        try:
            return fn()
        except CallTimeout:
            self.episodes.pop(key, None)
            return Reply(done=True, error=f"timeout after {self.timeout_s:g} s", kind="timeout")
        except Malformed as e:
            self.episodes.pop(key, None)
            return Reply(done=True, error=str(e), kind="bad_value")
        except BaseException as e:  # noqa: BLE001 - user code: any error ends only its episode
            self.episodes.pop(key, None)
            return Reply(done=True, error=describe(e), kind="exception")

    def start(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[Reply]:
        """Begin one episode per (key, prompt, fields); the reply's observation is the first one."""
        return [
            self._guarded(key, lambda k=key, p=prompt, f=fields: self._start(k, p, f))
            for key, prompt, fields in items
        ]

    def _start(self, key: str, prompt: str, fields: dict[str, Any]) -> Reply:
        deadline = time.monotonic() + self.timeout_s
        env = self._call(self.cls, (), self.kwargs, self.timeout_s)
        remaining = max(deadline - time.monotonic(), 1e-3)
        observation = self._call(env.start, (prompt,), dict(fields), remaining)
        if not isinstance(observation, str):
            raise Malformed(f"start returned {type(observation).__name__}, not a str")
        self.episodes[key] = env
        return Reply(observation=observation)

    def step(self, items: list[tuple[str, str]]) -> list[Reply]:
        """One turn of each (key, model text); a done episode is forgotten."""
        return [self._guarded(key, lambda k=key, t=text: self._step(k, t)) for key, text in items]

    def _step(self, key: str, text: str) -> Reply:
        env = self.episodes[key]
        reply = as_reply(self._call(env.step, (text,), {}, self.timeout_s))
        if reply.done:
            del self.episodes[key]
        return reply

    def close(self, keys: list[str]) -> None:
        """Forget episodes the engine ended (turn or token limit)."""
        for key in keys:
            self.episodes.pop(key, None)


# ---------------------------------------------------------------------------------------------------------------
# the turn loop


@dataclass
class Episode:
    """One episode's sequence as it grows. `ids`, `mask` and `logprobs` cover the tokens after the prompt."""

    key: str
    prompt: str
    fields: dict[str, Any]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    # each model turn's finish: stop | length (cut at its max_tokens)
    turn_finish: list[str] = field(default_factory=list)
    finish: str | None = None  # stop (the environment said done) | turns | length | error
    error: str | None = None  # "<kind>: <message>", kind one of Reply.kind's
    info: dict[str, float] = field(default_factory=dict)

    def end(self, finish: str, error: str | None = None) -> None:
        self.finish, self.error = finish, error


@dataclass
class Generated:
    """One model turn from the engine."""

    ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"  # stop (EOS or a stop string) | length (cut at its max_tokens)


def run_episodes(
    episodes: list[Episode],
    generate: Callable[[list[list[int]], list[int]], list[Generated]],
    start: Callable[[list[tuple[str, str, dict[str, Any]]]], list[Reply]],
    step: Callable[[list[tuple[str, str]]], list[Reply]],
    close: Callable[[list[str]], None],
    encode: Callable[[str], list[int]],
    *,
    max_turns: int,
    max_tokens: int,
    max_model_len: int,
) -> list[Episode]:
    """Play every episode to its end; one `generate` call and one `step` call per turn over all live ones.

    `generate(sequences, max_new_tokens)` samples one turn per sequence; `encode` tokenizes an observation.
    Token budget of an episode: `max_tokens` after the prompt, and never past `max_model_len` in all."""
    for ep, reply in zip(episodes, start([(e.key, e.prompt, e.fields) for e in episodes]), strict=True):
        if reply.error is not None:
            ep.end("error", f"{reply.kind}: start: {reply.error}")
            continue
        ep.prompt_ids = ep.prompt_ids + encode(reply.observation)
        ep.text.append(reply.observation)
        if _budget(ep, max_tokens, max_model_len) <= 0:
            ep.end("length")
    live = [e for e in episodes if e.finish is None]
    while live:
        outs = generate(
            [e.prompt_ids + e.ids for e in live], [_budget(e, max_tokens, max_model_len) for e in live]
        )
        for ep, out in zip(live, outs, strict=True):
            ep.ids += out.ids
            ep.mask += [1] * len(out.ids)
            ep.logprobs += out.logprobs
            ep.text.append(out.text)
            ep.turns += 1
            ep.turn_finish.append(out.finish_reason)
        replies = step([(e.key, e.text[-1]) for e in live])
        ended_here = []
        for ep, reply in zip(live, replies, strict=True):
            if reply.error is not None:
                ep.end("error", f"{reply.kind}: {reply.error}")
                continue
            ep.reward += reply.reward
            ep.info.update(reply.info)
            if reply.done:
                ep.end("stop")
                continue
            observation = encode(reply.observation)
            if ep.turns >= max_turns:
                ep.end("turns")
            elif len(observation) >= _budget(ep, max_tokens, max_model_len):
                ep.end("length")  # no room for the observation and a model token after it
            else:
                ep.ids += observation
                ep.mask += [0] * len(observation)
                ep.logprobs += [0.0] * len(observation)
                ep.text.append(reply.observation)
                continue
            ended_here.append(ep.key)
        if ended_here:
            close(ended_here)
        live = [e for e in live if e.finish is None]
    return episodes


def _budget(ep: Episode, max_tokens: int, max_model_len: int) -> int:
    """Tokens this episode may still add."""
    return min(max_tokens - len(ep.ids), max_model_len - len(ep.prompt_ids) - len(ep.ids))


def crashed_replies(count: int, reason: str) -> list[Reply]:
    """The answer for every episode of a call whose host actor died or stopped answering."""
    return [Reply(done=True, error=reason, kind="crashed") for _ in range(count)]
