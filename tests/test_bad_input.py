"""A catalogue of bad input, each case through the entry point a user runs.

``tpgrpo <command>`` returns 2 and prints exactly one line, ``tpgrpo <command>: error: ...``,
naming the field or file and what was expected; the flows' entry points exit 2 with one line.
Nothing is half-written: the files of a run that existed before the failure (the workspace's
trained run, or the checkpoints of a run that fails mid-way) are byte for byte the same after it.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tpgrpo.checkpoint import latest_checkpoint, load_checkpoint
from tpgrpo.cli import main
from tpgrpo.rewards import RewardOutput, build_reward, register_reward

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_workspace  # noqa: E402


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_pipe) -> Path:
    """A tiny workspace whose run ``default`` trained one epoch: checkpoint, final weights,
    history, metrics and MLflow store exist, so every failure below has files it must not touch."""
    root = tmp_path_factory.mktemp("bad-input")
    params = tiny_workspace(root, tiny_pipe, train={"epochs": 1}, reward={"name": "brightness"})
    assert main(["train", "--params", str(params)]) == 0
    assert latest_checkpoint(root / "runs" / "default" / "checkpoints") is not None
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every directory and file under ``root`` by relative path: ``dir`` or the file's sha256 (run
    locks aside: ``runs/.<name>.lock`` beside a run directory is taken by any run of it)."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if not (p.name.startswith(".") and p.name.endswith(".lock"))
    }


PROGRESS = re.compile(r"^\S+ epoch \d+/\d+ \| |^\S+: \d+ epochs? of \d+ batch")


def _fails(capsys: pytest.CaptureFixture[str], ws: Path, argv: list[str], *expected: str) -> str:
    """Run ``tpgrpo argv``: exit status 2, nothing on stdout, one stderr line ``tpgrpo <command>:
    error: ...`` containing every ``expected`` text; the workspace's run files unchanged.
    Returns the line."""
    runs = ws / "runs"
    before = _snapshot(runs)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    # A run that fails mid-way has printed its start and epoch lines before the error.
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith(f"tpgrpo {argv[0]}: error: "), line
    for text in expected:
        assert text in line, (text, line)
    assert out == ""
    assert _snapshot(runs) == before, "run files changed"
    return line


def _train(ws: Path, *sets: str, params: Path | None = None, run_name: str | None = None) -> list[str]:
    argv = ["train", "--params", str(params or ws / "params.yaml")]
    if run_name:
        # Another run beside the trained one: changing the model or data of the trained run
        # would be refused as a changed configuration before these inputs are read.
        argv += ["--run-name", run_name]
    for item in sets:
        argv += ["--set", item]
    return argv


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# --------------------------------------------------------------------------- config


OVERRIDES = [
    # (--set item, what the line must say)
    ("credit.nope=1", ["override 'credit.nope': unknown key 'credit.nope'", "expected one of: mode, consistent"]),
    ("nope=1", ["unknown key 'nope'", "expected one of: seed, runs_dir, model"]),
    ("sample.num_steps=ten", ["sample.num_steps: input should be a valid integer, got 'ten'"]),
    ("train.learning_rate=[0.1, 0.2]", ["train.learning_rate: input should be a valid number, got [0.1, 0.2]"]),
    ("train.learning_rate=-1e-3", ["train.learning_rate: input should be greater than 0, got -0.001"]),
    ("sample.noise_level=-0.5", ["sample.noise_level: input should be greater than or equal to 0, got -0.5"]),
    ("sample.window_size=4", ["sample.window_size: expected window_start + window_size <= num_steps (3), got 0 + 4"]),
    ("sample.window_start=2", ["sample.window_size: expected window_start + window_size <= num_steps (3), got 2 + 2"]),
    ("sample.batch_size=5", ["sample.batch_size: expected a multiple of group_size (2), got 5"]),
    ("credit.mode=dense", ["credit.mode: input should be 'outcome', 'incremental' or 'turning_point', got 'dense'"]),
    ("sample.num_steps", ["override 'sample.num_steps': expected KEY=VALUE, e.g. credit.mode=incremental"]),
    ("sample.num_steps=[1,", ["override 'sample.num_steps=[1,': value is not a valid YAML scalar"]),
    ("credit.mode.x=1", ["override 'credit.mode.x': 'credit.mode' is a value, not a section"]),
    ("reward.name=nope", ["reward.name: unknown reward 'nope'; available: ", "brightness", "verifiable"]),
    ("eval.reward.name=nope", ["eval.reward.name: unknown reward 'nope'; available: "]),
    ("train.gradient_accumulation=2", ["train.gradient_accumulation: expected a divisor of sample.batches_per_epoch (1), got 2"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size: input should be greater than or equal to 1, got 0"]),
    ("train.ema_every=0", ["train.ema_every: input should be greater than or equal to 1, got 0"]),
    ("credit.balance_key=rank", ["credit.balance_key: input should be 'aggregated' or 'trajectory', got 'rank'"]),
    ("credit.balance_scope=gpu", ["credit.balance_scope: input should be 'batch' or 'process', got 'gpu'"]),
    ("sample.baseline_noise=fresh", ["sample.baseline_noise: input should be 'shared' or 'independent', got 'fresh'"]),
]


@pytest.mark.parametrize("item, expected", OVERRIDES, ids=[item for item, _ in OVERRIDES])
def test_bad_override(ws: Path, capsys: pytest.CaptureFixture[str], item: str, expected: list[str]) -> None:
    _fails(capsys, ws, _train(ws, item), f"{ws / 'params.yaml'}: ", *expected)


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("trian", {}, "trian: unknown key; expected one of: seed, runs_dir, model"),
        ("sample", {"num_step": 3}, "sample.num_step: unknown key; expected one of: num_steps, window_start"),
        ("credit", {"mode": "best"}, "credit.mode: input should be 'outcome', 'incremental' or 'turning_point', got 'best'"),
        ("sample", {"batch_size": 3, "group_size": 2}, "sample.batch_size: expected a multiple of group_size (2), got 3"),
    ],
    ids=["unknown-section", "unknown-key", "bad-literal", "batch-vs-group"],
)
def test_bad_params_file(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, values: dict, expected: str) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    _fails(capsys, ws, _train(ws, params=path), f"{path}: {expected}")


def test_unknown_variant(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(
        capsys, ws, [*_train(ws), "--variant", "tp_grpo_x"],
        "variant 'tp_grpo_x' is not defined under 'variants' (defined: flow_grpo, incremental, tp_grpo, tp_grpo_no_balance, tp_grpo_no_consistent, tp_grpo_no_first_step, tp_grpo_plain, tp_grpo_published)",
    )


# --------------------------------------------------------------------------- files


def test_missing_params_file(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ws, _train(ws, params=tmp_path / "nope.yaml"), f"{tmp_path / 'nope.yaml'}: params file not found")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sample:\n  num_steps: [3,\n", "not valid YAML (line 3)"),
        ("sample:\n\tnum_steps: 3\n", "not valid YAML (line 2)"),
        ("- sample\n", "expected a mapping of sections at the top level"),
    ],
    ids=["unclosed", "tab", "list"],
)
def test_params_not_valid_yaml(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    _fails(capsys, ws, _train(ws, params=path), f"{path}: {expected}")


def test_missing_base_model(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(
        capsys, ws, _train(ws, f"model.path={tmp_path / 'base'}", run_name="other"),
        f"model.path: {tmp_path / 'base'}: no such pipeline directory (set by --set model.path",
    )


def test_base_model_without_model_index(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ws / "base", tmp_path / "base")
    (tmp_path / "base" / "model_index.json").unlink()
    _fails(
        capsys, ws, _train(ws, f"model.path={tmp_path / 'base'}", run_name="other"),
        f"model.path: {tmp_path / 'base'}: not a diffusers pipeline directory (model_index.json missing)",
    )


def test_corrupt_base_model(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ws / "base", tmp_path / "base")
    weights = tmp_path / "base" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # model_index.json intact, weights truncated
    _fails(capsys, ws, _train(ws, f"model.path={tmp_path / 'base'}", run_name="other"), f"model.path: {tmp_path / 'base'}: cannot load pipeline", str(weights))


def _prompts(ws: Path, tmp_path: Path, train_text: str | None) -> Path:
    """A copy of the workspace's prompt sets with train.jsonl replaced (None: removed)."""
    shutil.copytree(ws / "prompts", tmp_path / "prompts")
    train = tmp_path / "prompts" / "train.jsonl"
    if train_text is None:
        train.unlink()
    else:
        train.write_text(train_text)
    return train


