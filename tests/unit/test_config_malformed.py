"""One rule: a config either fails at `aha validate` with exit 2 naming the field, or runs to the end.

A table of malformed configs (values, combinations, references, file contents), each expected to exit 2 with a
message that names the field (or, for a file that is not YAML at all, the problem), never a traceback, and never
echoing a huge value back whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aha.cluster.cli import main

HOME = str(Path.home())

# A valid job whose files exist (made by the `tree` fixture); every case changes one thing.
BASE = {
    "name": "t",
    "model": {"path": "{tmp}/model", "max_model_len": 512},
    "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
    "logging": {"run_dir": "{tmp}/runs/{name}"},
}

# (id, overrides, text that must appear in the message: the field, or for file content the problem)
OVERRIDE_CASES = [
    # counts: strict ints with bounds
    ("engines-bool", ["rollout.num_engines=true"], "rollout.num_engines"),
    ("engines-1e9", ["rollout.num_engines=1000000000"], "rollout.num_engines"),
    ("engines-float", ["rollout.num_engines=2.5"], "rollout.num_engines"),
    ("engines-zero", ["rollout.num_engines=0"], "rollout.num_engines"),
    ("engines-string", ["rollout.num_engines='4'"], "rollout.num_engines"),
    ("engines-negative", ["rollout.num_engines=-1"], "rollout.num_engines"),
    ("workers-zero", ["reward.num_workers=0"], "reward.num_workers"),
    ("workers-huge", ["reward.num_workers=100000"], "reward.num_workers"),
    ("ranks-bool", ["learner.num_ranks=false"], "learner.num_ranks"),
    ("ranks-huge", ["learner.num_ranks=5000"], "learner.num_ranks"),
    ("samples-zero", ["rollout.samples_per_prompt=0"], "rollout.samples_per_prompt"),
    ("tp-huge", ["rollout.tensor_parallel_size=65"], "rollout.tensor_parallel_size"),
    ("threads-zero", ["rollout.threads_per_engine=0"], "rollout.threads_per_engine"),
    ("retries-negative", ["rollout.max_retries=-1"], "rollout.max_retries"),
    ("seed-negative", ["rollout.seed=-1"], "rollout.seed"),
    ("seed-2^32", ["rollout.seed=4294967296"], "rollout.seed"),
    ("data-seed-negative", ["data.seed=-3"], "data.seed"),
    ("micro-batch-zero", ["learner.micro_batch_size=0"], "learner.micro_batch_size"),
    ("zero-stage-4", ["learner.zero_stage=4"], "learner.zero_stage"),
    ("imitation-steps-negative", ["imitation.steps=-1"], "imitation.steps"),
    ("schedule-steps-bool", ["schedule.steps=true"], "schedule.steps"),
    ("prompts-per-step-zero", ["schedule.prompts_per_step=0"], "schedule.prompts_per_step"),
    ("capacity-negative", ["buffer.capacity=-5"], "buffer.capacity"),
    ("staleness-negative", ["buffer.max_staleness=-1"], "buffer.max_staleness"),
    ("checkpoint-keep-zero", ["checkpoint.keep=0"], "checkpoint.keep"),
    ("checkpoint-every-negative", ["checkpoint.every=-1"], "checkpoint.every"),
    ("num-cpus-zero", ["cluster.num_cpus=0"], "cluster.num_cpus"),
    ("generate-prompts-zero", ["generate.prompts=0"], "generate.prompts"),
    ("probe-sequences-float", ["weight_sync.probe_sequences=1.5"], "weight_sync.probe_sequences"),
    ("max-model-len-small", ["model.max_model_len=8"], "model.max_model_len"),
    ("max-model-len-bool", ["model.max_model_len=true"], "model.max_model_len"),
    # floats: finite, in range
    ("cpus-per-engine-zero", ["rollout.cpus_per_engine=0"], "rollout.cpus_per_engine"),
    ("cpus-per-engine-inf", ["rollout.cpus_per_engine=.inf"], "rollout.cpus_per_engine"),
    ("gpus-per-engine-negative", ["rollout.gpus_per_engine=-1"], "rollout.gpus_per_engine"),
    ("kv-cache-nan", ["rollout.kv_cache_gib=.nan"], "rollout.kv_cache_gib"),
    ("startup-timeout-inf", ["rollout.startup_timeout_s=.inf"], "rollout.startup_timeout_s"),
    ("generate-timeout-zero", ["rollout.generate_timeout_s=0"], "rollout.generate_timeout_s"),
    ("generate-timeout-1e12", ["rollout.generate_timeout_s=1e12"], "rollout.generate_timeout_s"),
    ("temperature-inf", ["rollout.sampling.temperature=.inf"], "rollout.sampling.temperature"),
    ("temperature-negative", ["rollout.sampling.temperature=-0.5"], "rollout.sampling.temperature"),
    ("top-p-zero", ["rollout.sampling.top_p=0"], "rollout.sampling.top_p"),
    ("top-p-nan", ["rollout.sampling.top_p=.nan"], "rollout.sampling.top_p"),
    ("top-p-above-1", ["rollout.sampling.top_p=1.5"], "rollout.sampling.top_p"),
    ("top-k-minus-2", ["rollout.sampling.top_k=-2"], "rollout.sampling.top_k"),
    ("max-tokens-zero", ["rollout.sampling.max_tokens=0"], "rollout.sampling.max_tokens"),
    ("error-reward-nan", ["reward.error_reward=.nan"], "reward.error_reward"),
    ("error-reward-inf", ["reward.error_reward=-.inf"], "reward.error_reward"),
    (
        "error-reward-with-mask",
        ["reward.error_reward=-1"],
        "reward.error_reward is set but reward.on_error is mask",
    ),
    ("on-error-unknown", ["reward.on_error=zero"], "reward.on_error"),
    (
        "batched-without-kwargs",
        ["reward.functions=[{function: '{tmp}/trl.py:no_kwargs'}]"],
        "reward.functions.0 (no_kwargs): would be called with fields it does not take",
    ),
    (
        "batched-not-bool",
        ["reward.functions=[{function: 'aha.actors.rewards.match:exact_match', batched: 3}]"],
        "reward.functions.0.batched",
    ),
    ("reward-timeout-inf", ["reward.timeout_s=.inf"], "reward.timeout_s"),
    ("reward-timeout-negative", ["reward.timeout_s=-1"], "reward.timeout_s"),
    ("reward-cpus-zero", ["reward.cpus_per_worker=0"], "reward.cpus_per_worker"),
    ("lr-inf", ["learner.optimizer.lr=.inf"], "learner.optimizer.lr"),
    ("lr-zero", ["learner.optimizer.lr=0"], "learner.optimizer.lr"),
    ("lr-5", ["learner.optimizer.lr=5"], "learner.optimizer.lr"),
    ("betas-1", ["learner.optimizer.betas=[0.9, 1.0]"], "learner.optimizer.betas.1"),
    ("betas-negative", ["learner.optimizer.betas=[-0.1, 0.9]"], "learner.optimizer.betas.0"),
    ("betas-one-value", ["learner.optimizer.betas=[0.9]"], "learner.optimizer.betas"),
    ("betas-nan", ["learner.optimizer.betas=[.nan, 0.9]"], "learner.optimizer.betas.0"),
    ("eps-nan", ["learner.optimizer.eps=.nan"], "learner.optimizer.eps"),
    ("grad-clip-inf", ["learner.grad_clip=.inf"], "learner.grad_clip"),
    ("grad-clip-zero", ["learner.grad_clip=0"], "learner.grad_clip"),
    ("step-timeout-inf", ["learner.step_timeout_s=.inf"], "learner.step_timeout_s"),
    ("gpus-per-rank-negative", ["learner.gpus_per_rank=-1"], "learner.gpus_per_rank"),
    ("filter-threshold-nan", ["algorithm.filter_threshold=.nan"], "algorithm.filter_threshold"),
    ("clip-eps-inf", ["algorithm.clip_eps=.inf"], "algorithm.clip_eps"),
    ("kl-coef-nan", ["algorithm.kl_coef=.nan"], "algorithm.kl_coef"),
    ("imitation-lr-inf", ["imitation.lr=.inf"], "imitation.lr"),
    ("eval-threshold-nan", ["schedule.eval_threshold=.nan"], "schedule.eval_threshold"),
    ("bucket-inf", ["weight_sync.bucket_mb=.inf"], "weight_sync.bucket_mb"),
    ("probe-tolerance-nan", ["weight_sync.probe_tolerance=.nan"], "weight_sync.probe_tolerance"),
    ("sync-timeout-zero", ["weight_sync.timeout_s=0"], "weight_sync.timeout_s"),
    (
        "threshold-filter-nan",
        ["generate.filter={type: threshold, min_reward: .nan}"],
        "generate.filter.min_reward",
    ),
    ("pass-threshold-inf", ["generate.pass_threshold=.inf"], "generate.pass_threshold"),
    # names, literals, unknown keys
    ("advantage-unknown", ["algorithm.advantage=ppo2"], "algorithm"),
    ("loss-unknown", ["algorithm.loss=dpo"], "algorithm"),
    ("data-type-unknown", ["data.type=parquet"], "data"),
    ("mode-unknown", ["schedule.mode=sometimes"], "schedule.mode"),
    ("dtype-unknown", ["learner.dtype=float16"], "learner.dtype"),
    ("transport-unknown", ["weight_sync.transport=carrier"], "weight_sync.transport"),
    ("strategy-unknown", ["cluster.placement_strategy=RANDOM"], "cluster.placement_strategy"),
    ("filter-type-unknown", ["generate.filter={type: best}"], "generate.filter"),
    ("typo-section", ["learner.optimiser.lr=1"], "learner.optimiser"),
    ("typo-top-level", ["rolout.num_engines=2"], "rolout"),
    ("nccl-without-gpus", ["learner.backend=nccl"], "learner.backend is nccl"),
    ("name-slash", ["name=a/b"], "name"),
    ("name-dotdot", ["name=.."], "name"),
    ("name-too-long", ["name=" + "n" * 200], "name"),
    # combinations that would run forever or learn nothing
    (
        "grpo-one-sample",
        ["rollout.samples_per_prompt=1", "algorithm.advantage=grpo"],
        "rollout.samples_per_prompt",
    ),
    (
        "rloo-one-sample",
        ["rollout.samples_per_prompt=1", "algorithm.advantage=rloo"],
        "rollout.samples_per_prompt",
    ),
    (
        "dr-grpo-one-sample",
        ["rollout.samples_per_prompt=1", "algorithm.advantage=dr_grpo"],
        "rollout.samples_per_prompt",
    ),
    (
        "reinforce-pp-one-sample",
        ["rollout.samples_per_prompt=1", "algorithm.advantage=reinforce_pp_baseline"],
        "rollout.samples_per_prompt",
    ),
    ("grpo-greedy", ["rollout.sampling.temperature=0"], "rollout.sampling.temperature"),
    (
        "max-tokens-over-len",
        ["rollout.sampling.max_tokens=1000", "model.max_model_len=64"],
        "rollout.sampling.max_tokens",
    ),
    ("eval-max-tokens-eq-len", ["rollout.eval_sampling.max_tokens=512"], "rollout.eval_sampling.max_tokens"),
    ("capacity-one", ["buffer.capacity=1"], "buffer.capacity"),
    ("capacity-below-step", ["buffer.capacity=31", "schedule.prompts_per_step=8"], "buffer.capacity"),
    ("sync-every-livelock", ["schedule.sync_every=3", "buffer.max_staleness=1"], "schedule.sync_every"),
    (
        "sync-every-async-livelock",
        ["schedule.mode=async", "schedule.sync_every=2", "buffer.max_staleness=0"],
        "schedule.sync_every",
    ),
    ("addition-eval-too-big", ["data.digits=1", "data.eval_size=60"], "data.eval_size"),
    ("no-reward-functions", ["reward.functions=[]"], "reward.functions"),
    ("empty-stop", ['rollout.sampling.stop=[""]'], "rollout.sampling.stop"),
    ("stop-not-list", ["rollout.sampling.stop=5"], "rollout.sampling.stop"),
    ("empty-phrase", ['monitor.phrases=[" "]'], "monitor.phrases"),
    # templates and regexes
    ("run-dir-root", ["logging.run_dir=/"], "logging.run_dir"),
    ("run-dir-top-level", ["logging.run_dir=/tmp"], "logging.run_dir"),
    ("run-dir-home", [f"logging.run_dir={HOME}"], "logging.run_dir"),
    ("run-dir-tilde", ["logging.run_dir=~/runs"], "logging.run_dir"),
    ("run-dir-cwd", ["logging.run_dir=."], "logging.run_dir"),
    ("run-dir-parent", ["logging.run_dir=.."], "logging.run_dir"),
    ("run-dir-unknown-placeholder", ["logging.run_dir=runs/{job}"], "logging.run_dir"),
    ("run-dir-positional-placeholder", ["logging.run_dir=runs/{}"], "logging.run_dir"),
    ("run-dir-unbalanced", ["logging.run_dir=runs/{name"], "logging.run_dir"),
    ("run-dir-conversion", ["logging.run_dir=runs/{name!r}"], "logging.run_dir"),
    ("run-dir-attribute", ["logging.run_dir=runs/{name.upper}"], "logging.run_dir"),
    ("output-unknown-placeholder", ["generate.output=data/{job}.jsonl"], "generate.output"),
    ("output-not-jsonl", ["generate.output=data/x.csv"], "generate.output"),
    (
        "gym-template-placeholder",
        ["data={type: reasoning_gym, prompt_template: '{q}'}"],
        "data.prompt_template",
    ),
    ("answer-pattern-backtracking", ["monitor.answer_pattern=(a+)+$"], "monitor.answer_pattern"),
    ("answer-pattern-star-star", ["monitor.answer_pattern=(.*,)*x"], "monitor.answer_pattern"),
    ("answer-pattern-digits", ["monitor.answer_pattern=^(\\d*)*$"], "monitor.answer_pattern"),
    ("answer-pattern-invalid", ["monitor.answer_pattern=(["], "monitor.answer_pattern"),
    ("address-garbage", ["cluster.address=not an address"], "cluster.address"),
    ("address-dashboard", ["cluster.address=http://127.0.0.1:8265"], "cluster.address"),
    ("address-port-range", ["cluster.address=host:99999"], "cluster.address"),
    ("address-no-port", ["cluster.address=host"], "cluster.address"),
    ("address-int", ["cluster.address=6379"], "cluster.address"),
    # references, resolved without Ray
    ("model-missing", ["model.path={tmp}/nope"], "model.path"),
    ("model-is-file", ["model.path={tmp}/file.txt"], "model.path"),
    ("model-no-config-json", ["model.path={tmp}/notmodel"], "model.path"),
    ("model-empty-string", ["model.path=''"], "model.path"),
    ("reward-no-colon", ["reward.functions=[{function: exact_match}]"], "reward.functions.0.function"),
    (
        "reward-empty-name",
        ["reward.functions=[{function: 'aha.actors.rewards.match:'}]"],
        "reward.functions.0.function",
    ),
    ("reward-empty-module", ["reward.functions=[{function: ':fn'}]"], "reward.functions.0.function"),
    ("reward-bad-module-name", ["reward.functions=[{function: 'a b:fn'}]"], "reward.functions.0.function"),
    (
        "reward-missing-function",
        ["reward.functions=[{function: 'aha.actors.rewards.match:missing'}]"],
        "reward.functions.0",
    ),
    (
        "reward-missing-module",
        ["reward.functions=[{function: 'nonexistent_module:fn'}]"],
        "reward.functions.0",
    ),
    ("reward-missing-file", ["reward.functions=[{function: 'nope.py:fn'}]"], "reward.functions.0"),
    ("reward-file-raises", ["reward.functions=[{function: '{tmp}/raises.py:fn'}]"], "reward.functions.0"),
    ("reward-file-exits", ["reward.functions=[{function: '{tmp}/exits.py:fn'}]"], "reward.functions.0"),
    (
        "reward-not-callable",
        ["reward.functions=[{function: 'aha.actors.rewards.match:re'}]"],
        "reward.functions.0",
    ),
    (
        "reward-unknown-kwarg",
        ["reward.functions=[{function: 'aha.actors.rewards.match:exact_match', kwargs: {bogus: 1}}]"],
        "kwargs.bogus",
    ),
    (
        "reward-kwarg-no-catch-all",
        ["reward.functions=[{function: '{tmp}/strict.py:fn', kwargs: {bogus: 1}}]"],
        "kwargs.bogus",
    ),
    (
        "reward-required-kwarg-missing",
        [
            "reward.functions=[{function: 'aha.actors.rewards.length:length_penalty'}, "
            "{function: 'aha.actors.rewards.match:exact_match'}]"
        ],
        "reward.functions.0",
    ),
    (
        "reward-field-not-in-data",
        ["reward.functions=[{function: 'aha.actors.rewards.code:code_tests'}]"],
        "reward.functions.0",
    ),
    (
        "reward-duplicate-names",
        [
            "reward.functions=[{function: 'aha.actors.rewards.match:exact_match'}, "
            "{function: 'aha.actors.rewards.match:exact_match'}]"
        ],
        "reward.functions",
    ),
    (
        "reward-extract-backtracking",
        [
            "reward.functions=[{function: 'aha.actors.rewards.match:exact_match', kwargs: {extract: '(\\d+)+$'}}]"
        ],
        "kwargs.extract",
    ),
    (
        "reward-weight-inf",
        ["reward.functions=[{function: 'aha.actors.rewards.match:exact_match', weight: .inf}]"],
        "reward.functions.0.weight",
    ),
    (
        "reward-weight-nan-list",
        ["reward.functions=[{function: 'aha.actors.rewards.match:exact_match', weight: .nan}]"],
        "reward.functions.0.weight",
    ),
    ("gym-task-unknown", ["data={type: reasoning_gym, task: nope}"], "data.task"),
    ("gym-size-zero", ["data={type: reasoning_gym, size: 0}"], "data.size"),
    ("jsonl-no-path", ["data={type: jsonl}"], "data.path"),
    ("jsonl-missing", ["data={type: jsonl, path: '{tmp}/nope.jsonl'}"], "data.path"),
    ("jsonl-is-dir", ["data={type: jsonl, path: '{tmp}'}"], "is a folder"),
    ("jsonl-dev-null", ["data={type: jsonl, path: /dev/null}"], "not a regular file"),
    ("jsonl-empty", ["data={type: jsonl, path: '{tmp}/empty.jsonl'}"], "data.path"),
    ("jsonl-not-json", ["data={type: jsonl, path: '{tmp}/bad.jsonl'}"], "data.path"),
    ("jsonl-no-prompt", ["data={type: jsonl, path: '{tmp}/noprompt.jsonl'}"], "data.path"),
    ("jsonl-binary", ["data={type: jsonl, path: '{tmp}/binary.jsonl'}"], "data.path"),
    (
        "jsonl-eval-is-dir",
        ["data={type: jsonl, path: '{tmp}/good.jsonl', eval_path: '{tmp}'}"],
        "data.eval_path",
    ),
    (
        "jsonl-imitation-needs-answer",
        ["data={type: jsonl, path: '{tmp}/noanswer.jsonl'}", "imitation.steps=2"],
        "data.path",
    ),
    ("imitation-path-missing", ["imitation.steps=1", "imitation.path={tmp}/nope.jsonl"], "imitation.path"),
    ("imitation-path-missing-unused", ["imitation.path={tmp}/nope.jsonl"], "imitation.path"),
    ("imitation-path-dir", ["imitation.steps=1", "imitation.path={tmp}"], "imitation.path"),
    ("imitation-path-dev-null", ["imitation.steps=1", "imitation.path=/dev/null"], "imitation.path"),
    ("imitation-no-completion", ["imitation.steps=1", "imitation.path={tmp}/good.jsonl"], "imitation.path"),
    # a huge value is named, not echoed
    ("huge-value", ["rollout.num_engines=" + "9" * 5000], "rollout.num_engines"),
    ("huge-string", ["model.path=" + "x" * 100_000], "model.path"),
    # override syntax
    ("override-no-equals", ["rollout.num_engines"], "dotted.key=value"),
    ("override-empty-segment", ["rollout..num_engines=2"], "empty key segment"),
    ("override-into-value", ["name.x=1"], "name is not a section"),
]


def _bomb(levels: int = 10) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


BASE_YAML = "model: {path: '{tmp}/model'}\nreward: {functions: [{function: 'aha.actors.rewards.match:exact_match'}]}\n"

# (id, file content (str or bytes), text that must appear)
RAW_CASES = [
    (
        "duplicate-top-level",
        BASE_YAML + "rollout: {num_engines: 2}\nrollout: {num_engines: 3}\n",
        "duplicate key 'rollout'",
    ),
    (
        "duplicate-nested",
        BASE_YAML + "rollout:\n  num_engines: 2\n  num_engines: 3\n",
        "duplicate key 'num_engines'",
    ),
    ("recursive-alias", BASE_YAML + "x: &a [*a]\n", "recursive YAML alias"),
    ("recursive-alias-mapping", BASE_YAML + "x: &a {y: *a}\n", "recursive YAML alias"),
    ("alias-bomb", BASE_YAML + _bomb(), "expands to more than"),
    ("deep-nesting", BASE_YAML + "x: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    (
        "deep-nesting-aliases",
        "".join(f"a{i}: &a{i} [{'*a' + str(i - 1) if i else 1}]\n" for i in range(200)),
        "nested",
    ),
    ("utf16", BASE_YAML.encode("utf-16"), "not UTF-8"),
    ("utf16-no-bom", BASE_YAML.encode("utf-16-le"), "not UTF-8"),
    ("binary", bytes(range(256)) * 8, "not UTF-8"),
    ("latin1", (BASE_YAML + "name: caf\xe9\n").encode("latin-1"), "not UTF-8"),
    ("control-characters", BASE_YAML + "name: a\x07b\n", "not valid YAML"),
    (
        "long-alias-chain",
        "".join(f"a{i}: &a{i} [{'*a' + str(i - 1) if i else 1}]\n" for i in range(3000)),
        "nested",
    ),
    ("unclosed", "model: [unclosed", "not valid YAML"),
    ("tab-indent", "model:\n\tpath: x\n", "not valid YAML"),
    ("python-tag", BASE_YAML + "name: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("bad-timestamp", BASE_YAML + "name: 2001-13-45\n", "could not be read as YAML"),
    ("huge-int", BASE_YAML + "rollout: {num_engines: " + "1" * 5000 + "}\n", "could not be read as YAML"),
    ("list-root", "- a\n- b\n", "must be a mapping"),
    ("scalar-root", "just text\n", "must be a mapping"),
    ("empty-file", "", "model"),
    (
        "model-missing-key",
        "reward: {functions: [{function: 'aha.actors.rewards.match:exact_match'}]}\n",
        "model",
    ),
    ("section-is-list", BASE_YAML + "rollout: [1, 2]\n", "rollout"),
    ("unknown-top-level", BASE_YAML + "rollouts: {num_engines: 2}\n", "rollouts"),
    ("non-string-key", BASE_YAML + "rollout: {1: 2}\n", "rollout.1"),
    ("too-large", BASE_YAML + "# " + "x" * (1 << 20) + "\n", "bytes"),
    ("many-keys", BASE_YAML + "".join(f"k{i}: 1\n" for i in range(3000)), "and 2980 more"),
    ("huge-value-in-file", BASE_YAML + "rollout: {num_engines: '" + "x" * 500_000 + "'}\n", "characters)"),
]


@pytest.fixture
def tree(tmp_path):
    """The files the cases point at."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "noprompt.jsonl").write_text(json.dumps({"x": 1}) + "\n")
    (tmp_path / "noanswer.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('broken module')\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "strict.py").write_text(
        "def fn(prompt, completion, /, *, answer, a, b, finish_reason, completion_tokens):\n    return 0.0\n"
    )
    (tmp_path / "trl.py").write_text(  # TRL-style batched functions, one without the **kwargs TRL asks for
        "def ok(completions, answer, **kwargs):\n    return [0.0] * len(completions)\n\n"
        "def no_kwargs(prompts, completions, answer):\n    return [0.0] * len(completions)\n"
    )
    return tmp_path


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _validate(capsys, path: Path, overrides: list[str]) -> tuple[int, str]:
    code = main(["validate", str(path), *overrides])
    return code, capsys.readouterr().err


