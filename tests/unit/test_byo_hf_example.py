"""deploy/examples/byo_hf.yaml, fast parts: its Parquet files are what its script writes, it validates with the
files it names, and its TRL-style reward file scores GSM8K-format answers (the run itself:
tests/integration/test_byo_hf.py, slow)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq

from aha.cluster.config_file import load_config
from aha.cluster.preflight import reward_problems

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "byo_hf.yaml"
FOLDER = ROOT / "deploy" / "examples" / "byo_hf"


def test_the_committed_data_is_what_the_script_writes(tmp_path):
    sys.path.insert(0, str(FOLDER))
    try:
        import make_data
    finally:
        sys.path.remove(str(FOLDER))
    make_data.write(tmp_path)
    for split in ("train", "test"):
        assert pq.read_table(tmp_path / f"{split}.parquet").equals(pq.read_table(FOLDER / f"{split}.parquet"))
    train = {r["question"] for r in pq.read_table(FOLDER / "train.parquet").to_pylist()}
    test = pq.read_table(FOLDER / "test.parquet").to_pylist()
    assert not train & {r["question"] for r in test}  # held out means never trained on
    assert all(r["answer"].split("\n#### ")[1].lstrip("-").isdigit() for r in test)


def test_the_example_validates_and_its_reward_functions_are_batched(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(EXAMPLE, [])
    assert cfg.data.type == "hf" and cfg.model.chat_template and cfg.data.system_prompt
    assert reward_problems(cfg, files=True) == []


def test_the_reward_file_scores_gsm8k_answers_on_a_worker_thread():
    sys.path.insert(0, str(FOLDER))
    try:
        import rewards
    finally:
        sys.path.remove(str(FOLDER))
    completions = ["7 + 18 = 25. 25 - 7 = 18.\n#### 18", "#### 18.0", "I think 18", "#### 17"]
    answer = ["...\n#### 18"] * 4
    out: list = []
    worker = threading.Thread(target=lambda: out.append(rewards.correctness(["q"] * 4, completions, answer)))
    worker.start()
    worker.join()  # math-verify's signal timeout would fail here, off the main thread
    assert out == [[1.0, 1.0, 0.0, 0.0]]
    assert rewards.correctness(["q"], ["#### 3"], ["no final answer"]) == [None]  # cannot be scored
    assert rewards.format_reward(completions) == [1.0, 1.0, 0.0, 1.0]