@pytest.mark.parametrize(
    "lines, expected",
    [
        (None, "train.jsonl: prompt file not found"),
        ([], "train.jsonl: prompt file is empty"),
        (["", "  "], "train.jsonl: prompt file is empty"),
        (["GOOD", "{\"prompt\": \"a red circle\"", "GOOD"], "train.jsonl:2: invalid JSON ("),
        (["GOOD", "GOOD", "{\"prompt\": 3}"], "train.jsonl:3: missing or empty string field 'prompt'"),
        (["[\"a red circle\"]"], "train.jsonl:1: expected a JSON object, got list"),
        (["GOOD", "{\"prompt\": \"one red circle\", \"kind\": \"counting\"}"], "train.jsonl:2: world metadata lacks key 'objects'"),
    ],
    ids=["missing", "empty", "blank", "bad-json", "no-prompt", "not-object", "bad-metadata"],
)
def test_bad_prompt_file(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str] | None, expected: str) -> None:
    good = (ws / "prompts" / "train.jsonl").read_text().splitlines()[0]
    text = None if lines is None else "".join((good if line == "GOOD" else line) + "\n" for line in lines)
    train = _prompts(ws, tmp_path, text)
    # World metadata is checked by the rewards that read it (the verifiable reward), when the
    # prompt set loads; the brightness reward of this workspace reads none.
    sets = [f"data.dir={train.parent}", *(["reward.name=verifiable"] if "metadata" in expected else [])]
    _fails(capsys, ws, _train(ws, *sets, run_name="other"), f"{train.parent}/{expected}")


