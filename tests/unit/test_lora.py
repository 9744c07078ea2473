"""LoRA on one process (no Ray): what the engines receive is the base model's names and shapes with the adapters
merged in, equal to the adapted model's outputs; only adapters train; `aha validate` refuses LoRA with ZeRO-3."""

from __future__ import annotations

import pytest
import torch
import yaml

from aha.cluster.cli import main
from aha.learner.config import LoraConfig
from aha.learner.lora import add_adapters, is_adapter, merged_parameters, trainable_parameters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from aha.cluster.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("lora-tiny"), seed=0)


def load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def moved_adapters(path, cfg: LoraConfig = LoraConfig(rank=4, alpha=8.0)):
    """A peft model whose B matrices are nonzero (peft starts them at 0, i.e. at the base model)."""
    model = add_adapters(load(path), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_merged_weights_have_base_names_and_give_the_adapted_outputs(tiny):
    plain = load(tiny)
    base = dict(plain.named_parameters())
    model = moved_adapters(tiny)
    merged = merged_parameters(model)
    assert [n for n, _ in merged] == list(base)  # the base model's names, in model order
    assert all(w.numel() == base[n].numel() for n, w in merged)
    state = {n: w.value() for n, w in merged}
    changed = [n for n in state if not torch.equal(state[n], base[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed)  # deltas on the adapted layers only
    plain.load_state_dict(state, strict=False)  # a tied head follows the embedding
    ids = torch.tensor([[21, 22, 23, 15, 24, 25, 26, 33]])
    with torch.no_grad():
        adapted, merged_out, untouched = (
            model(input_ids=ids).logits,
            plain(input_ids=ids).logits,
            load(tiny)(input_ids=ids).logits,
        )
    assert (adapted - merged_out).abs().max() < 1e-5
    assert (adapted - untouched).abs().max() > 1e-3  # the adapters matter: skipping the merge would show


def test_merging_leaves_the_frozen_base_untouched(tiny):
    model = moved_adapters(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _, w in merged_parameters(model):
        w.value()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_adapters_train(tiny, checkpointing):
    plain = load(tiny)
    if checkpointing:
        plain.gradient_checkpointing_enable()
    model = add_adapters(plain, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    trainable = trainable_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert trainable and all(is_adapter(names[id(p)]) for p in trainable)
    assert {names[id(p)].split(".")[-4] for p in trainable} == {"q_proj", "v_proj"}
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters()) / 10
    model.train()
    ids = torch.tensor([[21, 22, 23, 15, 24]])
    model(input_ids=ids, labels=ids).loss.backward()
    # B starts at 0, so A gets no gradient yet; B must (with checkpointing too: inputs require grad)
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n
    )
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


MINIMAL = {
    "model": {"path": "models/x"},
    "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
}


def validate(tmp_path, *overrides: str) -> int:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    return main(["validate", "--no-check-files", str(path), *overrides])


def test_validate_accepts_lora_with_zero_0_to_2_and_refuses_zero3(tmp_path, capsys):
    for stage in (0, 1, 2):
        assert validate(tmp_path, "learner.lora.rank=4", f"learner.zero_stage={stage}") == 0
    assert "rank: 4" in capsys.readouterr().out
    assert validate(tmp_path, "learner.lora.rank=4", "learner.zero_stage=3") == 2
    err = capsys.readouterr().err
    assert "learner.lora with learner.zero_stage 3" in err and "Traceback" not in err
    assert validate(tmp_path, "learner.zero_stage=3") == 0  # without LoRA, ZeRO-3 is fine
    assert validate(tmp_path, "learner.lora.target_modules=[]") == 2
    assert "learner.lora.target_modules" in capsys.readouterr().err
