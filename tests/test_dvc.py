"""`dvc repro` of the real pipeline, on a tiny budget, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"num_train": 24, "num_test": 4},
    "pretrain": {
        "num_train_images": 64, "vae_steps": 3, "vae_batch_size": 8, "vae_test_images": 8,
        "transformer_steps": 3, "batch_size": 8, "warmup_steps": 1,
    },
    "sample": {"num_steps": 3, "window_size": 2, "batch_size": 4, "group_size": 2, "batches_per_epoch": 1},
    "train": {"epochs": 1},
    "eval": {"num_steps": 2, "batch_size": 4},
}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_a_no_op(tmp_path: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    repo = tmp_path / "repo"
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("reports/", "runs/", "ablation/")) and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = _merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "copy"], repo, env)
    dvc = [sys.executable, "-m", "dvc"]

    _run([*dvc, "repro"], repo, env)
    variants = params["pipeline"]["variants"]
    assert (repo / "data" / "prompts" / "test.jsonl").is_file()
    assert (repo / "models" / "base" / "model_index.json").is_file()
    for variant in variants:
        metrics = json.loads((repo / "runs" / variant / "metrics.json").read_text())
        assert metrics["epochs"] == 1 and 0.0 <= metrics["eval_reward"] <= 1.0
        assert (repo / "runs" / variant / "final" / "pytorch_lora_weights.safetensors").is_file()
        exported = json.loads((repo / "runs" / variant / "eval.json").read_text())
        assert exported["model"] == variant and 0.0 <= exported["reward"] <= 1.0
    table = (repo / "reports" / "ablation.md").read_text()
    assert all(f"| {v} |" in table for v in variants) and "exported weights" in table
    assert (repo / "reports" / "ablation.json").is_file()

    again = _run([*dvc, "repro"], repo, env)
    assert "Data and pipelines are up to date" in again, again

    for command in (["metrics", "show", "--json"], ["exp", "show", "--json"]):
        text = _run([*dvc, *command], repo, env)
        assert all(f"runs/{v}/summary.json" in text for v in variants), command
