"""The typed config: the shipped params.yaml, one-line errors, overrides and variants."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tpgrpo.cli import main
from tpgrpo.config import ConfigError, apply_overrides, config_from_dict, load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_match_the_design_defaults() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.credit.to_credit_config().mode == "turning_point"
    assert (cfg.sample.num_steps, cfg.sample.window_size, cfg.sample.noise_level) == (10, 9, 0.7)
    # cps with the sampler's default log-prob form (unnormalized, see tpgrpo.sde).
    assert (cfg.sample.sampler, cfg.sample.log_prob) == ("cps", None)
    assert set(cfg.variants) >= {"flow_grpo", "incremental", "tp_grpo", "tp_grpo_plain"}
    # The relative sqlite URI is anchored at the params file, so `dvc exp` temp copies share it.
    assert cfg.tracking.uri == f"sqlite:///{ROOT / 'mlflow.db'}"


def test_variants_apply_their_overrides() -> None:
    flow = load_config(ROOT / "params.yaml", variant="flow_grpo")
    assert flow.credit.mode == "outcome"
    plain = load_config(ROOT / "params.yaml", variant="tp_grpo_plain")
    assert (plain.credit.consistent, plain.credit.first_step, plain.credit.balance) == (False, False, False)


def test_overrides_parse_yaml_scalars_and_apply_last() -> None:
    cfg = load_config(
        ROOT / "params.yaml",
        variant="flow_grpo",
        overrides=["credit.mode=incremental", "sample.noise_level=0.5", "train.lora_rank=null", "train.learning_rate=1e-5"],
    )
    assert cfg.credit.mode == "incremental"
    assert cfg.sample.noise_level == 0.5
    assert cfg.train.lora_rank is None
    assert cfg.train.learning_rate == 1e-5


def test_reward_options_take_free_keys() -> None:
    raw = apply_overrides({"reward": {"name": "verifiable"}}, ["reward.options.threshold=0.3"])
    assert raw == {"reward": {"name": "verifiable", "options": {"threshold": 0.3}}}
    assert config_from_dict(raw).reward.options == {"threshold": 0.3}


def test_overrides_step_into_an_optional_section() -> None:
    raw = apply_overrides({}, ["eval.reward.name=verifiable", "eval.reward.options.soft=true"])
    assert raw == {"eval": {"reward": {"name": "verifiable", "options": {"soft": True}}}}
    assert config_from_dict(raw).eval.reward.options == {"soft": True}
    assert config_from_dict({}).eval.reward is None  # None: evaluation scores the training reward
    with pytest.raises(ConfigError, match=r"unknown key 'eval.reward.nme'"):
        apply_overrides({}, ["eval.reward.nme=verifiable"])


def test_exponent_without_dot_is_a_float() -> None:
    assert parse_yaml("lr: 3e-4") == {"lr": 3e-4}


def test_flat_names_are_dotted() -> None:
    flat = config_from_dict({}).flat()
    assert flat["credit.mode"] == "turning_point"
    assert flat["sample.window_size"] == 9
    assert not any(k.startswith("variants") for k in flat)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sample": {"window_size": 12}}, "sample.window_size: expected window_start + window_size <= num_steps (10), got 0 + 12"),
        ({"sample": {"window_start": 2, "window_size": 9}}, "sample.window_size: expected"),
        ({"sample": {"noise_level": -0.1}}, "sample.noise_level: input should be greater than or equal to 0, got -0.1"),
        ({"sample": {"num_steps": "ten"}}, "sample.num_steps: input should be a valid integer, got 'ten'"),
        ({"sample": {"num_steps": "10"}}, "sample.num_steps: input should be a valid integer"),
        ({"sample": {"batch_size": 10, "group_size": 4}}, "sample.batch_size: expected a multiple of group_size (4), got 10"),
        ({"sample": {"group_size": 1}}, "sample.group_size: input should be greater than or equal to 2"),
        ({"sample": {"sampler": "ddim"}}, "sample.sampler: input should be 'sde' or 'cps'"),
        ({"sample": {"log_prob": "gaussian", "window_size": 10}}, "sample.log_prob: gaussian is undefined for cps at the last step"),
        ({"credit": {"mode": "dense"}}, "credit.mode: input should be 'outcome', 'incremental' or 'turning_point'"),
        ({"credit": {"balance": "yes"}}, "credit.balance: input should be a valid boolean"),
        ({"credit": {"typo": 1}}, "credit.typo: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"lora_targets": []}}, "train.lora_targets: list should have at least 1 item"),
        ({"model": {"resolution": 50}}, "model.resolution: input should be a multiple of 16"),
        ({"variants": {"bad": {"credit.mode": "x"}}}, "variants.bad: credit.mode: input should be"),
        ({"variants": {"bad": {"credit.nope": 1}}}, "variants.bad: override 'credit.nope': unknown key 'credit.nope'"),
        ({"variants": {"a": {}}, "pipeline": {"variants": ["a", "b"]}}, "pipeline.variants: 'b' is not defined under 'variants' (defined: a)"),
        ({"variants": {"a": {}}, "pipeline": {"variants": ["a", "a"]}}, "pipeline.variants: expected distinct names"),
        ({"variants": {"a": {}}, "ablation": {"variants": ["c"]}}, "ablation.variants: 'c' is not defined under 'variants'"),
        ({"variants": {"a": {}}, "ablation": {"variants": ["a"], "reference": "b"}}, "ablation.reference: expected one of ablation.variants (a), got 'b'"),
        ({"ablation": {"seeds": [1, 1]}}, "ablation.seeds: expected distinct seeds, got [1, 1]"),
        ({"ablation": {"seeds": []}}, "ablation.seeds: list should have at least 1 item"),
        ({"ablation": {"max_parallel": 0}}, "ablation.max_parallel: input should be greater than or equal to 1"),
        ({"variants": {"a": {}}, "ablation": {"variants": ["a"], "reference": "a", "overrides": {"eval.evry": 2}}},
         "ablation.overrides: override 'eval.evry': unknown key 'eval.evry'"),
        ({"variants": {"a": {}}, "ablation": {"variants": ["a"], "reference": "a", "overrides": {"eval.every": 0}}},
         "ablation.overrides: eval.every: input should be greater than or equal to 1"),
        ({"train": {"num_threads": -1}}, "train.num_threads: input should be greater than or equal to 0"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="params.yaml")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("params.yaml: " + message), text


@pytest.mark.parametrize(
    "override, message",
    [
        ("credit.nope=1", "unknown key 'credit.nope'"),
        ("credit", "expected KEY=VALUE"),
        ("credit.mode.x=1", "'credit.mode' is a value, not a section"),
        ("..=1", "expected a dotted key"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, overrides=[override])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sample:\n  num_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line \d+\)"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_study_sections_of_the_shipped_params(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.pipeline.variants == ["flow_grpo", "tp_grpo"]
    study = cfg.ablation
    assert study.reference == "flow_grpo" and len(study.seeds) >= 3 and cfg.seed not in study.seeds
    assert {"flow_grpo", "incremental", "tp_grpo"} <= set(study.variants)
    removed = {name: cfg.variants[name] for name in study.variants if name.startswith("tp_grpo_no_")}
    assert removed == {
        "tp_grpo_no_consistent": {"credit.consistent": False},
        "tp_grpo_no_first_step": {"credit.first_step": False},
        "tp_grpo_no_balance": {"credit.balance": False},
    }
    # Relative study directories are anchored at the params file, wherever the flow runs.
    assert study.runs_dir == str((ROOT / "ablation" / "runs").resolve())
    moved = tmp_path / "elsewhere" / "params.yaml"
    moved.parent.mkdir()
    moved.write_text((ROOT / "params.yaml").read_text())
    assert load_config(moved).ablation.reports_dir == str(tmp_path / "elsewhere" / "ablation" / "reports")
    # The overrides reach a run as KEY=VALUE strings that parse back to the same values.
    assert study.override_list() == ["eval.every=2", "train.num_threads=1"]  # no epochs or eval_prompts of its own
    run = load_config(ROOT / "params.yaml", variant="tp_grpo", overrides=study.override_list())
    assert run.eval.every == 2 and run.train.num_threads == 1
    assert not any(k.startswith(("pipeline", "ablation", "studies")) for k in cfg.flat())


def test_named_studies_of_the_shipped_params() -> None:
    """The studies the README reports: their sizes, seeds never the tuning seed, the published
    optimisation of paper_hparams, and shared runs between headline and options."""
    cfg = load_config(ROOT / "params.yaml")
    headline = cfg.study("headline")
    assert headline.variants == ["flow_grpo", "tp_grpo"] and headline.reference == "flow_grpo"
    assert len(headline.seeds) >= 12 and headline.eval_prompts >= 1024 and cfg.data.num_test >= headline.eval_prompts
    options, published, paper = cfg.study("options"), cfg.study("published"), cfg.study("paper_hparams")
    assert options.reference == "tp_grpo" and set(options.variants) == {
        "tp_grpo", "tp_grpo_no_consistent", "tp_grpo_no_first_step", "tp_grpo_no_balance"
    }
    assert set(published.variants) == {"flow_grpo", "tp_grpo", "tp_grpo_published"}
    for study in (options, published, paper):
        assert len(study.seeds) >= 6 and set(study.seeds) <= set(headline.seeds)
    for study in (headline, options, published, paper, cfg.ablation):
        assert cfg.seed not in study.seeds
    # options and published run tp_grpo exactly as the headline does: one run per seed.
    assert options.override_list() == headline.override_list() == published.override_list()
    run = load_config(ROOT / "params.yaml", variant="flow_grpo", overrides=paper.override_list())
    assert run.sample.group_size == 24 and run.advantage.global_std is False
    assert run.train.clip_range == 1e-5 and run.train.kl_beta == 1e-4
    assert run.sample.batches_per_epoch // run.train.gradient_accumulation == 2  # optimizer steps per epoch
    assert cfg.study(None) is cfg.study("ablation") is cfg.ablation


def test_named_study_errors_are_one_line(tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())

    def load(studies):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**base, "studies": studies}))
        return load_config(path)

    with pytest.raises(ConfigError, match=r"study 'nope' is not defined under 'studies' \(defined: ablation, mine\)$"):
        load({"mine": {"variants": ["tp_grpo"], "reference": "tp_grpo"}}).study("nope")
    cases = {
        "studies.mine.variants: 'tp-grpo' is not defined under 'variants'": {"mine": {"variants": ["tp-grpo"]}},
        "studies.mine.reference: expected one of studies.mine.variants": {"mine": {"variants": ["tp_grpo"]}},
        "studies.mine.overrides: override 'train.nope'": {"mine": {"variants": ["flow_grpo"], "overrides": {"train.nope": 1}}},
        "studies.mine.eval_prompts": {"mine": {"variants": ["flow_grpo"], "eval_prompts": 0}},
        "studies.mine.seeds: expected distinct seeds": {"mine": {"variants": ["flow_grpo"], "seeds": [1, 1]}},
        "studies.ablation: reserved for the default study": {"ablation": {"variants": ["flow_grpo"]}},
    }
    for message, studies in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load(studies)
        assert "\n" not in str(info.value)


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="variant 'nope' is not defined under 'variants' \\(defined: flow_grpo"):
        load_config(ROOT / "params.yaml", variant="nope")


def test_cli_check_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--params", str(ROOT / "params.yaml"), "--variant", "incremental"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["credit"]["mode"] == "incremental"


def test_cli_error_is_one_line_with_exit_status_2(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("sample:\n  noise_level: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tpgrpo", "check", "--params", str(params)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "sample.noise_level" in proc.stderr and proc.stdout == ""
