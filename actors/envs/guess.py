"""A game with feedback: guess a secret number from 1 to `high`, told "higher" or "lower" after each guess.

A policy that ignores the hints wins only by luck (about `max_turns / high` with distinct guesses); one that
reads them wins every episode within ceil(log2(high + 1)) turns (binary search). The secret comes from the
prompt's `secret` field, so every sample of a prompt plays the same game (what group advantages compare) and a
held-out set is a fixed list of games.

Text, character by character (it fits the tiny demo model's tokenizer): the prompt, then per turn the model's
guess and the hint, e.g. `Guess 1-9.\\n5 lower\\n2 higher\\n3` (won on the third guess).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from aha.actors.environment import Environment, StepResult


class GuessNumber(Environment):
    """reward 1.0 when the guess is the secret (the episode ends there), else 0; info `won` is 1 or 0."""

    def __init__(self, high: int = 9):
        if high < 2:
            raise ValueError(f"high must be at least 2, got {high}")
        self.high = high
        self.secret = 0

    def start(self, prompt: str, *, secret: int, **_: Any) -> str:
        if not 1 <= int(secret) <= self.high:
            raise ValueError(f"secret {secret} is outside 1..{self.high}")
        self.secret = int(secret)
        return ">"

    def step(self, turn: str) -> StepResult:
        text = turn.strip()
        guess = int(text) if text.isdigit() else None
        if guess == self.secret:
            return StepResult("", 1.0, True, {"won": 1.0})
        if guess is None or not 1 <= guess <= self.high:
            hint = ",invalid>"
        else:
            hint = ",higher>" if guess < self.secret else ",lower>"
        return StepResult(hint, 0.0, False, {"won": 0.0})


def prompt_text(high: int) -> str:
    return f"Guess(1-{high})"


def write_data(
    folder: str | Path,
    *,
    high: int = 9,
    train: int = 2000,
    eval_: int = 200,
    demos: int = 2000,
    turns: int = 4,
    seed: int = 0,
) -> None:
    """The demo's files: train.jsonl and eval.jsonl (prompt + secret) and demos.jsonl, transcripts of a player who
    guesses at random (a valid guess every turn, hints ignored): imitation teaches the format, not the game."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, prefix in (("train", train, "g"), ("eval", eval_, "e")):
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(count):
                row = {"id": f"{prefix}{i}", "prompt": prompt_text(high), "secret": rng.randint(1, high)}
                f.write(json.dumps(row) + "\n")
    with (folder / "demos.jsonl").open("w") as f:
        for _ in range(demos):
            secret, env = rng.randint(1, high), GuessNumber(high)
            pieces = [env.start(prompt_text(high), secret=secret)]
            for _turn in range(turns):
                guess = str(rng.randint(1, high))
                result = env.step(guess)
                pieces += [guess, result.observation]
                if result.done:
                    break
            completion = "".join(pieces[:-1])  # ends with the last guess
            f.write(json.dumps({"prompt": prompt_text(high), "completion": completion}) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the guessing game's demo data files.")
    parser.add_argument("folder")
    parser.add_argument("--high", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_data(args.folder, high=args.high, seed=args.seed)