def test_run_dir_not_writable(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # chmod does not stop root; a regular file where the runs directory should be stops anyone.
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory\n")
    _fails(capsys, ws, _train(ws, f"runs_dir={blocker}"), f"{blocker}/default: run directory is not writable (Not a directory)")
    assert blocker.read_text() == "not a directory\n"


# --------------------------------------------------------------------------- rewards


class _FailsOnceCheckpointed:
    """The brightness reward until the file ``after`` exists, then it raises; on failure it records
    the run directory as it was at that moment (``at_failure``)."""

    at_failure: dict[str, str] = {}

    def __init__(self, after: str, run_dir: str) -> None:
        self.after, self.run_dir, self.inner = Path(after), Path(run_dir), build_reward("brightness")

    def __call__(self, images, prompts, metadata):
        if self.after.exists():
            type(self).at_failure = _snapshot(self.run_dir)
            raise RuntimeError("scorer crashed\n(a second line the message must not carry)")
        return self.inner(images, prompts, metadata)


def _nonfinite():
    """Brightness with the first score of every call NaN and the last +Inf: one trajectory of each
    rollout batch gets a NaN reward, another an infinite one."""
    inner = build_reward("brightness")

    def score(images, prompts, metadata):
        out = inner(images, prompts, metadata)
        scores = out.scores.clone()
        scores[0], scores[-1] = float("nan"), float("inf")
        return RewardOutput(scores=scores, details=out.details)

    return score


register_reward("fails_once_checkpointed", _FailsOnceCheckpointed, overwrite=True)
register_reward("nonfinite", _nonfinite, overwrite=True)


def test_reward_raising_mid_run_fails_cleanly_and_keeps_the_checkpoint(ws: Path, tmp_path: Path, capsys) -> None:
    """Epoch 1 trains and checkpoints, then epoch 2's scoring raises: one line naming the reward,
    the error and the checkpoint a new start resumes from; the run directory as it was when the
    reward raised; the MLflow run FAILED."""
    from mlflow import MlflowClient

    run = tmp_path / "runs" / "default"
    latest = run / "checkpoints" / "latest"
    argv = _train(
        ws,
        f"runs_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=2",
        "reward.name=fails_once_checkpointed",
        f"reward.options.after={latest}",
        f"reward.options.run_dir={run}",
    )
    line = _fails(
        capsys, ws, argv,
        "reward.name: 'fails_once_checkpointed' raised while scoring epoch 2, batch 1: RuntimeError: scorer crashed "
        "(a second line the message must not carry); started again, the run resumes from "
        f"{run / 'checkpoints' / 'epoch-000001'}",
    )
    assert line.endswith("epoch-000001")
    assert _snapshot(run) == _FailsOnceCheckpointed.at_failure
    assert latest.read_text().strip() == "epoch-000001"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert load_checkpoint(run / "checkpoints" / "epoch-000001").epoch == 1  # complete: sizes and sha256 match
    assert not (run / "final").exists() and not (run / "metrics.json").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (failed,) = client.search_runs([client.get_experiment_by_name("tpgrpo").experiment_id])
    assert failed.info.status == "FAILED"


def test_nonfinite_rewards_are_dropped_and_counted(ws: Path, tmp_path: Path, capsys) -> None:
    argv = _train(
        ws,
        f"runs_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "reward.name=nonfinite",
        "eval.reward.name=brightness",
    )
    assert main(argv) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if not PROGRESS.match(line)] == []  # no warning
    run = tmp_path / "runs" / "default"
    with (run / "history.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert float(row["skipped/nonfinite"]) == 2  # of 4 trajectories: one NaN, one Inf
    assert math.isfinite(float(row["eval/reward"])) and math.isfinite(float(row["loss/total"]))
    final = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


# --------------------------------------------------------------------------- services


@pytest.mark.parametrize("where", ["inside-a-file", "proc"])
def test_mlflow_store_not_writable(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    if where == "inside-a-file":
        (tmp_path / "store").write_text("")
        db = tmp_path / "store" / "mlflow.db"
    else:
        db = Path("/proc/mlflow.db")  # no file can be created there, not even by root
    uri = f"sqlite:///{db}"
    _fails(
        capsys, ws, _train(ws, f"tracking.uri={uri}"),
        f"tracking.uri: {uri}: cannot write the MLflow database {db} (", "expected a writable file path or a tracking server URL",
    )


def test_mlflow_run_of_the_run_directory_missing(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """runs/default was logged to the workspace's store; another store (a changed tracking.uri, a
    deleted mlflow.db) does not hold its run."""
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    _fails(
        capsys, ws, _train(ws, f"tracking.uri={uri}"),
        f"{ws / 'runs' / 'default'}: its MLflow run ", f" is not in {uri} ",
        "set tracking.uri to the store it was logged to, or pass --restart",
    )


def test_params_file_missing_in_the_working_directory(ws: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ws, ["train"], f"params.yaml: params file not found in {tmp_path} (", "--params FILE")


@pytest.mark.parametrize("module", ["flows.ablation", "flows.serve"])
def test_prefect_api_unreachable(ws: Path, tmp_path: Path, module: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    args = {
        "flows.ablation": ["--params", str(ws / "params.yaml"), "--epochs", "1", "--reports-dir", str(tmp_path / "reports")],
        "flows.serve": [],
    }[module]
    before = _snapshot(ws / "runs")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"python -m {module}: error: Prefect API {url} does not answer ("), lines[0]
    assert lines[0].endswith("expected a running server: `prefect server start`, or point PREFECT_API_URL at one")
    assert proc.stdout == ""
    assert _snapshot(ws / "runs") == before and not (tmp_path / "reports").exists()


def test_unknown_study_name_is_one_line(ws: Path, tmp_path: Path) -> None:
    """Refused before the Prefect API is even asked (none runs here)."""
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{_closed_port()}/api", "PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.ablation", "--params", str(ws / "params.yaml"), "--study", "headlines"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["python -m flows.ablation: study 'headlines' is not defined under 'studies' (defined: ablation, headline, options, paper_hparams, published)"]
