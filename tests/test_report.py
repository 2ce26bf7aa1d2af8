"""The ablation report: table values, markdown, JSON, plots, failed variants, MLflow artifacts,
and no wall-clock time in its files (DVC outputs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tpgrpo.reporting.report import build_report

W = 3


def _write_run(runs: Path, name: str, *, base: float, final: float, rates: list[float], epochs: int = 2) -> None:
    """A run directory as the trainer leaves it: no wall-clock time but in timing.csv."""
    run = runs / name
    run.mkdir(parents=True)
    metrics = {
        "eval_reward": final,
        "eval_reward_initial": base,
        "epochs": epochs,
        "eval_color": final + 0.1,
        "eval_count": final - 0.1,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    steps = ",".join(f"turning/rate_step_{k}" for k in range(1, W + 1))
    lines = [f"epoch,reward/mean,{steps},turning/rate,loss/policy,eval/reward,eval/color"]
    for e in range(1, epochs + 1):
        step_rates = ",".join(str(r * e) for r in rates)
        evaluated = e == epochs
        eval_cells = f"{final},{final + 0.1}" if evaluated else ","  # empty on epochs without eval
        lines.append(f"{e}.0,{base + 0.01 * e},{step_rates},{sum(rates) / W},0.01,{eval_cells}")
    (run / "history.csv").write_text("\n".join(lines) + "\n")
    _write_timing(run, epochs, seconds=30.0)


def _write_timing(run: Path, epochs: int, seconds: float) -> None:
    rows = [f"{e}.0,{seconds},{e * seconds / 60}" for e in range(1, epochs + 1)]
    (run / "timing.csv").write_text("epoch,time/rollout_s,time/minutes\n" + "\n".join(rows) + "\n")


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    _write_run(runs, "flow_grpo", base=0.40, final=0.45, rates=[0.0, 0.0, 0.0])
    _write_run(runs, "tp_grpo", base=0.40, final=0.52, rates=[0.25, 0.125, 0.0])
    (runs / "tp_grpo" / "eval.json").write_text(json.dumps({"model": "tp_grpo", "reward": 0.5199, "prompts": 4}))
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text("{not json")
    return runs


def test_table_markdown_json_and_plots(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    report = build_report(runs, ["flow_grpo", "tp_grpo", "incremental", "broken"], out)

    table = report.table.set_index("variant")
    assert list(table.index) == ["flow_grpo", "tp_grpo", "incremental", "broken"]
    assert table.loc["tp_grpo", "status"] == "ok"
    assert table.loc["tp_grpo", "base_reward"] == pytest.approx(0.40)
    assert table.loc["tp_grpo", "eval_reward"] == pytest.approx(0.52)
    assert table.loc["tp_grpo", "delta"] == pytest.approx(0.12)
    assert table.loc["tp_grpo", "eval_color"] == pytest.approx(0.62)
    assert table.loc["flow_grpo", "eval_count"] == pytest.approx(0.35)
    assert table.loc["tp_grpo", "exported_reward"] == pytest.approx(0.5199)
    assert table.loc["flow_grpo", "exported_reward"] != table.loc["flow_grpo", "exported_reward"]  # NaN: no eval.json
    assert table.loc["flow_grpo", "epochs"] == 2 and "minutes" not in table.columns
    assert table.loc["incremental", "status"] == "failed" and "metrics.json" in table.loc["incremental", "reason"]
    assert table.loc["broken", "status"] == "failed" and "unreadable" in table.loc["broken", "reason"]
    assert report.failed == ("incremental", "broken")

    text = report.markdown_path.read_text()
    assert text == report.markdown
    assert "| variant | status | base reward | final eval reward | delta | color | count | exported weights | epochs |" in text
    assert "| tp_grpo | ok | 0.4000 | 0.5200 | +0.1200 | 0.6200 | 0.4200 | 0.5199 | 2 |" in text
    assert "| flow_grpo | ok | 0.4000 | 0.4500 | +0.0500 | 0.5500 | 0.3500 | n/a | 2 |" in text
    assert "| incremental | failed | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in text
    assert "- `incremental`: no " in text and "- `broken`: " in text
    # Where the times are instead.
    assert "MLflow's `summary/minutes`" in text and f"`{runs}/<variant>/timing.csv`" in text

    data = json.loads(report.json_path.read_text())
    assert list(data) == ["flow_grpo", "tp_grpo", "incremental", "broken"]
    assert data["tp_grpo"]["eval_reward"] == pytest.approx(0.52) and data["tp_grpo"]["epochs"] == 2
    assert data["incremental"]["eval_reward"] is None and data["incremental"]["status"] == "failed"
    assert all("minutes" not in row for row in data.values())

    assert set(report.plot_paths) == {"reward_vs_epoch", "turning_rate_per_step"}
    for path in report.plot_paths.values():
        assert path.parent == out and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000  # axes, curves and legend, not an empty canvas
    assert sorted(p.name for p in out.iterdir()) == [
        "ablation.json",
        "ablation.md",
        "reward_vs_epoch.png",
        "turning_rate_per_step.png",
    ]  # no temp files left behind


def test_known_failure_overrides_stale_metrics(runs: Path, tmp_path: Path) -> None:
    report = build_report(runs, ["flow_grpo", "tp_grpo"], tmp_path / "r", failures={"tp_grpo": "RuntimeError: boom | x"})
    row = report.table.set_index("variant").loc["tp_grpo"]
    assert row["status"] == "failed" and row["reason"] == "RuntimeError: boom | x"
    assert "- `tp_grpo`: RuntimeError: boom | x" in report.markdown


def test_nothing_finished_still_writes_every_file(tmp_path: Path) -> None:
    report = build_report(tmp_path / "nowhere", ["a", "b"], tmp_path / "r")
    assert report.failed == ("a", "b")
    assert all(p.is_file() and p.stat().st_size > 0 for p in report.paths)


def test_report_is_logged_to_the_parent_run(runs: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tpgrpo.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri, "ablation-test", run_name="ablation")
    parent.finish("FINISHED")  # the report may come after the parent run ended

    build_report(runs, ["flow_grpo", "tp_grpo", "incremental"], tmp_path / "reports", tracking_uri=uri, parent_run_id=parent.run_id)

    client = MlflowClient(uri)
    names = sorted(a.path for a in client.list_artifacts(parent.run_id, "reports"))
    assert names == [
        "reports/ablation.json",
        "reports/ablation.md",
        "reports/reward_vs_epoch.png",
        "reports/turning_rate_per_step.png",
    ]
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["tp_grpo/eval_reward"] == pytest.approx(0.52)
    assert run.data.metrics["tp_grpo/delta"] == pytest.approx(0.12)
    assert "incremental/eval_reward" not in run.data.metrics


def test_the_files_hold_no_time_so_two_builds_are_the_same_bytes(runs: Path, tmp_path: Path) -> None:
    """The report's files are DVC outputs: byte-identical between two runs of the same commit,
    however long the runs took. Two reports of the same runs with other timing.csv files (and
    built at different times) are the same bytes."""
    import time

    variants = ["flow_grpo", "tp_grpo", "incremental", "broken"]
    first = build_report(runs, variants, tmp_path / "first")
    for name in ("flow_grpo", "tp_grpo"):
        _write_timing(runs / name, 2, seconds=4321.0)
    time.sleep(1.1)  # a file that held the build's date or time would differ
    second = build_report(runs, variants, tmp_path / "second")
    assert [p.name for p in first.paths] == [p.name for p in second.paths]
    for a, b in zip(first.paths, second.paths):
        assert a.read_bytes() == b.read_bytes(), a.name
    text = first.markdown_path.read_text() + first.json_path.read_text()
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{1,2}:\d{2}", text)  # no date, no clock time
