"""Each distinct prompt of a micro-batch goes through the model once.

Group advantages sample several completions per prompt, so a micro-batch holds each prompt several times. The
plain layout runs every row's whole sequence; the shared layout runs the distinct prompts once with the KV cache
on, then every completion against its own prompt's cached keys and values (an index into the cache, so the
gradient of a prompt's activations is the sum over the completions that read them). Attention sees the same keys
and values at the same positions, so logits, loss and gradient are those of the plain layout up to float
rounding; a group of G samples runs (G - 1) x prompt length fewer tokens forward and backward.

Layout (`collate_shared`): `prompt_ids` (U, P) the distinct prompts, right-padded, with `prompt_mask`;
`prompt_index` (B,) each row's prompt; `input_ids` / `attention_mask` (B, C) the completions, right-padded;
`targets` (B, C) the completion tokens themselves, since target k is predicted by the position before token k:
the prompt's last position for k = 0, completion token k - 1 after it.

Needs the model's KV cache in training, which gradient checkpointing turns off (rejected at validation).
"""

from __future__ import annotations

import torch

from aha.learner.batch import MicroBatch, Sample


def prompt_of(sample: Sample) -> tuple[int, ...]:
    return tuple(sample.tokens[: sample.prompt_len])


def shares_prompts(enabled: bool, samples: list[Sample]) -> bool:
    """Whether a step trains in the shared layout: `learner.share_prompts` is on and it saves something (some
    prompt occurs twice; imitation's distinct demonstrations stay in the plain layout, one pass each)."""
    return enabled and len({prompt_of(s) for s in samples}) < len(samples)


def collate_shared(samples: list[Sample], pad_id: int) -> MicroBatch:
    """Pad a micro-batch into the shared layout (module docstring). The completions are at least 2 wide, so
    `shared_prompt_logits` always runs both passes: under ZeRO-3 every rank must run the same passes (each
    gathers the weights), whatever its micro-batch. An empty list gives one all-padding row (loss 0)."""
    if not samples:
        samples = [Sample([pad_id, pad_id], 1, [0.0], 0.0, mask=[0])]
    index: dict[tuple[int, ...], int] = {}
    for s in samples:
        index.setdefault(prompt_of(s), len(index))
    prompts = list(index)
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for u, p in enumerate(prompts):
        prompt_ids[u, : len(p)] = torch.tensor(p)
        prompt_mask[u, : len(p)] = 1

    b, c = len(samples), max(2, max(len(s.tokens) - s.prompt_len for s in samples))
    completions = torch.full((b, c), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, c), dtype=torch.long)
    loss_mask, behaviour, advantages = torch.zeros((b, c)), torch.zeros((b, c)), torch.zeros((b, c))
    for i, s in enumerate(samples):
        k = len(s.tokens) - s.prompt_len
        if k == 0:
            continue
        completions[i, :k] = torch.tensor(s.tokens[s.prompt_len :])
        attention_mask[i, :k] = 1
        loss_mask[i, :k] = 1.0 if s.mask is None else torch.tensor(s.mask, dtype=torch.float32)
        behaviour[i, :k] = torch.tensor(s.behaviour_logprobs)
        advantages[i, :k] = s.advantage
    return MicroBatch(
        input_ids=completions,
        attention_mask=attention_mask,
        targets=completions.clone(),
        loss_mask=loss_mask,
        behaviour_logprobs=behaviour,
        advantages=advantages,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_index=torch.tensor([index[prompt_of(s)] for s in samples]),
    )


def shared_prompt_logits(model, mb: MicroBatch, device: torch.device) -> torch.Tensor:
    """Logits (B, C, V) that predict `mb.targets`: two forward passes, the distinct prompts (projecting only
    their last positions), then every completion against its prompt's cache, with explicit positions (a
    shorter prompt's padding sits between its last token and its completion, masked out)."""
    prompt_ids, prompt_mask = mb.prompt_ids.to(device), mb.prompt_mask.to(device)
    index = mb.prompt_index.to(device)
    last = prompt_mask.sum(dim=1) - 1  # (U,) each prompt's last position
    keep = torch.unique(last)  # the only positions projected to logits (sorted)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=keep)
    first = out.logits[torch.arange(len(last), device=device), torch.searchsorted(keep, last)]  # (U, V)
    first = first[index].unsqueeze(1)  # (B, 1, V): predicts each completion's first token
    width = mb.input_ids.shape[1]
    cache = out.past_key_values
    cache.batch_select_indices(index)  # (U, ...) -> (B, ...); differentiable indexing
    inputs = mb.input_ids[:, :-1].to(device)  # the last completion token predicts nothing
    positions = (last[index] + 1).unsqueeze(1) + torch.arange(width - 1, device=device)
    mask = torch.cat([prompt_mask[index], mb.attention_mask[:, :-1].to(device)], dim=1)
    rest = model(
        input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )
    return torch.cat([first, rest.logits], dim=1)
