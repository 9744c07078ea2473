"""Pre-flight checks as pure functions: the resource arithmetic against a cluster, run-dir ownership, and reward
function signatures. (tests/unit/test_config_malformed.py drives the same checks through the CLI.)"""

from __future__ import annotations

import pytest

from aha.cluster.config import JobConfig, regex_problem, run_dir_problem
from aha.cluster.config_file import ConfigError
from aha.cluster.preflight import (
    RUN_MARKER,
    Demand,
    job_demands,
    kwargs_problem,
    prepare_run_dir,
    resource_problems,
    run_dir_refusal,
)

MINIMAL = {
    "model": {"path": "models/x"},
    "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
}


def job(**sections) -> JobConfig:
    return JobConfig.model_validate({**MINIMAL, **sections})


def node(cpus: float, gpus: float = 0.0) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus, "memory": 1e9}


# -- resources -------------------------------------------------------------------------------------------------


def test_the_demo_fits_a_4_cpu_machine():
    cfg = job(
        rollout={"cpus_per_engine": 1},
        reward={"cpus_per_worker": 0.25, "functions": MINIMAL["reward"]["functions"]},
    )
    assert resource_problems(job_demands(cfg), node(4), [node(4)]) == []


def test_too_many_cpus_names_every_actor_and_the_cluster_total():
    cfg = job(rollout={"cpus_per_engine": 1000})
    (problem,) = resource_problems(job_demands(cfg), node(4), [node(4)])
    assert (
        "1001.5 CPU" in problem and "rollout-0..0: 1 x 1000" in problem and "learner-0..0: 1 x 1" in problem
    )
    assert "reward-0..0: 1 x 0.5" in problem and "the cluster has 4" in problem


def test_gpus_on_a_cluster_without_gpus():
    cfg = job(learner={"gpus_per_rank": 1, "num_ranks": 2})
    (problem,) = resource_problems(job_demands(cfg), node(8), [node(8)])
    assert problem == "the job asks for 2 GPU (learner-0..1: 2 x 1) but the cluster has 0"


def test_one_actor_larger_than_every_node():
    cfg = job(rollout={"cpus_per_engine": 6})
    problems = resource_problems(job_demands(cfg), node(16), [node(4)] * 4)
    assert problems == ["each of rollout-0..0 asks for 6 CPU but the largest node has 4"]


def test_strict_pack_puts_the_learner_on_one_node():
    cfg = job(learner={"num_ranks": 4, "cpus_per_rank": 2})
    demands = job_demands(cfg)
    assert resource_problems(demands, node(16), [node(4)] * 4) == []
    (problem,) = resource_problems(demands, node(16), [node(4)] * 4, strict_pack=True)
    assert "learner-0..3 ask for 4 x 2 CPU on one node" in problem


def test_custom_resources_are_compared_too():
    demands = [*job_demands(job())[:2], Demand("learner-0..1", 2, {"CPU": 1, "GPU": 0, "node_type_train": 1})]
    (problem,) = resource_problems(demands, node(8), [node(8)])
    assert problem == "the job asks for 2 node_type_train (learner-0..1: 2 x 1) but the cluster has 0"
    nodes = [{**node(8), "node_type_train": 2}]
    assert resource_problems(demands, {**node(8), "node_type_train": 2}, nodes) == []


def test_many_engines_are_added_up():
    cfg = job(rollout={"num_engines": 4000, "cpus_per_engine": 1})
    (problem,) = resource_problems(job_demands(cfg), node(64), [node(64)])
    assert "rollout-0..3999: 4000 x 1" in problem


# -- the run directory ------------------------------------------------------------------------------------------


