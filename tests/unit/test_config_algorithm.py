"""Algorithm knobs that cannot act: refused at validation, naming the knob and why, when moved off their default;
at epochs x mini_batches = 1, where the clips cannot bind, said by `aha validate`. A run's own config.yaml (every
field written out) still validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aha.cluster.cli import main
from aha.cluster.config import JobConfig
from aha.cluster.config_file import ConfigError, dump_config, load_config
from aha.learner.config import AlgorithmConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
MINIMAL = {
    "model": {"path": "models/x"},
    "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
}


def job(tmp_path, overrides: list[str], data: dict = MINIMAL) -> JobConfig:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, overrides)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["algorithm.loss=pg", "algorithm.clip_eps=0.1"], "algorithm.clip_eps does nothing with loss pg"),
        (["algorithm.loss=pg", "algorithm.clip_eps_high=0.3"], "algorithm.clip_eps_high does nothing"),
        (["algorithm.loss=sft", "algorithm.clip_eps=0.1"], "algorithm.clip_eps does nothing with loss sft"),
        (["algorithm.loss=sft", "algorithm.kl_coef=0.1"], "algorithm.kl_coef does nothing with loss sft"),
        (["algorithm.loss=cispo", "algorithm.dual_clip=3"], "algorithm.dual_clip does nothing"),
        (["algorithm.off_policy=none", "algorithm.tis_cap=3"], "algorithm.tis_cap does nothing"),
        (["algorithm.kl_estimator=k2"], "algorithm.kl_estimator does nothing with kl_coef 0"),
        (["algorithm.kl_ratio_weighted=true"], "algorithm.kl_ratio_weighted does nothing"),
        (["algorithm.kl_reference=model"], "algorithm.kl_reference does nothing"),
        (["algorithm.filter_threshold=0.5"], "algorithm.filter_threshold does nothing with advantage grpo"),
        (["algorithm.advantage=rloo", "algorithm.std_eps=1e-4"], "algorithm.std_eps does nothing"),
        (["algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1"], "k1 without kl_ratio_weighted"),
        (["algorithm.loss=gspo", "algorithm.loss_agg=token_mean"], "gspo with loss_agg token_mean"),
        (["algorithm.loss=gspo", "algorithm.loss_agg=constant"], "gspo with loss_agg constant"),
    ],
)
def test_a_knob_that_cannot_act_is_refused_by_name(tmp_path, overrides, names):
    with pytest.raises(ConfigError, match=names):
        job(tmp_path, overrides)


def test_the_same_knobs_validate_where_they_act(tmp_path):
    job(tmp_path, ["algorithm.loss=ppo", "algorithm.clip_eps=0.1", "algorithm.dual_clip=3"])
    job(tmp_path, ["algorithm.loss=cispo", "algorithm.clip_eps=1.0", "algorithm.clip_eps_high=0.3"])
    job(tmp_path, ["algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1", "algorithm.kl_ratio_weighted=true"])
    job(tmp_path, ["algorithm.kl_coef=0.1", "algorithm.kl_estimator=k2", "algorithm.kl_reference=model"])
    job(tmp_path, ["algorithm.advantage=filter", "algorithm.filter_threshold=0.5"])
    job(tmp_path, ["algorithm.advantage=reinforce_pp_baseline", "algorithm.std_eps=1e-4"])
    job(tmp_path, ["algorithm.off_policy=decoupled", "algorithm.tis_cap=5"])
    # a knob at its default is never refused: it may be written out, as a run's config.yaml writes every field
    job(tmp_path, ["algorithm.loss=pg", "algorithm.clip_eps=0.2", "algorithm.kl_estimator=k3"])


def test_gspo_takes_its_papers_sequence_level_aggregation(tmp_path):
    assert job(tmp_path, ["algorithm.loss=gspo"]).algorithm.loss_agg == "seq_mean"
    assert AlgorithmConfig(loss="gspo").loss_agg == "seq_mean"
    assert AlgorithmConfig().loss_agg == "token_mean"


@pytest.mark.parametrize("overrides", [[], ["algorithm.loss=gspo"], ["algorithm.loss=pg"]])
def test_a_runs_written_out_config_validates_again(tmp_path, overrides):
    cfg = job(tmp_path, overrides).resolved()
    assert JobConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_examples_written_out_config_validates_again(path):
    cfg = load_config(path).resolved()
    assert JobConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_lora_dropout_is_refused_without_imitation(tmp_path):
    with pytest.raises(ConfigError, match="learner.lora.dropout does nothing without imitation"):
        job(tmp_path, ["learner.lora={dropout: 0.1}"])
    job(tmp_path, ["learner.lora={dropout: 0.1}", "imitation.steps=5"])
    job(tmp_path, ["learner.lora={dropout: 0.0}"])


def validate(tmp_path, capsys, overrides: list[str]) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["validate", "--no-check-files", str(path), *overrides]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("aha: note:")]


def test_validate_says_which_clips_cannot_act_at_one_update_per_step(tmp_path, capsys):
    assert validate(tmp_path, capsys, []) == []  # the default, ppo at 1 x 1, is left alone
    notes = validate(
        tmp_path, capsys, ["algorithm.loss=ppo", "algorithm.clip_eps=0.1", "algorithm.dual_clip=3"]
    )
    assert len(notes) == 3 and all("ratio pi_theta / pi_old is exactly 1" in n for n in notes)
    assert any("algorithm.clip_eps:" in n for n in notes) and any("algorithm.dual_clip:" in n for n in notes)
    assert "its gradient is pg's" in notes[0]
    assert validate(tmp_path, capsys, ["algorithm.clip_eps=0.1", "algorithm.epochs=2"]) == []
    assert validate(tmp_path, capsys, ["algorithm.clip_eps=0.1", "algorithm.mini_batches=2"]) == []
    assert validate(tmp_path, capsys, ["algorithm.loss=pg"]) == []
