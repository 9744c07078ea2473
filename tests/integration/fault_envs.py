"""Environments for the multi-turn integration tests (tests/integration/test_environment.py)."""

from __future__ import annotations

import os
import time
from typing import Any


class TalkBack:
    """Answers each turn with a multi-token observation (no whitespace: the tiny tokenizer drops it); never done (episodes end at the turn limit). A prompt's
    `fault` field makes a step misbehave: "exit" kills the environment's process, "hang" sleeps past any timeout,
    "raise" raises."""

    def start(self, prompt: str, *, fault: str = "", **_: Any) -> str:
        self.fault = fault
        return "ok:"

    def step(self, turn: str):
        if self.fault == "exit":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(60)
        if self.fault == "raise":
            raise RuntimeError("environment bug")
        return (f"[{len(turn)}chars]next:", 0.25, False)