def test_a_new_run_dir_is_created_and_marked(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    prepare_run_dir(run_dir, resume=False)
    assert (run_dir / RUN_MARKER).is_file()


def test_a_marked_run_dir_is_replaced(tmp_path):
    run_dir = tmp_path / "a"
    prepare_run_dir(run_dir, resume=False)
    (run_dir / "metrics.jsonl").write_text("old")
    (run_dir / "checkpoints").mkdir()
    prepare_run_dir(run_dir, resume=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER]


def test_resume_keeps_everything(tmp_path):
    run_dir = tmp_path / "a"
    prepare_run_dir(run_dir, resume=False)
    (run_dir / "checkpoints").mkdir()
    prepare_run_dir(run_dir, resume=True)
    assert (run_dir / "checkpoints").is_dir()


def test_an_unmarked_folder_is_never_deleted(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert "--overwrite" in run_dir_refusal(precious, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="was not created by `aha run`"):
        prepare_run_dir(precious, resume=False)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_an_empty_unmarked_folder_is_adopted(tmp_path):
    prepare_run_dir(tmp_path, resume=False)  # e.g. a mount point made for the run
    assert (tmp_path / RUN_MARKER).is_file()


def test_overwrite_replaces_the_contents_but_keeps_the_folder(tmp_path):
    folder = tmp_path / "mount"
    folder.mkdir()
    (folder / "old.txt").write_text("x")
    (folder / "sub").mkdir()
    prepare_run_dir(folder, resume=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [RUN_MARKER]


@pytest.mark.parametrize("result", ["final_model/config.json", "checkpoints/latest_run"])
def test_a_run_with_a_final_model_or_checkpoints_is_never_replaced_by_a_plain_rerun(tmp_path, result):
    run_dir = tmp_path / "a"
    prepare_run_dir(run_dir, resume=False)
    (run_dir / result).parent.mkdir()
    (run_dir / result).write_text("results")
    refusal = run_dir_refusal(run_dir, resume=False, overwrite=False)
    assert "--resume" in refusal and "--overwrite" in refusal and result.split("/")[0] in refusal
    with pytest.raises(ConfigError, match="holds a run with"):
        prepare_run_dir(run_dir, resume=False)
    assert (run_dir / result).read_text() == "results"  # nothing deleted
    prepare_run_dir(run_dir, resume=True)
    assert (run_dir / result).is_file()
    prepare_run_dir(run_dir, resume=False, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER]


@pytest.mark.parametrize("steps, every", [(200, 20), (25, 2), (9, 1), (1, 1)])
def test_checkpoint_every_defaults_to_a_tenth_of_the_steps(steps, every):
    assert job(schedule={"steps": steps}).checkpoint.every is None
    assert job(schedule={"steps": steps}).resolved().checkpoint.every == every
    assert job(schedule={"steps": steps}, checkpoint={"every": 0}).resolved().checkpoint.every == 0  # never
    assert job(schedule={"steps": steps}, checkpoint={"every": 3}).resolved().checkpoint.every == 3


def test_a_file_is_not_a_run_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert "not a folder" in run_dir_refusal(target, resume=False, overwrite=True)


@pytest.mark.parametrize("path", ["/", "/tmp", "~/runs", ".", ".."])
def test_run_dir_problem(path):
    assert run_dir_problem(path) is not None


def test_run_dir_ok(tmp_path):
    assert run_dir_problem(str(tmp_path / "runs" / "x")) is None
    assert run_dir_problem("runs/x") is None


# -- reward signatures ------------------------------------------------------------------------------------------


def ignores_rest(prompt, completion, /, *, answer, extract=None, **_):
    return 0.0


def reads_rest(prompt, completion, /, **fields):
    return 0.0


def exact(prompt, completion, /, *, answer, finish_reason, completion_tokens):
    return 0.0


def three_positional(prompt, completion, extra, /):
    return 0.0


FIELDS = {"answer", "a", "b"}


def test_kwargs_of_a_function_that_ignores_the_rest():
    assert kwargs_problem(ignores_rest, {"extract": "x"}, FIELDS) is None
    assert "kwargs.bogus: not a parameter" in kwargs_problem(ignores_rest, {"bogus": 1}, FIELDS)


def test_kwargs_of_a_function_that_reads_the_rest():
    assert kwargs_problem(reads_rest, {"anything": 1}, FIELDS) is None


def test_required_field_missing():
    assert "needs answer" in kwargs_problem(ignores_rest, {}, {"a"})
    assert kwargs_problem(ignores_rest, {}, None) is None  # fields unknown: not checked


def test_fields_a_function_cannot_take():
    assert "fields it does not take (a, b)" in kwargs_problem(exact, {}, FIELDS)
    assert kwargs_problem(exact, {}, {"answer"}) is None


def keyword_by_position(prompt, completion, answer, a=0, b=0, **_):
    return 0.0


def test_positional_shape():
    assert "more than two required positional-only" in kwargs_problem(three_positional, {}, FIELDS)
    assert kwargs_problem(keyword_by_position, {}, FIELDS) is None  # answer arrives as a keyword
    assert "must take (prompt, completion" in kwargs_problem(lambda x: 0.0, {}, FIELDS)


# -- regexes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern", [r"(a+)+$", r"(a*)*b", r"(.*,)*x", r"((ab)+c?)*$", r"(?:\s*\w+)+;", r"(x+x+)+y"]
)
def test_catastrophic_patterns(pattern):
    assert "nested unbounded repeats" in regex_problem(pattern)


@pytest.mark.parametrize(
    "pattern",
    [r"^\d+$", r"<answer>.*?</answer>|\\boxed\{|\banswer\s*(?:is|:)", r"(ab){2,5}", r"(a+){3}", r"(?>a+)+"],
)
def test_ordinary_patterns(pattern):
    assert regex_problem(pattern) is None


def test_invalid_pattern():
    assert "not a valid regular expression" in regex_problem("([")


# -- batched (TRL-style) reward signatures ----------------------------------------------------------------------


def trl_style(completions, answer, **kwargs):
    return [0.0] * len(completions)


def trl_without_kwargs(prompts, completions):
    return [0.0] * len(completions)


def test_batched_signatures():
    assert kwargs_problem(trl_style, {"scale": 2}, FIELDS, batched=True) is None
    assert "needs answer" in kwargs_problem(trl_style, {}, {"a"}, batched=True)
    no_kwargs = kwargs_problem(trl_without_kwargs, {}, FIELDS, batched=True)
    assert "does not take (a, answer, b, completion_ids, completion_tokens, finish_reason)" in no_kwargs
    assert "keywords only" in kwargs_problem(three_positional, {}, FIELDS, batched=True)
    # the per-sample check of a function that has neither shape says how to declare a batched one
    assert "batched: true" in kwargs_problem(lambda **kw: 0.0, {}, FIELDS)
