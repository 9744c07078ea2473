"""`data.type: hf`: prompts from local parquet and jsonl files through `datasets`, as text or chat messages, with
columns mapped to reward fields, a held-out split that is never trained on, and over-long prompts left out."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from aha.actors.prompts import encode_prompt
from aha.cluster.config import HFData, JobConfig
from aha.cluster.data import drop_long_prompts, make_source, read_demonstrations
from aha.cluster.models import build_char_tokenizer

GSM = [
    {"question": f"What is {i} + {i}?", "answer": f"{i} and {i}.\n#### {2 * i}", "level": i % 3}
    for i in range(40)
]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def changed(cfg: HFData, update: dict) -> HFData:
    """`cfg` with some fields replaced, validated again (model_copy does not validate)."""
    return HFData.model_validate({**cfg.model_dump(), **update})


def job(data: dict, **model) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "hf",
            "model": {"path": "m", "max_model_len": 64, **model},
            "data": {"type": "hf", **data},
            "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
            "rollout": {"sampling": {"max_tokens": 8}, "eval_sampling": {"max_tokens": 8}},
        }
    )


def test_parquet_with_a_template_and_mapped_columns(tmp_path):
    cfg = HFData(
        path=write_parquet(tmp_path / "gsm.parquet", GSM),
        prompt_template="Q: {question}\nA:",
        columns={"fields": {"solution": "answer"}},
        eval_size=10,
        seed=3,
    )
    src = make_source(cfg)
    p = src.train_prompt(0)
    assert p.text.startswith("Q: What is ") and p.text.endswith("\nA:") and p.messages is None and not p.chat
    assert set(p.fields) == {"solution"} and p.fields["solution"].startswith(p.text[11:].split(" ")[0])
    held_out = {q.text for q in src.eval_prompts()}
    trained = {src.train_prompt(i).text for i in range(200)}  # several epochs
    assert len(held_out) == 10 and len(trained) == 30 and not held_out & trained
    assert src.train_prompt(5) == make_source(cfg).train_prompt(5)  # index -> prompt is a pure function
    other = {q.text for q in make_source(changed(cfg, {"seed": 4})).eval_prompts()}
    assert other != held_out  # the seed chooses the held-out rows


def test_jsonl_messages_with_a_system_prompt_go_through_the_chat_template(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{i}+{i}="},
                {"role": "assistant", "content": str(2 * i)},
            ],
            "answer": str(2 * i),
        }
        for i in range(6)
    ]
    cfg = HFData(
        path=write_jsonl(tmp_path / "chat.jsonl", rows), columns={"prompt": "messages"}, system_prompt="Add."
    )
    src = make_source(cfg)
    p = src.train_prompt(0)
    # the final assistant turn is the demonstration, not part of the prompt
    assert [m["role"] for m in p.messages] == ["system", "user"] and p.messages[0]["content"] == "Add."
    assert p.chat  # the data gave messages: batched reward functions get them as TRL gives them
    assert p.text == p.messages[1]["content"] and p.fields == {
        "answer": p.text.split("+")[0] and p.fields["answer"]
    }
    tok = build_char_tokenizer(128)
    assert (
        tok.decode(encode_prompt(tok, p, chat_template=True)) == f"system: Add.\nuser: {p.text}\nassistant: "
    )
    with pytest.raises(ValueError, match="chat_template is false"):
        encode_prompt(tok, p, chat_template=False)
    prompt, completion = src.demonstrations(1)[0]
    assert completion == str(2 * int(prompt.text.split("+")[0])) and prompt.messages[-1]["role"] == "user"


def test_prompt_completion_columns_make_demonstrations(tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    src = make_source(HFData(path=write_parquet(tmp_path / "sft.parquet", rows)))
    demos = src.demonstrations(7)  # wraps around
    assert len(demos) == 7 and all(c == str(int(p.text[:-3]) + 1) for p, c in demos)
    assert "completion" not in src.train_prompt(0).fields  # a demonstration is not a reward field


def test_splits_from_data_files_and_missing_columns_name_the_field(tmp_path):
    files = {
        "train": write_parquet(tmp_path / "a.parquet", GSM[:30]),
        "test": write_parquet(tmp_path / "b.parquet", GSM[30:]),
    }
    cfg = HFData(path="parquet", data_files=files, eval_split="test", columns={"prompt": "question"})
    src = make_source(cfg)
    assert len(src.eval_prompts()) == 10 and src.eval_prompts()[0].text == GSM[30]["question"]
    assert len(make_source(changed(cfg, {"eval_size": 4})).eval_prompts()) == 4
    with pytest.raises(ValueError, match=r"data.columns.prompt: no column 'prompt'"):
        make_source(changed(cfg, {"columns": {"prompt": "prompt"}}))
    with pytest.raises(ValueError, match=r"data.columns.fields.gold: no column 'gold'"):
        make_source(HFData(path=files["train"], columns={"prompt": "question", "fields": {"gold": "gold"}}))
    with pytest.raises(ValueError, match=r"data.prompt_template \{query\}: no column 'query'"):
        make_source(HFData(path=files["train"], prompt_template="{query}"))
    with pytest.raises(ValueError, match="data.path .*split 'validation'"):
        make_source(changed(cfg, {"eval_split": "validation"}))
    with pytest.raises(ValueError, match="eval_split 'train' is also data.split"):
        HFData(path=files["train"], eval_split="train")


def test_over_long_prompts_are_left_out_and_counted_never_cut(tmp_path):
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (10, 50, 56, 57, 80)] * 2
    cfg = job({"path": write_jsonl(tmp_path / "long.jsonl", rows), "eval_size": 2, "seed": 1})
    src = make_source(cfg.data)
    tok = build_char_tokenizer(128)
    dropped = drop_long_prompts(src, cfg, tok)  # room: 64 - 8 = 56 characters
    kept = {len(src.train_prompt(i).text) for i in range(50)} | {len(p.text) for p in src.eval_prompts()}
    assert kept <= {10, 50, 56} and dropped["train"] + dropped["eval"] == 4
    with pytest.raises(ValueError, match="all .* training prompts are too long"):
        drop_long_prompts(make_source(cfg.data), job(cfg.data.model_dump(), max_model_len=16), tok)


def test_system_prompt_needs_the_chat_template(tmp_path):
    with pytest.raises(ValidationError, match="data.system_prompt needs model.chat_template"):
        job({"path": "x.parquet", "system_prompt": "Be brief."})
    assert job({"path": "x.parquet", "system_prompt": "Be brief."}, chat_template=True).data.system_prompt


def test_demonstration_files_take_messages(tmp_path):
    path = write_jsonl(
        tmp_path / "demos.jsonl",
        [
            {"prompt": "1+1=", "completion": "2"},
            {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]},
            {
                "prompt": [{"role": "user", "content": "3+3="}],
                "completion": [{"role": "assistant", "content": "6"}],
            },
        ],
    )
    demos = read_demonstrations(path, system_prompt="Add.")
    assert [c for _, c in demos] == ["2", "4", "6"]
    assert all(p.messages[0] == {"role": "system", "content": "Add."} for p, _ in demos)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match="bad.jsonl:1: a demonstration needs"):
        read_demonstrations(bad)


def test_preflight_reads_the_dataset_and_checks_reward_fields_against_its_columns(tmp_path):
    from aha.cluster.preflight import prompt_fields, reference_problems

    path = write_parquet(tmp_path / "gsm.parquet", GSM)
    cfg = job({"path": path, "columns": {"prompt": "question"}})
    assert prompt_fields(cfg, files=True) == {"answer", "level"}
    mapped = job({"path": path, "columns": {"prompt": "question", "fields": {"solution": "answer"}}})
    assert prompt_fields(mapped, files=False) == {"solution"}
    # exact_match needs an `answer` field: the mapping renamed it away, which the checks see before any actor
    assert any("answer" in p for p in reference_problems(mapped, files=False))
    missing = job({"path": path, "columns": {"prompt": "text"}})
    assert any(p.startswith("data.columns.prompt: no column 'text'") for p in reference_problems(missing))


def test_one_local_file_refuses_settings_that_cannot_apply_to_it(tmp_path):
    path = write_parquet(tmp_path / "one.parquet", GSM)
    for key, value in (("name", "main"), ("revision", "v1"), ("data_files", "other.parquet")):
        with pytest.raises(ValueError, match=f"data.{key} is set, but data.path .* is one local file"):
            make_source(HFData(path=path, columns={"prompt": "question"}, **{key: value}))
