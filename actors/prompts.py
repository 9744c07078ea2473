"""How a prompt becomes token ids: one function, used by the engines (what they sample from), by imitation (what
the learner trains on) and by the weight-sync probes, so a prompt is the same token sequence everywhere.

Plain prompts are tokenized with the tokenizer's own special tokens (a BOS where the model expects one, as vLLM
does for a text prompt); chat prompts are rendered by the chat template, which writes its own special tokens,
and are then tokenized without adding more (no doubled BOS). With `model.chat_template` a plain prompt is one
user turn; a prompt that is already messages (a chat dataset, a system prompt) needs the template.
"""

from __future__ import annotations

from typing import Any

from aha.actors.records import Prompt


def encode_prompt(tokenizer: Any, prompt: Prompt | str, chat_template: bool) -> list[int]:
    """Token ids of a prompt as the engines see it."""
    if isinstance(prompt, str):
        prompt = Prompt("prompt", prompt)
    if prompt.messages is None and not chat_template:
        return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
    if not chat_template:
        raise ValueError(
            f"prompt {prompt.id} is chat messages but model.chat_template is false: set it to true"
        )
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a demonstrated completion, ended by EOS (what the model must learn to emit)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
