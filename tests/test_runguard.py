"""Run guards: the recorded configuration of a run (hash, differences, the resume error) and the
per-run lock (exclusive, one line when refused, released when its holder dies)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpgrpo.config import ExperimentConfig
from tpgrpo.errors import UserError
from tpgrpo.runguard import (
    ABSENT,
    FieldChange,
    RunLock,
    check_resume,
    config_differences,
    lock_path,
    result_fields,
    run_config,
    write_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**sections) -> ExperimentConfig:
    return ExperimentConfig.model_validate(sections)


# ---------------------------------------------------------------- the recorded configuration


def test_hash_is_stable_across_key_order_and_changes_with_a_value() -> None:
    rc = run_config(_cfg())
    fields = rc.fields
    assert list(fields) == sorted(fields)
    assert "credit.mode" in fields and "train.learning_rate" in fields
    reordered = dict(reversed(list(fields.items())))
    assert run_config(_FakeCfg(reordered)).hash == rc.hash
    assert run_config(_cfg()).hash == rc.hash  # deterministic across calls
    changed = run_config(_cfg(credit={"mode": "outcome"}))
    assert changed.hash != rc.hash
    assert run_config(_cfg(train={"learning_rate": rc.fields["train.learning_rate"] * 2})).hash != rc.hash
    json.dumps(rc.fields)  # JSON-safe


class _FakeCfg:
    def __init__(self, flat: dict) -> None:
        self._flat = flat

    def flat(self) -> dict:
        return self._flat


def test_fields_are_json_safe() -> None:
    rc = run_config(_FakeCfg({"b.x": (1, 2), "a.p": Path("models/base")}))
    assert rc.fields == {"a.p": "models/base", "b.x": [1, 2]}
    assert list(rc.fields) == ["a.p", "b.x"]


def test_write_is_atomic_and_sorted(tmp_path: Path) -> None:
    rc = run_config(_cfg(credit={"mode": "outcome"}))
    run_dir = tmp_path / "runs" / "tp_grpo"
    path = write_run_config(run_dir, rc)
    assert path == run_dir / "config.json"
    data = json.loads(path.read_text())
    assert data == {"fields": rc.fields, "hash": rc.hash}
    assert path.read_text() == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert [p.name for p in run_dir.iterdir()] == ["config.json"]  # no temp file left behind


# ---------------------------------------------------------------- differences and the resume check


def test_resumable_fields_are_ignored() -> None:
    before = run_config(_cfg()).fields
    after = run_config(
        _cfg(
            runs_dir="elsewhere",
            train={"epochs": 99, "time_budget_minutes": 5, "checkpoint_every": 3, "num_threads": 2},
            eval={"every": 7, "batch_size": 3},
            tracking={"uri": "sqlite:///other.db", "experiment": "x"},
            model={"offload_text_encoders": True, "offload_vae": True},
            sample={"cache_text_embeddings": True, "text_embedding_cache_size": 5},
        )
    ).fields
    changed = {k for k in before if before[k] != after[k]}
    assert len(changed) == 13, changed  # each override really changed its field
    assert config_differences(before, after) == []
    # What a checkpoint records: the same for both, so a clone elsewhere writes the same bytes.
    assert result_fields(before) == result_fields(after)
    assert "seed" in result_fields(before) and not set(result_fields(before)) & changed
    check_resume(before, after, Path("runs/tp_grpo"))  # does not raise


def test_result_fields_and_missing_keys_are_differences() -> None:
    before = run_config(_cfg()).fields
    after = run_config(_cfg(credit={"mode": "outcome"}, train={"epochs": 2})).fields
    assert config_differences(before, after) == [FieldChange("credit.mode", "turning_point", "outcome")]
    # a prefix entry ("tracking.") does not cover a look-alike name
    assert config_differences({"trackingx": 1}, {"trackingx": 2}) == [FieldChange("trackingx", 1, 2)]
    assert config_differences({"a.b": 1}, {"a.c": 1}) == [
        FieldChange("a.b", 1, ABSENT),
        FieldChange("a.c", ABSENT, 1),
    ]


def test_resume_error_is_one_line_naming_every_changed_field() -> None:
    before = run_config(_cfg(train={"learning_rate": 0.003})).fields
    after = run_config(_cfg(credit={"mode": "outcome"}, train={"learning_rate": 0.001, "epochs": 2})).fields
    with pytest.raises(UserError) as info:
        check_resume(before, after, Path("runs") / "tp_grpo")
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "runs/tp_grpo: resuming with a different configuration "
        "(credit.mode: 'turning_point' -> 'outcome'; train.learning_rate: 0.003 -> 0.001); "
        "pass --restart to start over, or --run-name NAME to train this configuration as a separate run"
    )


def test_resume_error_names_five_fields_then_counts_the_rest() -> None:
    before = {f"f.{i}": i for i in range(8)} | {"a": "x"}
    after = {f"f.{i}": i + 1 for i in range(8)} | {"a": "two\nlines"}
    with pytest.raises(UserError) as info:
        check_resume(before, after, "runs/x")
    message = str(info.value)
    assert "\n" not in message
    assert "(a: 'x' -> 'two\\nlines'; f.0: 0 -> 1; f.1: 1 -> 2; f.2: 2 -> 3; f.3: 3 -> 4; and 4 more); " in message
    assert "f.4" not in message


# ---------------------------------------------------------------- the lock


def test_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with RunLock(runs, "tp_grpo") as lock:
        assert lock.held and lock_path(runs, "tp_grpo") == runs / ".tp_grpo.lock"
        holder = json.loads((runs / ".tp_grpo.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["since"]
        with pytest.raises(UserError) as info:
            RunLock(runs, "tp_grpo").acquire()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{runs / 'tp_grpo'}: another training process holds this run (pid {os.getpid()} on host ")
        assert message.endswith("); wait for it to finish or stop it")
        with RunLock(runs, "other"):  # another run is independent
            pass
    assert not (runs / "tp_grpo").exists()  # the lock lives beside the run directory
    with RunLock(runs, "tp_grpo"):  # released on exit
        pass


def test_lock_survives_deleting_the_run_directory(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "tp_grpo" / "checkpoints").mkdir(parents=True)
    with RunLock(runs, "tp_grpo"):
        import shutil

        shutil.rmtree(runs / "tp_grpo")  # --restart under the lock
        with pytest.raises(UserError, match="another training process holds this run"):
            RunLock(runs, "tp_grpo").acquire()


def test_invalid_run_names_are_refused(tmp_path: Path) -> None:
    for bad in ("", "..", ".hidden", "a/b"):
        with pytest.raises(UserError, match="run name"):
            RunLock(tmp_path, bad)


_HOLDER = """
import sys, time
from tpgrpo.runguard import RunLock
lock = RunLock(sys.argv[1], "tp_grpo").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_held_by_another_process_then_freed_by_its_death(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(runs)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as info:
            RunLock(runs, "tp_grpo").acquire()
        message = str(info.value)
        assert f"(pid {proc.pid} on host " in message and "\n" not in message
        assert not (runs / "tp_grpo").exists()  # a refused process leaves the run untouched
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while True:  # the kernel releases the flock as the process exits
            try:
                lock = RunLock(runs, "tp_grpo").acquire()
                break
            except UserError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert json.loads((runs / ".tp_grpo.lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ---------------------------------------------------------------- the command line


def test_train_run_name_is_passed_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`tpgrpo train --run-name NAME` trains the variant as the run NAME (no model is trained)."""
    import types

    import tpgrpo.cli as cli

    calls: list[dict] = []

    class _Stop(Exception):
        pass

    def fake_train_variant_run(cfg, **kwargs):
        calls.append(kwargs)
        raise _Stop

    # A stand-in for tpgrpo.trainer: cmd_train imports train_variant_run from it when it runs.
    fake_trainer = types.ModuleType("tpgrpo.trainer")
    fake_trainer.train_variant_run = fake_train_variant_run
    monkeypatch.setitem(sys.modules, "tpgrpo.trainer", fake_trainer)
    monkeypatch.setattr(cli, "_require_model", lambda cfg, args: None)
    params = str(ROOT / "params.yaml")
    for argv, expected in (
        (["--variant", "tp_grpo", "--run-name", "tp_grpo_outcome"], ("tp_grpo_outcome", "tp_grpo")),
        (["--variant", "tp_grpo"], ("tp_grpo", "tp_grpo")),
    ):
        with pytest.raises(_Stop):
            cli.main(["train", "--params", params, *argv])
        assert (calls[-1]["name"], calls[-1]["variant"]) == expected
    assert cli.main(["train", "--params", params, "--run-name", "../escape"]) == 2
    assert len(calls) == 2
