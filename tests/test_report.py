"""The ablation report: table values, markdown, JSON, plots, failed variants, MLflow artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpgrpo.report import build_report

W = 3


def _write_run(runs: Path, name: str, *, base: float, final: float, rates: list[float], epochs: int = 2) -> None:
    run = runs / name
    run.mkdir(parents=True)
    metrics = {
        "eval_reward": final,
        "eval_reward_initial": base,
        "epochs": epochs,
        "minutes": 1.25,
        "eval_color": final + 0.1,
        "eval_count": final - 0.1,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    steps = ",".join(f"turning/rate_step_{k}" for k in range(1, W + 1))
    lines = [f"epoch,time/rollout_s,reward/mean,{steps},turning/rate,loss/policy,eval/reward,eval/color,time/minutes"]
    for e in range(1, epochs + 1):
        step_rates = ",".join(str(r * e) for r in rates)
        evaluated = e == epochs
        eval_cells = f"{final},{final + 0.1}" if evaluated else ","  # empty on epochs without eval
        lines.append(f"{e}.0,0.5,{base + 0.01 * e},{step_rates},{sum(rates) / W},0.01,{eval_cells},{e / 2}")
    (run / "history.csv").write_text("\n".join(lines) + "\n")


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
    assert table.loc["flow_grpo", "epochs"] == 2 and table.loc["flow_grpo", "minutes"] == pytest.approx(1.25)
    assert table.loc["incremental", "status"] == "failed" and "metrics.json" in table.loc["incremental", "reason"]
    assert table.loc["broken", "status"] == "failed" and "unreadable" in table.loc["broken", "reason"]
    assert report.failed == ("incremental", "broken")

    text = report.markdown_path.read_text()
    assert text == report.markdown
    assert "| variant | status | base reward | final eval reward | delta | color | count | exported weights | epochs | minutes |" in text
    assert "| tp_grpo | ok | 0.4000 | 0.5200 | +0.1200 | 0.6200 | 0.4200 | 0.5199 | 2 | 1.25 |" in text
    assert "| flow_grpo | ok | 0.4000 | 0.4500 | +0.0500 | 0.5500 | 0.3500 | n/a | 2 | 1.25 |" in text
    assert "| incremental | failed | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in text
    assert "- `incremental`: no " in text and "- `broken`: " in text

    data = json.loads(report.json_path.read_text())
    assert list(data) == ["flow_grpo", "tp_grpo", "incremental", "broken"]
    assert data["tp_grpo"]["eval_reward"] == pytest.approx(0.52) and data["tp_grpo"]["epochs"] == 2
    assert data["incremental"]["eval_reward"] is None and data["incremental"]["status"] == "failed"

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
