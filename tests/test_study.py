"""The ablation study's report: statistics against hand-worked values and plain loops, the
aggregation over seeds from hand-written run directories, failed runs, files and MLflow."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from tpgrpo.reporting.study import build_study_report, epochs_to_reach, mean_curve, read_seed_run
from tpgrpo.rundir import run_name, settings_key, study_run_name

T_2 = 4.302652729749464  # Student's t, 0.975 quantile, 2 degrees of freedom


def name_of(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


# --------------------------------------------------------------------------- statistics


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
    # Study runs: the same settings name the same run; any other setting, another one.
    a = study_run_name("tp_grpo", 3, ["train.epochs=20", "eval.num_prompts=1024"])
    assert a == study_run_name("tp_grpo", 3, ["train.epochs=20", "eval.num_prompts=1024"])
    assert a.startswith("tp_grpo-seed3-") and len(settings_key([])) == 8
    assert a != study_run_name("tp_grpo", 3, ["train.epochs=21", "eval.num_prompts=1024"])
    assert a != study_run_name("tp_grpo", 4, ["train.epochs=20", "eval.num_prompts=1024"])
    # The value a key ends with counts, not the order the keys are listed in.
    assert a == study_run_name("tp_grpo", 3, ["eval.num_prompts=1024", "train.epochs=20"])
    assert a == study_run_name("tp_grpo", 3, ["train.epochs=5", "eval.num_prompts=1024", "train.epochs=20"])


# --------------------------------------------------------------------------- run directories


STEPS = (1, 2, 3)


def _write_run(
    runs: Path,
    name: str,
    base: float,
    evals: dict[int, float],
    turning: list[list[float]] | None = None,
    minutes: float = 1.0,
    details: dict[str, tuple[float, float]] | None = None,
    scores: tuple[list[float], list[float]] | None = None,
) -> None:
    """A run directory as the trainer leaves it: metrics.json (with ``details``: name -> (initial,
    final)), history.csv with an eval every other epoch and, for TP-GRPO, per-step turning rates
    (one list of per-step rates per epoch), timing.csv (``minutes`` at the last epoch), and
    per-prompt scores (base, final) when given."""
    run = runs / name
    run.mkdir(parents=True)
    epochs = max(evals)
    final = evals[epochs]
    metrics = {"epochs": epochs, "eval_reward": final, "eval_reward_initial": base}
    for key, (initial, last) in (details or {}).items():
        metrics[f"eval_{key}"], metrics[f"eval_{key}_initial"] = last, initial
    (run / "metrics.json").write_text(json.dumps(metrics))
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
    timing = "".join(f"{epoch},{minutes * epoch / epochs}\n" for epoch in range(1, epochs + 1))
    (run / "timing.csv").write_text("epoch,time/minutes\n" + timing)
    if scores is not None:
        (run / "eval_scores").mkdir()
        for epoch, values in ((0, scores[0]), (epochs, scores[1])):
            text = "index,prompt,reward\n" + "".join(f"{i},p{i},{v}\n" for i, v in enumerate(values))
            (run / "eval_scores" / f"epoch_{epoch:04d}.csv").write_text(text)


@pytest.fixture()
def study_runs(tmp_path: Path) -> Path:
    """Reference flow_grpo on seeds 1-3; tp_grpo on seeds 1-3; tp_grpo_x on seeds 1-2 only
    (seed 3 never wrote metrics); seed 42 is the params seed (directory without a suffix)."""
    runs = tmp_path / "runs"
    _write_run(runs, "flow_grpo-seed1", 0.50, {2: 0.51, 4: 0.52}, minutes=1.0)
    _write_run(runs, "flow_grpo-seed2", 0.52, {2: 0.52, 4: 0.53}, minutes=1.5)
    _write_run(runs, "flow_grpo-seed3", 0.51, {2: 0.53, 4: 0.54}, minutes=2.0)
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
    assert run.minutes == 1.0  # timing.csv's last row
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
        name_of=name_of,
        reference="flow_grpo",
        study="demo",
        credit_modes={"flow_grpo": "outcome", "tp_grpo": "turning_point", "tp_grpo_x": "turning_point"},
        command="prefect deployment run tpgrpo/ablation --param study=demo",
    )
    flow, tp, x = report.summaries
    assert report.reference_mean == pytest.approx(0.53)

    assert flow.final_mean == pytest.approx(0.53) and flow.final_std == pytest.approx(0.01)
    # gains 0.02, 0.01, 0.03: mean 0.02, sd 0.01, 95% half-width t(2) 0.01 / sqrt 3
    g = flow.gain.estimate
    assert g.mean == pytest.approx(0.02) and g.std == pytest.approx(0.01)
    assert (g.ci_low, g.ci_high) == pytest.approx((0.02 - T_2 * 0.01 / math.sqrt(3), 0.02 + T_2 * 0.01 / math.sqrt(3)))
    assert g.eval_std is None  # no per-prompt scores in these runs
    assert flow.vs_reference is None
    assert flow.epochs_to_reach == {1: 4, 2: 4, 3: 4}
    assert flow.turning_rate_mean is None and flow.turning_per_step_mean == {}  # outcome credit
    assert flow.minutes_mean == pytest.approx(1.5)  # timing.csv: 1.0, 1.5, 2.0

    finals = [0.55, 0.56, 0.53]
    assert tp.final_mean == pytest.approx(statistics.fmean(finals)) and tp.final_std == pytest.approx(statistics.stdev(finals))
    diffs = [0.03, 0.03, -0.01]  # minus flow_grpo's 0.52, 0.53, 0.54 seed by seed
    vs = tp.vs_reference.estimate
    assert vs.mean == pytest.approx(statistics.fmean(diffs)) and vs.std == pytest.approx(statistics.stdev(diffs))
    assert vs.half_width == pytest.approx(T_2 * statistics.stdev(diffs) / math.sqrt(3))
    assert not vs.resolved and tp.vs_reference.ahead == 2 and vs.n == 3
    assert vs.detectable > vs.half_width  # 80% power needs more than the interval's half-width
    assert tp.epochs_to_reach == {1: 2, 2: 4, 3: None}
    # seeds 1 and 3 have the rates above, seed 2 half of them
    assert tp.turning_per_step_mean == pytest.approx({1: 0.5 / 3, 2: 0.25 / 3, 3: 0.0})
    assert tp.turning_per_step_std[1] == pytest.approx(statistics.stdev([0.2, 0.1, 0.2]))
    assert tp.turning_rate_mean == pytest.approx(statistics.fmean([0.1, 0.05, 0.1]))

    # Only the finished seeds count: the paired difference uses seeds 1 and 2.
    assert len(x.ok_runs) == 2 and x.final_mean == pytest.approx(0.51)
    assert x.vs_reference.estimate.mean == pytest.approx(statistics.fmean([-0.02, -0.01]))
    assert x.epochs_to_reach == {1: None, 2: None}
    assert report.failed == ("tp_grpo_x-seed3",)

    text = report.markdown
    assert text.startswith("# Study `demo`") and "Command: `prefect deployment run tpgrpo/ablation --param study=demo`" in text
    half = T_2 * statistics.stdev(diffs) / math.sqrt(3)
    m = statistics.fmean(diffs)
    assert f"| `tp_grpo` | 3/3 | 0.547 ± 0.015 | +0.037 [-0.001, +0.075] | +0.017 [{m - half:+.3f}, {m + half:+.3f}] |" in text
    assert "| `flow_grpo` | 3/3 | 0.530 ± 0.010 | +0.020 [-0.005, +0.045] | (reference) |" in text
    assert text.splitlines()[text.splitlines().index("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|") + 1].endswith(" | 1.50 |")
    assert "| `tp_grpo_x` | 2/3 |" in text and "| `tp_grpo_x` | 0.500 | 0.520 | n/a (failed) |" in text
    assert "- `tp_grpo_x-seed3`: no " in text
    assert "| `tp_grpo` | 0.167 ± 0.058 | 0.083 ± 0.029 | 0.000 ± 0.000 |" in text
    assert "`flow_grpo` | 0.000" not in text  # no per-step row for outcome credit
    assert "- `tp_grpo` − `flow_grpo`: +0.0167, 95% interval" in text and "not resolved" in text

    # Every pair, row − column: flow − tp = −mean(diffs); seeds 1 and 2 only against tp_grpo_x.
    pairs = {(p.a, p.b): p for p in report.pairs}
    assert set(pairs) == {("flow_grpo", "tp_grpo"), ("flow_grpo", "tp_grpo_x"), ("tp_grpo", "tp_grpo_x")}
    assert pairs["flow_grpo", "tp_grpo"].estimate.mean == pytest.approx(-statistics.fmean(diffs))
    tp_x = pairs["tp_grpo", "tp_grpo_x"]
    assert tp_x.estimate.n == 2 and tp_x.ahead == 2 and tp_x.estimate.mean == pytest.approx(0.045)
    assert tp_x.differences == pytest.approx({1: 0.05, 2: 0.04})
    assert not tp_x.estimate.resolved  # t(0.975, 1) = 12.7 against t = 9.0

    data = json.loads(report.json_path.read_text())
    assert data["study"] == "demo" and data["seeds"] == [1, 2, 3] and data["reference"] == "flow_grpo"
    assert data["eval_prompts"] is None
    assert len(data["paired_differences"]) == 3
    assert data["variants"]["tp_grpo"]["vs_reference"]["ci_low"] == pytest.approx(m - half)
    assert data["variants"]["tp_grpo"]["epochs_to_reach"] == {"1": 2, "2": 4, "3": None}
    assert data["variants"]["tp_grpo_x"]["runs"][2]["ok"] is False
    assert data["variants"]["flow_grpo"]["vs_reference"] is None
    assert [r["variant"] for r in report.records()] == ["flow_grpo", "tp_grpo", "tp_grpo_x"]
    assert sorted(p.name for p in report.paths) == ["demo.json", "demo.md", "demo_eval_reward.png", "demo_turning_rate_per_step.png"]
    for path in report.plot_paths.values():
        assert path.stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_per_prompt_scores_split_evaluation_noise_from_seed_noise(tmp_path: Path) -> None:
    """Per-prompt scores give each seed's evaluation variance (bootstrap over prompts); with
    constraints, held-in and training-reward metrics the report adds their gains and differences."""
    import numpy as np

    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    per_prompt_diffs = []
    finals = {}
    for seed in (1, 2, 3, 4):
        base = rng.uniform(0, 1, 200).round(3)
        flow = np.clip(base + rng.normal(0.0, 0.1, 200), 0, 1).round(3)
        tp = np.clip(flow + rng.normal(0.02 * seed, 0.1, 200), 0, 1).round(3)
        per_prompt_diffs.append(tp - flow)
        finals[seed] = (float(flow.mean()), float(tp.mean()))
        details = {"color": (0.5, 0.5 + 0.01 * seed), "heldin_reward": (0.6, 0.7), "train_reward": (0.55, 0.6)}
        _write_run(runs, f"flow_grpo-seed{seed}", float(base.mean()), {2: finals[seed][0]}, details=details, scores=(list(base), list(flow)))
        details = {"color": (0.5, 0.52 + 0.01 * seed), "heldin_reward": (0.6, 0.75), "train_reward": (0.55, 0.62)}
        _write_run(runs, f"tp_grpo-seed{seed}", float(base.mean()), {2: finals[seed][1]}, details=details, scores=(list(base), list(tp)))
    report = build_study_report(runs, ["flow_grpo", "tp_grpo"], [1, 2, 3, 4], tmp_path / "out", name_of=name_of, reference="flow_grpo")
    flow, tp = report.summaries
    est = tp.vs_reference.estimate
    expected_eval = math.sqrt(statistics.fmean([d.var(ddof=0) / d.size for d in per_prompt_diffs]))
    assert est.eval_std == pytest.approx(expected_eval, rel=0.08)
    assert est.seed_std == pytest.approx(math.sqrt(max(est.std**2 - est.eval_std**2, 0.0)))
    assert report.eval_prompts == 200 and tp.runs[0].eval_prompts == 200
    # Per-constraint and held-in: gains over the base and differences to the reference.
    assert tp.extra_gains["heldin_reward"].estimate.mean == pytest.approx(0.15)
    assert tp.extra_gains["color"].estimate.mean == pytest.approx(0.045)  # 0.03, 0.04, 0.05, 0.06
    assert tp.extra_vs_reference["color"].estimate.mean == pytest.approx(0.02)
    assert tp.extra_vs_reference["train_reward"].estimate.mean == pytest.approx(0.02)
    text = report.markdown
    assert "evaluation " in text and "(bootstrap over 200 test prompts)" in text
    assert "| variant | held-out | held-in (train prompts) | training reward of the eval images |" in text
    # held-in gain 0.15 and training-reward gain 0.07 on every seed: a zero-width interval
    assert re.search(r"\| `tp_grpo` \| [^|]+ \| \+0\.150 \[\+0\.150, \+0\.150\] \| \+0\.070 \[\+0\.070, \+0\.070\] \|", text)
    # color gains 0.03..0.06 (mean 0.045) and, against flow_grpo, +0.02 on every seed
    assert re.search(r"\| `tp_grpo` \| \+0\.045 \[[^]]+\] \| \+0\.020 \[\+0\.020, \+0\.020\] \|", text)
    data = json.loads(report.json_path.read_text())
    assert data["eval_prompts"] == 200
    assert data["variants"]["tp_grpo"]["vs_reference"]["eval_std"] == pytest.approx(est.eval_std)


def test_a_resolved_difference_is_named(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (ref, better) in enumerate([(0.50, 0.55), (0.52, 0.571), (0.51, 0.559)], start=1):
        _write_run(runs, f"flow_grpo-seed{seed}", 0.5, {4: ref})
        _write_run(runs, f"tp_grpo-seed{seed}", 0.5, {4: better})
    report = build_study_report(runs, ["flow_grpo", "tp_grpo"], [1, 2, 3], tmp_path / "out", name_of=name_of, reference="flow_grpo")
    vs = report.summaries[1].vs_reference
    assert vs.estimate.resolved and vs.ahead == 3
    assert "resolved: the interval excludes 0" in report.markdown


def test_a_missing_reference_leaves_comparisons_empty(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "tp_grpo-seed42", 0.5, {2: 0.6})
    _write_run(runs, "tp_grpo-seed1", 0.5, {2: 0.4})
    report = build_study_report(runs, ["tp_grpo"], [42, 1], tmp_path / "out", name_of=name_of, reference="flow_grpo")
    (tp,) = report.summaries
    assert tp.final_mean == pytest.approx(0.5) and tp.vs_reference is None and tp.epochs_to_reach == {}
    assert report.reference_mean is None
    assert "vs (not run)" in report.markdown


def test_failures_override_what_is_on_disk(study_runs: Path, tmp_path: Path) -> None:
    report = build_study_report(
        study_runs, ["flow_grpo", "tp_grpo"], [1, 2, 3], tmp_path / "out", name_of=name_of, reference="flow_grpo",
        failures={"tp_grpo-seed2": "Crashed"},
    )
    assert len(report.summaries[1].ok_runs) == 2
    assert "- `tp_grpo-seed2`: Crashed" in report.markdown


def test_mean_curve_uses_epochs_every_seed_evaluated(study_runs: Path) -> None:
    runs = [read_seed_run(study_runs / f"flow_grpo-seed{s}", s) for s in (1, 2, 3)]
    curve = mean_curve(runs)
    assert [p.epoch for p in curve] == [0, 2, 4]
    assert curve[0].mean == pytest.approx(0.51) and curve[0].std == pytest.approx(0.01)
    assert curve[2].mean == pytest.approx(0.53)


def test_report_is_logged_to_the_parent_mlflow_run(study_runs: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tpgrpo.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri, "study-test", run_name="ablation")
    parent.finish("FINISHED")
    build_study_report(
        study_runs, ["flow_grpo", "tp_grpo"], [1, 2, 3], tmp_path / "out", name_of=name_of, reference="flow_grpo",
        tracking_uri=uri, parent_run_id=parent.run_id,
    )
    client = MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(parent.run_id, "study")) == [
        "study/ablation.json", "study/ablation.md", "study/ablation_eval_reward.png", "study/ablation_turning_rate_per_step.png",
    ]
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["study/tp_grpo/final_mean"] == pytest.approx(statistics.fmean([0.55, 0.56, 0.53]))


def test_cli_rebuilds_a_study_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from tpgrpo.cli import main
    from tpgrpo.config import load_config

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"]["tp_grpo_x"] = {"credit.balance": False}
    params["ablation"].update(variants=["flow_grpo", "tp_grpo"], seeds=[1, 2], runs_dir="runs", reports_dir="out")
    params["studies"] = {"mine": {"variants": ["flow_grpo", "tp_grpo", "tp_grpo_x"], "seeds": [1, 2, 3], "epochs": 4}}
    path = tmp_path / "params.yaml"  # runs/ and out/ are relative to it
    path.write_text(yaml.safe_dump(params))
    settings = load_config(path).study("mine").override_list()
    assert settings == ["train.epochs=4"]
    runs = tmp_path / "runs"
    for seed, (flow, tp) in enumerate([(0.52, 0.55), (0.53, 0.56), (0.54, 0.53)], start=1):
        _write_run(runs, study_run_name("flow_grpo", seed, settings), 0.5, {4: flow})
        _write_run(runs, study_run_name("tp_grpo", seed, settings), 0.5, {4: tp})
    assert main(["study", "--params", str(path), "--study", "mine"]) == 0
    out = capsys.readouterr().out
    assert "| `tp_grpo` | 3/3 | 0.547 ± 0.015 |" in out and f"report: {tmp_path / 'out' / 'mine.md'}" in out
    assert "| `tp_grpo_x` | 0/3 |" in out  # never ran: listed, not averaged
    assert "Command: `prefect deployment run tpgrpo/ablation --param study=mine`" in out

    assert main(["study", "--params", str(path), "--study", "nope"]) == 2
    assert "study 'nope' is not defined under 'studies' (defined: ablation, mine)" in capsys.readouterr().err

    params["ablation"].update(variants=[])
    path.write_text(yaml.safe_dump(params))
    assert main(["study", "--params", str(path)]) == 2
    assert "ablation: variants is empty" in capsys.readouterr().err
