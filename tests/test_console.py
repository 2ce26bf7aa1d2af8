"""What runs print: the epoch line, progress off a terminal, the command line's fast paths."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tpgrpo import __version__, console
from tpgrpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The ``tpgrpo`` logger's lines, as the command line prints them, into a string (not a
    terminal, like a redirected log file)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    monkeypatch.setattr(console.log, "handlers", [handler])
    monkeypatch.setattr(console.log, "level", logging.INFO)
    return stream


def test_epoch_line_worked_by_hand() -> None:
    row = {
        "reward/mean": 0.61234,
        "eval/reward": 0.5277,
        "turning/rate": 0.0987,
        "time/rollout_s": 3.04,
        "time/update_s": 2.26,
        "time/minutes": 1.234,
    }
    assert console.epoch_line("tp_grpo", 10, 10, row, 0.4817) == (
        "tp_grpo epoch 10/10 | train reward 0.612 | eval reward 0.5277 (+0.0460 vs base) | "
        "turning points 9.9% | 3.0 s rollout, 2.3 s update | 1.2 min"
    )
    # Flow-GRPO has no turning points; an epoch without evaluation shows none.
    assert console.epoch_line("flow_grpo", 3, 10, {"reward/mean": 0.5, "time/minutes": 0.5}, 0.48) == (
        "flow_grpo epoch 3/10 | train reward 0.500 | 0.5 min"
    )


def test_plural() -> None:
    assert [console.plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert [console.plural(n, "batch", "batches") for n in (1, 2)] == ["1 batch", "2 batches"]


def test_progress_off_a_terminal_is_a_few_whole_lines(captured: io.StringIO) -> None:
    bar = console.progress(range(1000), "vae", lines=10)
    seen = 0
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
        seen += 1
    assert seen == 1000
    lines = captured.getvalue().splitlines()
    assert "\r" not in captured.getvalue() and len(lines) == 10
    assert lines[0].startswith("vae: 100/1000 (10%), ") and lines[0].endswith(", loss=0.0100")
    assert lines[-1].startswith("vae: 1000/1000 (100%), ") and lines[-1].endswith(", loss=0.0010")


def test_progress_disabled_prints_nothing(captured: io.StringIO) -> None:
    assert list(console.progress(range(5), "x", enabled=False)) == list(range(5))
    assert captured.getvalue() == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tpgrpo {__version__} (python ") and "torch " in out and "diffusers " in out
    assert len(out.splitlines()) == 1
    import tomllib

    assert __version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("command", ["train", "evaluate", "check"])
def test_config_errors_come_before_torch(command: str) -> None:
    """A typo is reported without loading torch or diffusers (seconds of imports)."""
    code = (
        "import sys; from tpgrpo.cli import main; "
        f"rc = main(['{command}', '--set', 'train.epoch=3']); "
        "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    assert "unknown key 'train.epoch'" in out.stderr


def test_evaluation_summary_is_readable() -> None:
    from tpgrpo.cli import _evaluation_summary

    text = _evaluation_summary("tp_grpo", 0.52771, 256, {"color": 0.755859375, "background": 1.0})
    assert text == "tp_grpo: eval reward 0.5277 on 256 test prompts\n  color       0.7559\n  background  1.0000"


def test_train_prints_one_line_per_epoch(tmp_path: Path, tiny_pipe, capsys: pytest.CaptureFixture[str]) -> None:
    """``tpgrpo train`` off a terminal: a start line, the base model's evaluation, one line per
    epoch, the result; every line whole (no carriage-return redraws) and short."""
    from conftest import tiny_workspace

    params = tiny_workspace(tmp_path, tiny_pipe, train={"epochs": 2}, eval={"every": 2, "num_prompts": 2, "heldin_prompts": 0})
    assert main(["train", "--params", str(params), "--variant", "tp_grpo"]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert "\r" not in err and all(len(line) < 300 for line in lines), err
    assert lines[0].startswith("tp_grpo: 2 epochs of 1 batch x 4 trajectories, from the base model; credit turning_point")
    epoch_lines = [line for line in lines if line.startswith("tp_grpo epoch ")]
    assert [line.split(" | ")[0] for line in epoch_lines] == ["tp_grpo epoch 0/2", "tp_grpo epoch 1/2", "tp_grpo epoch 2/2"]
    assert epoch_lines[0].endswith("(the base model)")
    assert "eval reward" not in epoch_lines[1] and "train reward" in epoch_lines[1] and "turning points" in epoch_lines[1]
    assert " vs base)" in epoch_lines[2]
    assert out.startswith("tp_grpo: 2 epochs in ")
