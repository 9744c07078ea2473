"""Prompt sources: deterministic by index, held-out split disjoint from training, demonstrations correct."""

from __future__ import annotations

import json

from aha.cluster.config import AdditionData, JsonlData, ReasoningGymData
from aha.cluster.data import AdditionSource, make_source


def test_addition_is_deterministic_disjoint_and_correct():
    src = AdditionSource(AdditionData(digits=3, seed=1, eval_size=50))
    assert src.train_prompt(17) == AdditionSource(AdditionData(digits=3, seed=1, eval_size=50)).train_prompt(
        17
    )
    held_out = {p.text for p in src.eval_prompts()}
    assert len(held_out) == 50
    assert not held_out & {p.text for p in src.train_prompts(0, 2000)}
    p = src.train_prompt(3)
    a, b = p.fields["a"], p.fields["b"]
    assert p.text == f"{a}+{b}=" and p.fields["answer"][::-1] == str(a + b).zfill(4)
    assert src.demonstrations(2)[0] == (src.train_prompt(0), src.train_prompt(0).fields["answer"])


def test_jsonl_epochs_reshuffle_and_ids_stay_unique(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"Q{i}", "answer": str(i)}) + "\n" for i in range(5))
    )
    src = make_source(JsonlData(path=str(path), seed=0))
    first, second = src.train_prompts(0, 5), src.train_prompts(5, 5)
    assert sorted(p.text for p in first) == sorted(p.text for p in second) == [f"Q{i}" for i in range(5)]
    assert len({p.id for p in first + second}) == 10
    assert first[0].fields["answer"] == first[0].text[1:]


def test_reasoning_gym_training_never_shows_a_held_out_problem():
    # one-digit a +/- b: ~200 distinct problems, so two seeds overlap a lot
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    cfg = ReasoningGymData(task="chain_sum", task_kwargs=kwargs, size=300, eval_size=60, seed=0)
    source = make_source(cfg)
    held_out = {p.fields["entry"]["question"] for p in source.eval_prompts()}
    train = [source.train_prompt(i).fields["entry"]["question"] for i in range(300)]
    import reasoning_gym

    raw = reasoning_gym.create_dataset("chain_sum", size=300, seed=0, **kwargs)
    assert any(raw[i]["question"] in held_out for i in range(300))  # the overlap this guards against
    assert not held_out & set(train)
    assert len(set(train)) > 100


def test_reasoning_gym_eval_seed_keeps_the_held_out_set_across_data_seeds():
    import pytest

    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}

    def source(**seeds):
        return make_source(
            ReasoningGymData(task="chain_sum", task_kwargs=kwargs, size=50, eval_size=20, **seeds)
        )

    def questions(prompts):
        return [p.fields["entry"]["question"] for p in prompts]

    default_0, default_1 = source(seed=0), source(seed=1)
    fixed_0, fixed_1 = source(seed=0, eval_seed=1_000_003), source(seed=1, eval_seed=1_000_003)
    assert questions(default_0.eval_prompts()) != questions(default_1.eval_prompts())  # follows data.seed
    assert questions(fixed_0.eval_prompts()) == questions(fixed_1.eval_prompts())  # data.eval_seed holds it
    assert questions(fixed_0.eval_prompts()) == questions(default_0.eval_prompts())  # 0 + 1,000,003
    assert questions(fixed_0.train_prompts(0, 10)) != questions(fixed_1.train_prompts(0, 10))
    with pytest.raises(ValueError, match="data.eval_seed 4 equals data.seed"):
        ReasoningGymData(task="chain_sum", seed=4, eval_seed=4)
