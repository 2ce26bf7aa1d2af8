"""`tpgrpo train` killed with SIGKILL in the middle of an epoch, started again: it resumes from its
newest complete checkpoint and ends with bitwise the weights, EMA and optimizer state of a run never
interrupted (with gradients accumulated over two batches and a sparse EMA cadence; a crash between
two accumulated batches of the update is in tests/test_update.py)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpgrpo.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_workspace  # noqa: E402

EPOCHS = 4
# A registered reward, so the subprocesses run the plain `python -m tpgrpo train`; file sizes
# differ between samples, so every group has a signal and the weights move each epoch.
SECTIONS = dict(
    # Two batches per optimizer step and an EMA update every other step: the resumed run must take
    # the step count and the EMA's cadence up where they were.
    train={"epochs": EPOCHS, "checkpoint_every": 1, "gradient_accumulation": 2, "ema_every": 2},
    sample={"batches_per_epoch": 4},  # epochs long enough to be killed in the middle of
    reward={"name": "jpeg_incompressibility"},
)


def _start(params: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        # One thread each: both runs do their float reductions in the same order, and two runs
        # share this box's two cores without oversubscribing them.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tpgrpo", "train", "--params", str(params)],
        cwd=params.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out


def _wait_for(path: Path, proc: subprocess.Popen, content: str | None = None, timeout: float = 300) -> float:
    """Poll until ``path`` exists (and holds ``content``); returns the time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.exists() if content is None else path.read_text().strip() == content:
                return time.monotonic()
        except OSError:
            pass
        assert proc.poll() is None, f"train exited early:\n{proc.communicate()[0]}"
        time.sleep(0.02)
    raise TimeoutError(f"{path} not written after {timeout:.0f} s")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[0]}"


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bitwise_identical(tmp_path: Path, tiny_pipe) -> None:
    killed_params = tiny_workspace(tmp_path / "killed", tiny_pipe, **SECTIONS)
    run = tmp_path / "killed" / "runs" / "default"
    ckpts = run / "checkpoints"

    proc = _start(killed_params)
    try:
        # Epoch 1 starts when the base model's evaluation grid is written and ends with its
        # checkpoint; kill a third of the way into the equally long epoch 2 (its second batch).
        started = _wait_for(run / "samples" / "epoch_0000.png", proc)
        ended = _wait_for(ckpts / "latest", proc, content="epoch-000001")
        time.sleep((ended - started) / 3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # Killed before epoch 2 was saved; whatever it left, only complete checkpoints count.
    assert (ckpts / "latest").read_text().strip() == "epoch-000001"
    assert sorted(p for p in ckpts.iterdir() if p.name.startswith("epoch-")) == [ckpts / "epoch-000001"]
    resumed_from = load_checkpoint(ckpts / "epoch-000001").weights  # complete: sizes and checksums verified
    # What a kill during the epoch-2 save would leave: a staging dir with a truncated file and
    # a pointer that was never renamed into place.
    staging = ckpts / ".tmp-epoch-000002"
    staging.mkdir(exist_ok=True)
    (staging / "weights.safetensors").write_bytes((ckpts / "epoch-000001" / "weights.safetensors").read_bytes()[:100])
    (ckpts / ".latest.tmp-999999").write_text("epoch-000002\n")
    assert latest_checkpoint(ckpts) == ckpts / "epoch-000001"

    resumed = _start(killed_params)
    straight = _start(tiny_workspace(tmp_path / "straight", tiny_pipe, **SECTIONS))
    _finish(resumed)
    _finish(straight)

    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch-000003", "epoch-000004", "latest"]
    assert latest_checkpoint(ckpts) == ckpts / f"epoch-{EPOCHS:06d}"
    other = tmp_path / "straight" / "runs" / "default"
    for name in ("weights", "ema", "optimizer"):
        _assert_same(
            _tensors(ckpts / f"epoch-{EPOCHS:06d}" / f"{name}.safetensors"),
            _tensors(other / "checkpoints" / f"epoch-{EPOCHS:06d}" / f"{name}.safetensors"),
            f"checkpoint {name}",
        )
    finals = sorted(p.name for p in (run / "final").glob("*.safetensors"))
    assert finals == sorted(p.name for p in (other / "final").glob("*.safetensors")) and finals
    for name in finals:
        _assert_same(_tensors(run / "final" / name), _tensors(other / "final" / name), f"final/{name}")
    assert _history(run) == _history(other) and len(_history(run)) == EPOCHS
    assert [float(row["optimizer/steps"]) for row in _history(run)] == [2.0 * (e + 1) for e in range(EPOCHS)]
    # It resumed rather than started over (which would end the same): one MLflow run, continued,
    # in which epoch 1 and the base model's evaluation were logged once.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("tpgrpo").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "reward/mean")].count(1) == 1
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "eval/reward")].count(0) == 1
    # The comparison has teeth: the weights moved after the checkpoint the run resumed from.
    last = load_checkpoint(ckpts / f"epoch-{EPOCHS:06d}").weights
    assert any(not torch.equal(resumed_from[n], last[n]) for n in resumed_from)
