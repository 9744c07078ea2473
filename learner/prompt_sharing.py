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

The caches are idempotent, so the layout also works under gradient checkpointing, whose backward pass runs each
layer's forward again: the prompt pass's cache keeps the keys and values of its layer's latest run (a rerun
replaces them with equal ones), and the completion pass's cache returns the prompt's keys and values joined with
the completion's own without keeping them (a rerun reads the same). transformers drops the cache of a checkpointed
layer unless the layer is marked as reading it (`read_cache_under_checkpointing`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

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
    capture = Cache(layer_class_to_replicate=_CaptureLayer)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        past_key_values=capture,
        use_cache=False,  # the caches are passed and kept here
        logits_to_keep=keep,
    )
    first = out.logits[torch.arange(len(last), device=device), torch.searchsorted(keep, last)]  # (U, V)
    first = first[index].unsqueeze(1)  # (B, 1, V): predicts each completion's first token
    width = mb.input_ids.shape[1]
    # each row's prompt, (U, ...) -> (B, ...): differentiable indexing
    prefix = Cache(layers=[_PrefixLayer(layer.keys[index], layer.values[index]) for layer in capture.layers])
    inputs = mb.input_ids[:, :-1].to(device)  # the last completion token predicts nothing
    positions = (last[index] + 1).unsqueeze(1) + torch.arange(width - 1, device=device)
    mask = torch.cat([prompt_mask[index], mb.attention_mask[:, :-1].to(device)], dim=1)
    rest = model(
        input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=prefix, use_cache=False
    )
    return torch.cat([first, rest.logits], dim=1)


class _CaptureLayer(DynamicLayer):
    """The keys and values of its layer's latest run, replaced (not appended) when the layer runs again."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """A fixed prefix: each run gets the prefix joined with its own keys and values, which are not kept."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_cache_under_checkpointing(model: torch.nn.Module) -> None:
    """Let the model's checkpointed layers keep the cache they are given (transformers drops it otherwise, as a
    cache that appends would be appended to twice): the shared layout's caches are idempotent."""
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
