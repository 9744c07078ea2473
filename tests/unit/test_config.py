"""The job config: typed, bounded, strict, with errors that name the field; the CLI exits 2 on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aha.cluster.cli import main
from aha.cluster.config import JobConfig
from aha.cluster.config_file import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
MINIMAL = {
    "model": {"path": "models/x"},
    "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
}


def write(tmp_path, data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path):
    cfg = load_config(path)
    assert cfg.resolved().learner.backend in ("gloo", "nccl")


def test_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL)).resolved()
    again = JobConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_device_dependent_defaults_are_derived(tmp_path):
    cpu = load_config(write(tmp_path, MINIMAL)).resolved()
    assert (cpu.device, cpu.learner.backend, cpu.learner.dtype, cpu.weight_sync.transport) == (
        "cpu",
        "gloo",
        "float32",
        "object_store",
    )
    gpu = load_config(
        write(tmp_path, MINIMAL), ["learner.gpus_per_rank=1", "rollout.gpus_per_engine=1"]
    ).resolved()
    assert (gpu.device, gpu.learner.backend, gpu.learner.dtype) == ("cuda", "nccl", "bfloat16")


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "rollout.num_engines=4",
            "learner.optimizer.lr=3e-4",
            'rollout.sampling.stop=["\\n"]',
            "schedule.mode=async",
        ],
    )
    assert cfg.rollout.num_engines == 4 and isinstance(cfg.rollout.num_engines, int)
    assert cfg.learner.optimizer.lr == 3e-4
    assert cfg.rollout.sampling.stop == ["\n"]
    assert cfg.schedule.mode == "async"


BAD = [
    ("rollout.num_engines=-1", "rollout.num_engines"),
    ("rollout.num_engines=many", "rollout.num_engines"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("learner.optimiser.lr=1", "learner.optimiser"),  # a typo is an unknown key, not ignored
    ("algorithm.advantage=ppo2", "algorithm"),
    ("data.type=parquet", "data"),
    ("schedule.mode=sometimes", "schedule.mode"),
    ("learner.backend=nccl", "learner.backend is nccl"),
    ("rollout.sampling.top_p=1.5", "rollout.sampling.top_p"),
]


@pytest.mark.parametrize("override,field", BAD, ids=[b[0] for b in BAD])
def test_bad_values_exit_2_naming_the_field(tmp_path, capsys, override, field):
    code = main(["validate", str(write(tmp_path, MINIMAL)), override])
    err = capsys.readouterr().err
    assert code == 2
    assert field in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content,message",
    [("model: [unclosed", "not valid YAML"), ("- a\n- b\n", "must be a mapping"), ("{}", "model")],
)
def test_malformed_files(tmp_path, capsys, content, message):
    assert main(["validate", str(write(tmp_path, content))]) == 2
    assert message in capsys.readouterr().err


def test_missing_file(capsys):
    assert main(["validate", "no/such/file.yaml"]) == 2
    assert "config file not found: no/such/file.yaml" in capsys.readouterr().err


def test_cli_process_exit_code_and_no_ray(tmp_path):
    path = write(tmp_path, {**MINIMAL, "rollout": {"num_engines": -1}})
    proc = subprocess.run(
        [sys.executable, "-m", "aha.cluster.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "rollout.num_engines" in proc.stderr and "-1" in proc.stderr and "Traceback" not in proc.stderr
    assert "ray" not in proc.stderr.lower()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_passes_validate_reference_checks(path, capsys):
    """Reward functions import and take their kwargs; the model folders are made by `aha make-tiny-model` /
    `aha convert-smollm2` (or live on the cluster), so files are not checked here."""
    assert main(["validate", str(path), "--no-check-files"]) == 0, capsys.readouterr().err


def test_validate_prints_resolved_config(capsys):
    args = [str(ROOT / "deploy/examples/cpu_demo.yaml"), "rollout.num_engines=2", "--no-check-files"]
    assert main(["validate", *args]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["num_engines"] == 2 and printed["learner"]["backend"] == "gloo"


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(ROOT / "deploy/examples/cpu_demo.yaml", ["rollout.num_engines"])


def test_every_field_is_documented():
    from pydantic import BaseModel

    def walk(model: type[BaseModel], prefix: str):
        for name, info in model.model_fields.items():
            assert info.description, f"{prefix}{name} has no docstring"
            ann = info.annotation
            for sub in getattr(ann, "__args__", ()) or (ann,):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{prefix}{name}.")

    walk(JobConfig, "")


def test_help_is_instant_and_complete():
    proc = subprocess.run(
        [sys.executable, "-m", "aha.cluster.cli", "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    for verb in ("validate", "run", "submit", "generate", "make-tiny-model", "convert-smollm2"):
        assert verb in proc.stdout


def test_configuration_reference_is_current():
    from aha.cluster.reference import config_reference

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_reference(), (
        "regenerate: python -m aha.cluster.reference > docs/configuration.md"
    )


def test_more_mini_batches_than_samples_is_rejected(tmp_path, capsys):
    # 8 prompts x 4 samples = 32 samples per step: 33 mini-batches would leave one empty
    args = ["validate", "--no-check-files", str(write(tmp_path, MINIMAL))]
    step = ["schedule.prompts_per_step=8", "rollout.samples_per_prompt=4"]
    assert main([*args, *step, "algorithm.mini_batches=33"]) == 2
    assert "algorithm.mini_batches" in capsys.readouterr().err
    assert main([*args, *step, "algorithm.mini_batches=32", "algorithm.epochs=2"]) == 0
