"""DVC's tables and plots: dvc.yaml declares files its stages write, every declared metrics file
has the same six keys (`dvc metrics show` prints one short row per run), and `dvc plots show`
needs nothing from the network.

The stages' commands, as dvc.yaml writes them, run in a tiny workspace (the tiny SD3 pipeline,
pretrained for a few steps, one training epoch per variant); then the real `dvc` reads the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What runs/<variant>/summary.json holds, for every run: no per-constraint rewards (they stay in
# metrics.json), so the rows of `dvc metrics show` share their columns.
SUMMARY_KEYS = ["base_reward", "reward", "delta", "heldin_reward", "turning_rate"]
TINY_PRETRAIN = {
    "num_train_images": 64, "vae_steps": 3, "vae_batch_size": 8, "vae_test_images": 8,
    "transformer_steps": 3, "batch_size": 8, "warmup_steps": 1,
}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _items(stage: dict, variants: list[str]) -> list[str | None]:
    return variants if "foreach" in stage else [None]


def _expand(text: str, item: str | None) -> str:
    return text if item is None else text.replace("${item}", item)


def _declared(variants: list[str], kind: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The paths of ``kind`` (outs, metrics or plots) that dvc.yaml declares, ``${item}`` expanded,
    but those of the stages in ``skip``."""
    paths = []
    for name, stage in _stages().items():
        if name in skip:
            continue
        body = stage.get("do", stage)
        for item in _items(stage, variants):
            for entry in body.get(kind, []):
                paths.append(_expand(entry if isinstance(entry, str) else next(iter(entry)), item))
    return paths


def _dvc(args: list[str], cwd: Path, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DO_NOT_TRACK": "true", **env},
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipe) -> tuple[Path, list[str]]:
    """A tiny workspace where every stage of dvc.yaml after `prepare` has run its command, and a
    DVC repository (no git) with the project's dvc.yaml; returns it and the variants."""
    root = tmp_path_factory.mktemp("dvc-tables")
    # Held-in prompts, so every key of the summary has a value to check.
    params = tiny_workspace(
        root, tiny_pipe, pretrain=TINY_PRETRAIN, train={"epochs": 1},
        eval={"num_steps": 2, "batch_size": 4, "heldin_prompts": 2},
    )
    # The base model and the prompts where dvc.yaml declares them.
    raw = yaml.safe_load(params.read_text())
    for section, key, path in (("model", "path", "models/base"), ("data", "dir", "data/prompts")):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Path(raw[section][key]).rename(root / path)
        raw[section][key] = str(root / path)
    params.write_text(yaml.safe_dump(raw))
    variants = raw["pipeline"]["variants"]
    _run_stages(root, variants)
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    _dvc(["init", "--no-scm", "-q"], root)
    shutil.copy2(ROOT / ".dvcignore", root / ".dvcignore")
    return root, variants


def _run_stages(root: Path, variants: list[str]) -> None:
    """Every stage's command after `prepare` (tiny_workspace wrote the prompt sets), in order."""
    from tpgrpo.cli import main

    cwd = Path.cwd()
    os.chdir(root)  # the stages' relative paths (reports/, runs/<variant>/eval.json) land here
    try:
        for name, stage in _stages().items():
            if name == "prepare":
                continue
            for item in _items(stage, variants):
                argv = _expand(stage.get("do", stage)["cmd"], item).split()
                assert argv[0] == "tpgrpo" and main(argv[1:]) == 0, argv
    finally:
        os.chdir(cwd)


