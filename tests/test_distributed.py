"""Two processes under `accelerate launch` (gloo on CPU) train together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_processes_share_groups_and_end_with_equal_weights(tmp_path: Path, tiny_pipe) -> None:
    from tpgrpo.models import save_pipeline
    from tpgrpo.world import write_prompt_sets

    save_pipeline(tiny_pipe, tmp_path / "base")
    write_prompt_sets(tmp_path / "prompts", n_train=32, n_test=4, seed=0)
    config = {
        "seed": 1,
        "runs_dir": str(tmp_path / "runs"),
        "model": {"path": str(tmp_path / "base"), "resolution": 32},
        "data": {"dir": str(tmp_path / "prompts")},
        "sample": {"num_steps": 4, "window_size": 3, "batch_size": 8, "group_size": 4, "batches_per_epoch": 2},
        # Two batches accumulated into one step, in micro-batches of one row: the gradients must be
        # reduced across the processes exactly once, in the step's last backward, or the
        # processes end with different weights. Balancing within each process's slice as well.
        "train": {"epochs": 1, "learning_rate": 1e-2, "clip_range": 0.2, "lora_rank": 2,
                  "gradient_accumulation": 2, "micro_batch_size": 1},
        "credit": {"balance_scope": "process"},
        "reward": {"name": "brightness"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "29517",
            str(HERE / "distributed_worker.py"), str(tmp_path / "config.json"), str(tmp_path),
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(r["straddling_groups"] for r in reports) > 0, "no group spans both processes: the test proves nothing"
    assert all(r["matches_gathered"] for r in reports)
    assert any(r["local_only_differs"] for r in reports)
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert any(w0[n].abs().sum() > 0 for n in w0 if "lora_B" in n)  # trained: B starts at zero
