"""LoRA for the learner (peft): a frozen base model plus trainable low-rank adapters.

Only the adapters train. The engines never see them: the weights a sync or an export sends are the base model's
own parameters, under the base model's own names, with every adapter merged in (W + alpha / rank * B A). The
merge makes a new tensor per weight and leaves the model untouched (peft's in-place merge and unmerge would drift
the frozen base by rounding at every sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aha.learner.config import LoraConfig

ADAPTER = "default"
"""peft's name of the one adapter."""


def add_adapters(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap a transformers causal LM in a peft model whose only trainable parameters are the adapters."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if getattr(model, "is_gradient_checkpointing", False):
        # the frozen embeddings' output would not require grad, and checkpointed layers would get no gradient
        model.enable_input_require_grads()
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg, adapter_name=ADAPTER)


def is_adapter(name: str) -> bool:
    """A parameter of an adapter (lora_A / lora_B), not of the base model."""
    return ".lora_" in name


def base_name(name: str) -> str:
    """A base parameter's name as the base model calls it: peft moves a wrapped layer's weight to
    `<layer>.base_layer.weight` (and prefixes `base_model.model.` on the outer model)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@dataclass
class MergedWeight:
    """A base parameter as the engines must see it, computed only when asked (a sync then holds one bucket of
    merged copies at a time). Sized like the base parameter, for bucketing."""

    base: torch.Tensor
    layer: torch.nn.Module | None = None  # the peft LoRA layer whose delta this weight receives

    def numel(self) -> int:
        return self.base.numel()

    def element_size(self) -> int:
        return self.base.element_size()

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        weight = self.base.detach()
        if self.layer is None:
            return weight
        return weight + self.layer.get_delta_weight(ADAPTER).to(weight.dtype)  # a new tensor: base untouched


def merged_parameters(model: torch.nn.Module) -> list[tuple[str, MergedWeight]]:
    """(base model name, merged weight) for every parameter of the base model, in model order; adapters excluded.
    `model` is the peft model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out = []
    for name, param in base.named_parameters():
        if is_adapter(name):
            continue
        owner, _, leaf = name.rpartition(".")
        wrapped = owner.endswith(".base_layer") and leaf == "weight"
        layer = layers.get(owner.removesuffix(".base_layer")) if wrapped else None
        out.append((base_name(name), MergedWeight(param, layer)))
    return out


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer gets: every parameter of a plain model, the adapters of a peft model."""
    return [p for p in model.parameters() if p.requires_grad]