def _digest(path: Path, ignored: set[str]) -> dict[str, str]:
    """Relative file path -> sha256 of every file of ``path`` (a file or a directory), without the
    names .dvcignore leaves out of DVC's hashes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in files
        if f.name not in ignored
    }


@pytest.mark.slow
def test_every_declared_output_metric_and_plot_is_written(workspace: tuple[Path, list[str]]) -> None:
    root, variants = workspace
    for kind in ("outs", "metrics", "plots"):
        declared = _declared(variants, kind)
        assert declared or kind != "metrics"
        missing = [path for path in declared if not (root / path).exists()]
        assert not missing, (kind, missing)


@pytest.mark.slow
def test_each_run_summary_has_the_five_keys_and_agrees_with_metrics_json(workspace: tuple[Path, list[str]]) -> None:
    import csv

    root, variants = workspace
    for variant in variants:
        run = root / "runs" / variant
        summary = json.loads((run / "summary.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        with (run / "history.csv").open() as f:
            rates = [float(row["turning/rate"]) for row in csv.DictReader(f)]
        assert list(summary) == SUMMARY_KEYS, variant
        assert summary["reward"] == metrics["eval_reward"]
        assert summary["base_reward"] == metrics["eval_reward_initial"]
        assert summary["delta"] == metrics["eval_reward"] - metrics["eval_reward_initial"]
        assert summary["heldin_reward"] == metrics["eval_heldin_reward"]
        assert summary["turning_rate"] == pytest.approx(sum(rates) / len(rates), abs=1e-12)
        # Wall-clock time is in timing.csv (and MLflow), not in a DVC output.
        assert "minutes" not in metrics and not [c for c in rates_columns(run) if c.startswith("time/")]
        with (run / "timing.csv").open() as f:
            assert {"epoch", "time/rollout_s", "time/update_s", "time/minutes"} <= set(next(csv.reader(f)))
        # Nothing is lost: the per-constraint rewards, before and after, stay in metrics.json.
        assert {"eval_color", "eval_color_initial", "eval_count", "epochs"} <= set(metrics)


def rates_columns(run: Path) -> list[str]:
    with (run / "history.csv").open() as f:
        return f.readline().strip().split(",")


@pytest.mark.slow
def test_two_runs_of_the_stages_give_byte_identical_dvc_outputs(workspace: tuple[Path, list[str]]) -> None:
    """What DVC hashes is the same for two runs of one commit: every declared output, after DVC's
    own removal of the outputs and a rerun of every stage; wall-clock times and MLflow run ids
    live in files .dvcignore leaves out, and DVC confirms it ignores them."""
    root, variants = workspace
    ignored = {line.strip() for line in (ROOT / ".dvcignore").read_text().splitlines() if line.strip() and "/" not in line and not line.startswith("#")}
    assert {"timing.csv", "timing.json", "tracking.json"} <= ignored
    for name in (f"runs/{variants[0]}/timing.csv", f"runs/{variants[0]}/tracking.json", "models/base/timing.json"):
        assert (root / name).is_file(), name
        _dvc(["check-ignore", "-q", name], root)
    # The prompt sets are tiny_workspace's, not `tpgrpo prepare`'s: inputs here.
    declared = sorted({p for kind in ("outs", "metrics", "plots") for p in _declared(variants, kind, skip=("prepare",))})
    first = {p: _digest(root / p, ignored) for p in declared}
    for p in declared:
        shutil.rmtree(root / p) if (root / p).is_dir() else (root / p).unlink()
    _run_stages(root, variants)
    second = {p: _digest(root / p, ignored) for p in declared}
    assert all(first[p] for p in declared)
    assert [p for p in declared if first[p] != second[p]] == []


@pytest.mark.slow
def test_dvc_metrics_show_is_one_row_per_run_within_120_columns(workspace: tuple[Path, list[str]]) -> None:
    root, variants = workspace
    shown = json.loads(_dvc(["metrics", "show", "--json"], root))
    files = shown[""]["data"]
    assert sorted(files) == sorted(f"runs/{v}/summary.json" for v in variants)
    for path, entry in files.items():
        assert list(entry["data"]) == SUMMARY_KEYS, path
        assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in entry["data"].values()), path

    lines = _dvc(["metrics", "show"], root, COLUMNS="120").splitlines()
    assert lines[0].split() == ["Path", *sorted(SUMMARY_KEYS)]
    assert len(lines) == 1 + len(variants) and "-" not in lines[1].split()  # no empty cells
    assert max(map(len, lines)) <= 120, lines


@pytest.mark.slow
def test_dvc_plots_show_needs_no_network(workspace: tuple[Path, list[str]]) -> None:
    root, variants = workspace
    out = root / "plots-html"
    _dvc(["plots", "show", "-o", str(out)], root)
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # no vega from a CDN
    images = sorted(p.name for p in (out / "static").iterdir())
    assert images == sorted("workspace_" + p.replace("/", "_") for p in _declared(variants, "plots"))


def test_the_metrics_are_the_run_summaries_and_the_plots_pngs() -> None:
    variants = ["a", "b"]
    assert _declared(variants, "metrics") == ["runs/a/summary.json", "runs/b/summary.json"]
    # A data plot (history.csv) is drawn by vega loaded from a CDN: blank offline.
    plots = _declared(variants, "plots")
    assert plots and all(path.endswith(".png") for path in plots), plots


def test_dvc_plots_html_is_not_committed() -> None:
    proc = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert proc.returncode == 0, "dvc_plots/ (what `dvc plots show` writes) is not git-ignored"
