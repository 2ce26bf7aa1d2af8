"""The tpgrpo command: subcommands, --help, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tpgrpo.cli import COMMANDS, main
from tpgrpo.errors import ModelLoadError, PromptFileError, UnknownRewardError, UserError
from tpgrpo.models import load_pipeline
from tpgrpo.rewards import build_reward
from tpgrpo.world import load_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_workspace  # noqa: E402


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpgrpo", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_prepare_writes_disjoint_prompt_sets(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  num_train: 40\n  num_test: 12\n")
    assert main(["prepare", "--params", str(tmp_path / "params.yaml"), "--set", f"data.dir={tmp_path / 'p'}"]) == 0
    train = load_prompts(tmp_path / "p" / "train.jsonl")
    test = load_prompts(tmp_path / "p" / "test.jsonl")
    assert (len(train), len(test)) == (40, 12)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    first = (tmp_path / "p" / "train.jsonl").read_bytes()
    main(["prepare", "--params", str(tmp_path / "params.yaml"), "--set", f"data.dir={tmp_path / 'p'}"])
    assert (tmp_path / "p" / "train.jsonl").read_bytes() == first  # deterministic: DVC caches it


def test_user_errors_share_one_base_class(tmp_path: Path) -> None:
    for error in (ModelLoadError, PromptFileError, UnknownRewardError):
        assert issubclass(error, UserError)
    with pytest.raises(UnknownRewardError, match="unknown reward 'nope'; available: .*verifiable"):
        build_reward("nope")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PromptFileError, match="empty.jsonl: prompt file is empty"):
        load_prompts(empty)
    with pytest.raises(ModelLoadError, match="no such pipeline directory"):
        load_pipeline(tmp_path / "models" / "base")


def test_cli_bad_override_is_one_line(tmp_path: Path) -> None:
    proc = _run("prepare", "--params", str(ROOT / "params.yaml"), "--set", "data.num_train=0", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"tpgrpo prepare: error: {ROOT / 'params.yaml'}: data.num_train: input should be greater than or equal to 1, got 0"
    )
    assert not (tmp_path / "data").exists()


def test_dvc_stage_commands_are_tpgrpo_subcommands() -> None:
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages keep their body under "do"
        cmd = stage["cmd"] if isinstance(stage["cmd"], str) else stage["cmd"][0]
        program, sub = cmd.split()[:2]
        assert program == "tpgrpo" and sub in COMMANDS, (name, cmd)


def test_train_then_evaluate_through_the_cli(tmp_path: Path, tiny_pipe, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    tiny_workspace(tmp_path, tiny_pipe, train={"epochs": 1}, eval={"num_steps": 3}, reward={"name": "brightness"})

    assert main(["train", "--params", str(tmp_path / "params.yaml"), "--variant", "flow_grpo"]) == 0
    assert "flow_grpo: 1 epoch in " in capsys.readouterr().out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tpgrpo").experiment_id])
    assert run.data.tags["variant"] == "flow_grpo" and run.info.status == "FINISHED"
    assert run.data.params["credit.mode"] == "outcome"

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--params", str(tmp_path / "params.yaml"), "--variant", "flow_grpo", "--out", str(out)]) == 0
    trained = json.loads(out.read_text())
    assert trained["model"] == "flow_grpo" and trained["prompts"] == 4
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"flow_grpo: eval reward {trained['reward']:.4f} on 4 test prompts", printed
    # diffusers' own LoRA loader reads the final weights and reproduces the trained model (up to
    # float rounding: peft applies the alpha / rank scaling in a different order).
    metrics = json.loads((tmp_path / "runs" / "flow_grpo" / "metrics.json").read_text())
    assert trained["reward"] == pytest.approx(metrics["eval_reward"], abs=2e-4)
    assert out.with_suffix(".png").is_file()

    assert main(["evaluate", "--params", str(tmp_path / "params.yaml"), "--variant", "incremental"]) == 2
    assert "runs/incremental/final: no trained weights" in capsys.readouterr().err


def test_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        assert load_config_from_file(str(path)).num_processes >= 2, path