def _base_file(tree: Path) -> Path:
    data = json.loads(_fill(json.dumps(BASE), tree))
    path = tree / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_table_has_at_least_100_cases():
    assert len(OVERRIDE_CASES) + len(RAW_CASES) >= 100


def test_the_base_config_is_valid(tree, capsys):
    code, err = _validate(capsys, _base_file(tree), [])
    assert code == 0, err


def test_a_trl_style_reward_file_is_valid(tree, capsys):
    override = _fill(
        "reward.functions=[{function: '{tmp}/trl.py:ok'}, {function: '{tmp}/trl.py:ok', name: b}]", tree
    )
    code, err = _validate(
        capsys, _base_file(tree), [override, "reward.on_error=reward", "reward.error_reward=-1"]
    )
    assert code == 0, err


@pytest.mark.parametrize(
    "overrides,field", [c[1:] for c in OVERRIDE_CASES], ids=[c[0] for c in OVERRIDE_CASES]
)
def test_malformed_values_exit_2_naming_the_field(tree, capsys, overrides, field):
    code, err = _validate(capsys, _base_file(tree), [_fill(o, tree) for o in overrides])
    assert code == 2, err
    assert field in err, err
    assert "Traceback" not in err and len(err) < 3000, err[:3000]


@pytest.mark.parametrize("content,message", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_malformed_files_exit_2_without_traceback(tree, capsys, content, message):
    path = tree / "job.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(_fill(content, tree))
    started = time.monotonic()
    code, err = _validate(capsys, path, [])
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err) < 3000, err[:3000]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("target", ["/dev/null", "{tmp}", "{tmp}/absent.yaml"])
def test_config_path_that_is_not_a_file(tree, capsys, target):
    code, err = _validate(capsys, Path(_fill(target, tree)), [])
    assert code == 2 and ("not a file" in err or "not found" in err), err


