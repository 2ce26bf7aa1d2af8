"""The ablation study's report: statistics against hand-worked values and plain loops, the
aggregation over seeds from hand-written run directories, failed runs, files and MLflow."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from tpgrpo.study import (
    build_study_report,
    epochs_to_reach,
    mean_curve,
    mean_std,
    paired_t,
    read_seed_run,
    run_name,
)

# --------------------------------------------------------------------------- statistics


def test_mean_std_by_hand_and_against_the_standard_library() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5.0 / 3.0))  # (2.25+0.25+0.25+2.25)/3
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([]) == (None, None)
    values = [0.53, 0.57, 0.55, 0.49, 0.61]
    assert mean_std(values) == (pytest.approx(statistics.fmean(values)), pytest.approx(statistics.stdev(values)))


def test_paired_t_by_hand() -> None:
    # mean 0.02, std 0.01, n 3: t = 0.02 / (0.01 / sqrt 3) = 3.464 < t(0.975, 2) = 4.303
    t, resolved = paired_t([0.01, 0.02, 0.03])
    assert t == pytest.approx(2 * math.sqrt(3)) and not resolved
    # mean 0.02, std 0.001: t = 34.64
    t, resolved = paired_t([0.019, 0.020, 0.021])
    assert t == pytest.approx(20 * math.sqrt(3)) and resolved
    t, resolved = paired_t([-0.019, -0.020, -0.021])
    assert t == pytest.approx(-20 * math.sqrt(3)) and resolved
    assert paired_t([0.05]) == (None, False)
    assert paired_t([0.01, 0.01]) == (math.inf, True)
    assert paired_t([0.0, 0.0]) == (0.0, False)


def test_epochs_to_reach_is_the_first_evaluation_at_or_above_the_target() -> None:
    curve = [(0, 0.50), (2, 0.52), (4, 0.55), (6, 0.54), (8, 0.56)]
    assert epochs_to_reach(curve, 0.54) == 4
    assert epochs_to_reach(curve, 0.55) == 4  # at least, not above
    assert epochs_to_reach(curve, 0.50) == 0
    assert epochs_to_reach(curve, 0.60) is None
    assert epochs_to_reach([], 0.1) is None


def test_run_names() -> None:
    assert run_name("tp_grpo", 42, 42) == "tp_grpo"
    assert run_name("tp_grpo", None, 42) == "tp_grpo"
    assert run_name("tp_grpo", 3, 42) == "tp_grpo-seed3"


# --------------------------------------------------------------------------- run directories


STEPS = (1, 2, 3)


def _write_run(runs: Path, name: str, base: float, evals: dict[int, float], turning: list[list[float]] | None = None, minutes: float = 1.0) -> None:
    """A run directory as the trainer leaves it: metrics.json and history.csv with an eval every
    other epoch and, for TP-GRPO, per-step turning rates (one list of per-step rates per epoch)."""
    run = runs / name
    run.mkdir(parents=True)
    epochs = max(evals)
    final = evals[epochs]
    (run / "metrics.json").write_text(
        json.dumps({"epochs": epochs, "eval_reward": final, "eval_reward_initial": base, "minutes": minutes})
    )
    header = ["epoch", "reward/mean", "eval/reward"]
    if turning is not None:
        header += [f"turning/rate_step_{k}" for k in STEPS] + ["turning/rate"]
    lines = [",".join(header)]
    for epoch in range(1, epochs + 1):
        row = [str(epoch), "0.5", "" if epoch not in evals else str(evals[epoch])]
        if turning is not None:
            rates = turning[epoch - 1]
            row += [str(r) for r in rates] + [str(sum(rates) / len(rates))]
        lines.append(",".join(row))
    (run / "history.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture()
def study_runs(tmp_path: Path) -> Path:
    """Reference flow_grpo on seeds 1-3; tp_grpo on seeds 1-3; tp_grpo_x on seeds 1-2 only
    (seed 3 never wrote metrics); seed 42 is the params seed (directory without a suffix)."""
    runs = tmp_path / "runs"
    _write_run(runs, "flow_grpo-seed1", 0.50, {2: 0.51, 4: 0.52})
    _write_run(runs, "flow_grpo-seed2", 0.52, {2: 0.52, 4: 0.53})
    _write_run(runs, "flow_grpo-seed3", 0.51, {2: 0.53, 4: 0.54})
    # tp_grpo reaches flow_grpo's per-seed final (0.52 / 0.53 / 0.54) at epochs 2 / 4 / never.
    turning = [[0.3, 0.1, 0.0], [0.1, 0.1, 0.0], [0.2, 0.0, 0.0], [0.2, 0.2, 0.0]]
    _write_run(runs, "tp_grpo-seed1", 0.50, {2: 0.52, 4: 0.55}, turning)
    _write_run(runs, "tp_grpo-seed2", 0.52, {2: 0.525, 4: 0.56}, [[r / 2 for r in e] for e in turning])
    _write_run(runs, "tp_grpo-seed3", 0.51, {2: 0.50, 4: 0.53}, turning)
    _write_run(runs, "tp_grpo_x-seed1", 0.50, {2: 0.50, 4: 0.50}, turning)
    _write_run(runs, "tp_grpo_x-seed2", 0.52, {2: 0.52, 4: 0.52}, turning)
    return runs


def test_read_seed_run_collects_the_eval_curve_and_turning_rates(study_runs: Path) -> None:
    run = read_seed_run(study_runs / "tp_grpo-seed1", 1)
    assert run.ok and run.final == 0.55 and run.base == 0.50
    assert run.curve == ((0, 0.50), (2, 0.52), (4, 0.55))
    # per step, mean over the 4 epochs: (0.3+0.1+0.2+0.2)/4, (0.1+0.1+0+0.2)/4, 0
    assert run.turning_per_step == pytest.approx({1: 0.2, 2: 0.1, 3: 0.0})
    assert run.turning_rate == pytest.approx(0.1)
    missing = read_seed_run(study_runs / "tp_grpo_x-seed3", 3)
    assert not missing.ok and "metrics.json" in missing.reason
    failed = read_seed_run(study_runs / "tp_grpo-seed1", 1, failure="RewardError: boom")
    assert not failed.ok and failed.reason == "RewardError: boom"


def test_study_aggregates_over_seeds(study_runs: Path, tmp_path: Path) -> None:
    report = build_study_report(
        study_runs,
        ["flow_grpo", "tp_grpo", "tp_grpo_x"],
        [1, 2, 3],
        tmp_path / "out",
        params_seed=42,
        reference="flow_grpo",
        credit_modes={"flow_grpo": "outcome", "tp_grpo": "turning_point", "tp_grpo_x": "turning_point"},
    )
    flow, tp, x = report.summaries
    assert report.reference_mean == pytest.approx(0.53)

    assert flow.final_mean == pytest.approx(0.53) and flow.final_std == pytest.approx(0.01)
    # deltas 0.02, 0.01, 0.03
    assert flow.delta_mean == pytest.approx(0.02) and flow.delta_std == pytest.approx(0.01)
    assert flow.vs_reference_mean is None and flow.paired == 0
    assert flow.epochs_to_reach == {1: 4, 2: 4, 3: 4}
    assert flow.turning_rate_mean is None and flow.turning_per_step_mean == {}  # outcome credit

    finals = [0.55, 0.56, 0.53]
    assert tp.final_mean == pytest.approx(statistics.fmean(finals)) and tp.final_std == pytest.approx(statistics.stdev(finals))
    diffs = [0.03, 0.03, -0.01]  # minus flow_grpo's 0.52, 0.53, 0.54 seed by seed
    assert tp.vs_reference_mean == pytest.approx(statistics.fmean(diffs))
    assert tp.vs_reference_std == pytest.approx(statistics.stdev(diffs))
    assert tp.vs_reference_t == pytest.approx(statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(3)))
    assert not tp.resolved and tp.wins == 2 and tp.paired == 3
    assert tp.epochs_to_reach == {1: 2, 2: 4, 3: None}
    # seeds 1 and 3 have the rates above, seed 2 half of them
    assert tp.turning_per_step_mean == pytest.approx({1: 0.5 / 3, 2: 0.25 / 3, 3: 0.0})
    assert tp.turning_per_step_std[1] == pytest.approx(statistics.stdev([0.2, 0.1, 0.2]))
    assert tp.turning_rate_mean == pytest.approx(statistics.fmean([0.1, 0.05, 0.1]))

    # Only the finished seeds count: the paired difference uses seeds 1 and 2.
    assert len(x.ok_runs) == 2 and x.final_mean == pytest.approx(0.51)
    assert x.vs_reference_mean == pytest.approx(statistics.fmean([-0.02, -0.01]))
    assert x.epochs_to_reach == {1: None, 2: None}
    assert report.failed == ("tp_grpo_x-seed3",)

    text = report.markdown
    assert "| `tp_grpo` | 3/3 | 0.547 ± 0.015 | +0.037 ± 0.015 | +0.017 ± 0.023 | +1.25 | no | 2/3 | 2/3 (2, 4, –) | 0.083 |" in text
    assert "| `flow_grpo` | 3/3 | 0.530 ± 0.010 | +0.020 ± 0.010 | (reference) |" in text
    assert "| `tp_grpo_x` | 2/3 |" in text and "| `tp_grpo_x` | 0.500 | 0.520 | n/a (failed) |" in text
    assert "- `tp_grpo_x-seed3`: no " in text
    assert "| `tp_grpo` | 0.167 ± 0.058 | 0.083 ± 0.029 | 0.000 ± 0.000 |" in text
    assert "`flow_grpo` | 0.000" not in text  # no per-step row for outcome credit
    assert "Within seed noise: `tp_grpo`, `tp_grpo_x`." in text

    # Every pair, row − column: flow − tp = −mean(diffs); seeds 1 and 2 only against tp_grpo_x.
    pairs = {(p.a, p.b): p for p in report.pairs}
    assert set(pairs) == {("flow_grpo", "tp_grpo"), ("flow_grpo", "tp_grpo_x"), ("tp_grpo", "tp_grpo_x")}
    assert pairs["flow_grpo", "tp_grpo"].mean == pytest.approx(-statistics.fmean(diffs))
    tp_x = pairs["tp_grpo", "tp_grpo_x"]
    assert tp_x.n == 2 and tp_x.ahead == 2 and tp_x.mean == pytest.approx(0.045)
    assert tp_x.t == pytest.approx(0.045 / (statistics.stdev([0.05, 0.04]) / math.sqrt(2)))  # 9.0
    assert not tp_x.resolved  # t(0.975, 1) = 12.7
    assert "| `flow_grpo` | -0.017 (-1.25) | +0.015 (+3.00) |" in text
    assert "| `tp_grpo` |  | +0.045 (+9.00) |" in text

    data = json.loads(report.json_path.read_text())
    assert len(data["paired_differences"]) == 3
    assert data["reference"] == "flow_grpo" and data["seeds"] == [1, 2, 3]
    assert data["variants"]["tp_grpo"]["epochs_to_reach"] == {"1": 2, "2": 4, "3": None}
    assert data["variants"]["tp_grpo_x"]["runs"][2]["ok"] is False
    assert data["variants"]["flow_grpo"]["vs_reference_mean"] is None
    assert [r["variant"] for r in report.records()] == ["flow_grpo", "tp_grpo", "tp_grpo_x"]
    for path in report.plot_paths.values():
        assert path.stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_resolved_difference_is_named(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (ref, better) in enumerate([(0.50, 0.55), (0.52, 0.571), (0.51, 0.559)], start=1):
        _write_run(runs, f"flow_grpo-seed{seed}", 0.5, {4: ref})
        _write_run(runs, f"tp_grpo-seed{seed}", 0.5, {4: better})
    report = build_study_report(runs, ["flow_grpo", "tp_grpo"], [1, 2, 3], tmp_path / "out", params_seed=42, reference="flow_grpo")
    assert report.summaries[1].resolved and report.summaries[1].wins == 3
    assert "Resolved against `flow_grpo` at 5%: `tp_grpo` (ahead)." in report.markdown


def test_params_seed_runs_have_no_suffix_and_a_missing_reference_leaves_comparisons_empty(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "tp_grpo", 0.5, {2: 0.6})
    _write_run(runs, "tp_grpo-seed1", 0.5, {2: 0.4})
    report = build_study_report(runs, ["tp_grpo"], [42, 1], tmp_path / "out", params_seed=42, reference="flow_grpo")
    (tp,) = report.summaries
    assert tp.final_mean == pytest.approx(0.5) and tp.vs_reference_mean is None and tp.epochs_to_reach == {}
    assert report.reference_mean is None
    assert "vs (not run)" in report.markdown


def test_failures_override_what_is_on_disk(study_runs: Path, tmp_path: Path) -> None:
    report = build_study_report(
        study_runs, ["flow_grpo", "tp_grpo"], [1, 2, 3], tmp_path / "out", params_seed=42, reference="flow_grpo",
        failures={"tp_grpo-seed2": "Crashed"},
    )
    assert len(report.summaries[1].ok_runs) == 2
    assert "- `tp_grpo-seed2`: Crashed" in report.markdown


def test_mean_curve_uses_epochs_every_seed_evaluated(study_runs: Path) -> None:
    runs = [read_seed_run(study_runs / f"flow_grpo-seed{s}", s) for s in (1, 2, 3)]
    curve = mean_curve(runs)
    assert [e for e, _, _ in curve] == [0, 2, 4]
    assert curve[0][1] == pytest.approx(0.51) and curve[0][2] == pytest.approx(0.01)
    assert curve[2][1] == pytest.approx(0.53)


def test_report_is_logged_to_the_parent_mlflow_run(study_runs: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tpgrpo.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri, "study-test", run_name="ablation")
    parent.finish("FINISHED")
    build_study_report(
        study_runs, ["flow_grpo", "tp_grpo"], [1, 2, 3], tmp_path / "out", params_seed=42, reference="flow_grpo",
        tracking_uri=uri, parent_run_id=parent.run_id,
    )
    client = MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(parent.run_id, "study")) == [
        "study/study.json", "study/study.md", "study/study_eval_reward.png", "study/study_turning_rate_per_step.png",
    ]
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["study/tp_grpo/final_mean"] == pytest.approx(statistics.fmean([0.55, 0.56, 0.53]))


def test_cli_rebuilds_the_report_from_the_ablation_section(study_runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from tpgrpo.cli import main

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"]["tp_grpo_x"] = {"credit.balance": False}
    params["ablation"].update(
        variants=["flow_grpo", "tp_grpo", "tp_grpo_x"], seeds=[1, 2, 3], runs_dir="runs", reports_dir="out"
    )
    path = tmp_path / "params.yaml"  # runs/ and out/ are relative to it
    path.write_text(yaml.safe_dump(params))
    assert main(["study", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| `tp_grpo` | 3/3 | 0.547 ± 0.015 |" in out and f"report: {tmp_path / 'out' / 'study.md'}" in out
    assert "`flow_grpo` | 0.000" not in out  # flow_grpo is credit.mode outcome in params.yaml

    params["ablation"].update(variants=[])
    path.write_text(yaml.safe_dump(params))
    assert main(["study", "--params", str(path)]) == 2
    assert "ablation.variants is empty" in capsys.readouterr().err
