"""Logprobs of the targets and entropy at each position, from logits, with memory bounded by a chunk size.

The logits of a micro-batch are (B, T, V): at V = 152k, 8 sequences of 4k tokens are 5 billion numbers. Their
log-softmax in float32 (and its exp, for the entropy) would each be as large again, and autograd would keep them
for the backward pass. Here the positions go through in chunks of at most `chunk_elements` logits: each chunk is
processed (temperature, top-k, top-p), log-softmaxed and reduced to its two (B, T) numbers in float32, under
activation checkpointing, so the backward pass recomputes one chunk at a time and only the model's own logits
stay whole. The values and gradients are those of the one-shot computation (every number is a row of its own).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 26
"""Logits processed at once: 64M float32 numbers, 256 MB per intermediate (a few hundred positions at V ~ 150k)."""


def _stats(logits: Tensor, tokens: Tensor, process: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(N, V), (N,) -> logprob of each token (N,) and entropy (N,), in float32."""
    logp = torch.log_softmax(process(logits).float(), dim=-1)  # (N, V)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N,)
    entropy = -(logp.exp() * logp).sum(-1)  # (N,); a masked logit (-1e9) has p = 0 and adds -0
    return chosen, entropy


def token_stats(
    logits: Tensor,
    tokens: Tensor,
    process: Callable[[Tensor], Tensor] = lambda x: x,
    entropy_grad: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Logprobs (B, T) of `tokens` (B, T) under log_softmax(process(logits)) (B, T, V), and the entropy (B, T) of
    that distribution, both float32. `logits[:, t]` predicts `tokens[:, t]`. The entropy carries a gradient only
    with `entropy_grad` (an entropy bonus); otherwise it is a metric."""
    shape, vocab = tokens.shape, logits.shape[-1]
    if tokens.numel() == 0:
        empty = torch.zeros(shape, dtype=torch.float32, device=logits.device)
        return empty, empty.clone()
    flat, targets = logits.reshape(-1, vocab), tokens.reshape(-1)  # (N, V), (N,)
    rows = max(1, chunk_elements // vocab)
    # one chunk needs no checkpointing: its float32 intermediates are within the budget already
    recompute = torch.is_grad_enabled() and logits.requires_grad and flat.shape[0] > rows
    chosen, entropy = [], []
    for start in range(0, flat.shape[0], rows):
        part, part_targets = flat[start : start + rows], targets[start : start + rows]
        if recompute:
            c, e = checkpoint(_stats, part, part_targets, process, use_reentrant=False)
        else:
            c, e = _stats(part, part_targets, process)
        chosen.append(c)
        entropy.append(e if entropy_grad else e.detach())
    return torch.cat(chosen).reshape(shape), torch.cat(entropy).reshape(shape)