def test_a_directory_is_not_reported_as_not_found(tree, capsys):
    code, err = _validate(capsys, _base_file(tree), ["model.path={tmp}/file.txt".replace("{tmp}", str(tree))])
    assert code == 2 and "not a folder" in err and "not found" not in err


def test_no_check_files_skips_files_but_not_values(tree, capsys):
    path = _base_file(tree)
    assert _validate(capsys, path, ["model.path=/no/such/model", "--no-check-files"])[0] == 0
    code, err = _validate(capsys, path, ["model.path=/no/such/model"])
    assert code == 2 and "model.path" in err and "--no-check-files" in err
    code, err = _validate(capsys, path, ["rollout.num_engines=true", "--no-check-files"])
    assert code == 2 and "rollout.num_engines" in err


def test_overrides_may_follow_an_option(tree, capsys):
    path = _base_file(tree)
    code, err = _validate(capsys, path, ["--no-check-files", "rollout.num_engines=true", "model.path=/x"])
    assert code == 2 and "rollout.num_engines" in err and "model.path" not in err
    with pytest.raises(SystemExit):
        main(["validate", str(path), "--no-check-files", "--bogus"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-m", "aha.cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.path=/no/such/model", "model.path"),
        ("reward.functions=[{function: 'nonexistent_module:fn'}]", "reward.functions.0.function"),
        ("reward.functions=[{function: 'aha.actors.rewards.match:missing'}]", "reward.functions.0.function"),
    ],
)
def test_run_exits_2_before_ray_starts(tree, override, field):
    """`aha run` does the same checks as `aha validate` before importing the driver (so before Ray)."""
    started = time.monotonic()
    proc = _cli("run", str(_base_file(tree)), override, cwd=tree)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30
    assert not (tree / "runs").exists()  # nothing was created


def test_run_refuses_a_folder_it_did_not_create(tree):
    run_dir = tree / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "precious.txt").write_text("keep me")
    proc = _cli("run", str(_base_file(tree)), cwd=tree)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "logging.run_dir" in proc.stderr, (
        proc.stderr
    )
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_a_plain_rerun_refuses_a_finished_run_and_deletes_nothing(tree):
    """A folder aha created, holding a final model: exit 2 before Ray, naming --resume and --overwrite."""
    run_dir = tree / "runs" / "t"
    (run_dir / "final_model").mkdir(parents=True)
    (run_dir / ".aha-run").write_text("")
    (run_dir / "final_model" / "config.json").write_text("{}")
    proc = _cli("run", str(_base_file(tree)), cwd=tree)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and (run_dir / "final_model" / "config.json").is_file()
