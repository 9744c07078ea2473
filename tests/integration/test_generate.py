"""`aha generate` on the tiny model with the real engines and reward actors: the dataset's fields, the filter, pass@k,
a run killed with SIGKILL and resumed, and an SFT run of `aha run` that imitates the generated file."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from aha.cluster.config_file import load_config
from aha.cluster.generate import FIELDS, text_key

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"

# Rewards a random model earns about half the time, as a pure function of the completion.
REWARDS = """
import time


def even_checksum(prompt, completion, **fields):
    return 1.0 if sum(map(ord, completion)) % 2 == 0 else 0.0


def slow_even_checksum(prompt, completion, **fields):
    time.sleep(0.05)  # slow enough that a round takes about a second, so the kill lands mid-run
    return even_checksum(prompt, completion)
"""


def even_checksum(completion: str) -> float:
    return 1.0 if sum(map(ord, completion)) % 2 == 0 else 0.0


def overrides(tiny_model, out_dir: Path, tag: str, function: str, prompts: int) -> list[str]:
    return [
        f"name=gen-{tag}",
        f"model.path={tiny_model}",
        f"cluster.namespace=aha-gen-{tag}",
        "logging.progress=false",
        "rollout.samples_per_prompt=4",
        f'reward.functions=[{{function: "{out_dir}/rewards.py:{function}"}}]',
        f"generate.prompts={prompts}",
        "generate.batch_prompts=4",
        f"generate.output={out_dir}/data/gen.jsonl",
        "generate.filter={type: pass_fail}",
        "generate.dedup=true",
    ]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()]


@pytest.fixture(scope="module")
def generated(ray_cluster, tiny_model, tmp_path_factory):
    from aha.cluster.generate import generate

    out = tmp_path_factory.mktemp("generate")
    (out / "rewards.py").write_text(REWARDS)
    summary = generate(load_config(DEMO, overrides(tiny_model, out, "fields", "even_checksum", 12)))
    return summary, out / "data"


def test_dataset_fields_filter_and_pass_at_k(generated, tiny_model):
    summary, data = generated
    every, kept = read(data / "gen.all.jsonl"), read(data / "gen.jsonl")
    assert all(list(r) == list(FIELDS) for r in every + kept)
    assert [(r["prompt_index"], r["sample_index"]) for r in every] == [
        (i, s) for i in range(12) for s in range(4)
    ]
    for r in every:
        assert (
            r["id"] == f"train-{r['prompt_index']}/{r['sample_index']}"
            and r["prompt_id"] == f"train-{r['prompt_index']}"
        )
        assert r["reward"] == even_checksum(r["completion"]) and r["reward_parts"] == {
            "even_checksum": r["reward"]
        }
        assert r["passed"] == (r["reward"] >= 1.0) and r["reward_error"] is None
        assert r["version"] == 0 and r["model"] == str(tiny_model) and r["completion_tokens"] >= 1
        assert r["sampling"] == {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_tokens": 6,
            "stop": [],
            "n": 4,
            "seed": 0,
        }
    # pass_fail + dedup keeps exactly the passing samples whose text was not kept before, in order.
    seen, expected = set(), []
    for r in every:
        if r["passed"] and text_key(r["prompt"], r["completion"]) not in seen:
            seen.add(text_key(r["prompt"], r["completion"]))
            expected.append(r["id"])
    assert [r["id"] for r in kept] == expected == [r["id"] for r in every if r["kept"]]
    assert 0 < len(kept) < len(every)

    groups = defaultdict(list)
    for r in every:
        groups[r["prompt_id"]].append(r["passed"])
    for k in range(1, 5):  # by hand: the mean over prompts of 1 - C(n-c, k) / C(n, k)
        hand = sum(1 - math.comb(4 - sum(g), k) / math.comb(4, k) for g in groups.values()) / len(groups)
        assert summary["pass_at_k"][str(k)] == pytest.approx(hand)
    assert (summary["prompts"], summary["samples"], summary["kept"]) == (12, 48, len(kept))
    assert summary["kept_fraction"] == pytest.approx(len(kept) / 48)
    assert summary["monitor"]["len_tokens_mean"] == pytest.approx(
        sum(r["completion_tokens"] for r in every) / 48
    )
    assert json.loads((data / "gen.summary.json").read_text()) == summary

    import pyarrow.parquet as pq

    table = pq.read_table(data / "gen.parquet")
    assert table.column_names == list(FIELDS) and table.column("id").to_pylist() == expected
    assert pq.read_table(data / "gen.all.parquet").num_rows == 48


def test_killed_generate_resumes_without_duplicates_or_gaps(ray_cluster, tiny_model, tmp_path):
    from aha.cluster.generate import generate

    (tmp_path / "rewards.py").write_text(REWARDS)
    args = overrides(tiny_model, tmp_path, "kill", "slow_even_checksum", 40)
    gcs = ray_cluster.get_runtime_context().gcs_address  # the child joins this test session's Ray
    state_file = tmp_path / "data" / "gen.state.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "aha.cluster.cli", "generate", str(DEMO), *args, f"cluster.address={gcs}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (state_file.is_file() and json.loads(state_file.read_text())["cursor"] >= 8):
            assert child.poll() is None, "generate exited before it was killed"
            assert time.monotonic() < deadline, "generate committed no two rounds in 120 s"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    killed_at = json.loads(state_file.read_text())["cursor"]
    assert 8 <= killed_at < 40, killed_at

    summary = generate(load_config(DEMO, [*args, "cluster.namespace=aha-gen-resume"]), resume=True)
    every = read(tmp_path / "data" / "gen.all.jsonl")
    keys = Counter((r["prompt_index"], r["sample_index"]) for r in every)
    assert set(keys) == {(i, s) for i in range(40) for s in range(4)}  # nothing missing
    assert max(keys.values()) == 1  # nothing twice
    kept = read(tmp_path / "data" / "gen.jsonl")
    assert [r["id"] for r in kept] == [r["id"] for r in every if r["kept"]]
    assert len({text_key(r["prompt"], r["completion"]) for r in kept}) == len(
        kept
    )  # dedup held across the kill
    assert (summary["prompts"], summary["samples"]) == (40, 160)


def test_sft_run_imitates_the_generated_file(generated, tiny_model, tmp_path):
    from aha.cluster.driver import run

    _, data = generated
    cfg = load_config(
        DEMO,
        [
            "name=gen-sft",
            f"model.path={tiny_model}",
            f"logging.run_dir={tmp_path}/{{name}}",
            "cluster.namespace=aha-gen-sft",
            "logging.progress=false",
            "rollout.samples_per_prompt=4",
            "imitation.steps=2",
            "imitation.batch_size=4",
            f"imitation.path={data}/gen.jsonl",
            "schedule.steps=1",  # one step of trial and error, to see the monitor's metrics in the run
            "schedule.prompts_per_step=2",
            "schedule.eval_prompts=0",
            "checkpoint.export_hf=false",
        ],
    )
    summary = run(cfg)
    assert summary["imitation_steps"] == 2 and summary["steps"] == 1
    records = read(tmp_path / "gen-sft" / "metrics.jsonl")
    nll = [r["imitation/nll"] for r in records if "imitation/nll" in r]
    assert len(nll) == 2 and all(math.isfinite(v) and v > 0 for v in nll)
    step = next(r for r in records if "reward_mean" in r)
    assert {"monitor/phrase_rate", "monitor/len_tokens_p90", "monitor/len_chars_mean"} <= set(step)
    assert (tmp_path / "gen-sft" / "report.png").is_file()
