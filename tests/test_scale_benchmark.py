"""``benchmarks/scale.py`` end to end on the CPU, shrunk: every figure it names is there and sane.

The script runs as a user runs it (a subprocess, the command line of its docstring), once per
architecture, on one thread (the test machine's cores are shared) and one alternated round.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# preset -> shrink factor: SD3.5 keeps 2 of its 24 blocks at 12, FLUX 1 + 2 of its 19 + 38 at 16.
RUNS = {"sd35m_pickscore": 12, "flux1dev_pickscore": 16}
PHASES = ("rollout", "scoring", "score_wait", "credit", "update", "epoch")
PEAKS = ("rollout", "score_wait", "credit", "update", "epoch")


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory) -> tuple[dict, str]:
    """(the --json figures, stdout) of one preset's run."""
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    preset, scale = request.param, RUNS[request.param]
    command = [
        sys.executable, "benchmarks/scale.py", "--preset", f"configs/presets/{preset}.yaml",
        "--scale", str(scale), "--threads", "1", "--repeats", "1", "--json", str(out),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_settings_follow_the_preset_shrunk(run) -> None:
    figures, _ = run
    st = figures["settings"]
    assert st["device"] == "cpu" and st["threads"] == 1
    assert st["scale"] in RUNS.values() and st["architecture"] in ("stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev")
    assert st["batch"] % st["group"] == 0 and st["group"] >= 2
    assert st["batches"] % st["gradient_accumulation"] == 0
    assert st["resolution"] >= 32 and st["steps"] > st["window"] >= 1
    assert all(figures["parameters"][k] > 0 for k in ("transformer", "text_encoders", "vae", "lora"))


@pytest.mark.slow
def test_every_phase_is_timed_and_measured(run) -> None:
    figures, _ = run
    for name in ("tp_grpo", "flow_grpo"):
        v = figures["variants"][name]
        assert all(v["seconds"][p] > 0 for p in PHASES), (name, v["seconds"])
        assert all(v["peak_mb"][p] > 0 for p in PEAKS), (name, v["peak_mb"])
        assert v["trajectories"] == figures["settings"]["batch"] * figures["settings"]["batches"]
        assert math.isclose(v["samples_per_s"], v["trajectories"] / v["seconds"]["epoch"])
        # The update trained on rows: its figures are an update's.
        assert v["kept"] > 0 and v["nonfinite"] == 0
    tp, flow = figures["variants"]["tp_grpo"], figures["variants"]["flow_grpo"]
    assert tp["seconds"]["completions"] > 0 and tp["completion_rows"] > 0
    assert flow["seconds"]["completions"] is None and flow["completion_rows"] == 0
    # Same trajectories: TP-GRPO's rollout without its completions is Flow-GRPO's.
    assert math.isclose(tp["seconds"]["rollout"], flow["seconds"]["rollout"])
    assert tp["rows"] > flow["rows"]


@pytest.mark.slow
def test_lockstep_against_sequential(run) -> None:
    figures, stdout = run
    lk = figures["lockstep"]
    assert lk["lockstep"]["seconds"] > 0 and lk["sequential"]["seconds"] > 0
    assert math.isclose(lk["sequential_over_lockstep"], lk["sequential"]["seconds"] / lk["lockstep"]["seconds"])
    # Lockstep reuses each completion's first velocity and batches the branches together.
    assert lk["lockstep"]["forwards"] < lk["sequential"]["forwards"] and lk["lockstep"]["rows"] < lk["sequential"]["rows"]
    assert lk["lockstep"]["peak_mb"] > 0 and lk["sequential"]["peak_mb"] > 0
    assert f"sequential/lockstep x{lk['sequential_over_lockstep']:.2f}" in stdout


@pytest.mark.slow
def test_memory_model_beside_the_measured_peak(run) -> None:
    figures, stdout = run
    mm = figures["memory_model"]
    assert mm["predicted_gib"] > 0 and mm["weights_gib"] > 0 and mm["activations_gib"] > 0
    assert math.isclose(mm["predicted_gib"], mm["weights_gib"] + mm["lora_state_gib"] + mm["activations_gib"])
    assert mm["measured_update_peak_gib"] > 0
    assert mm["measured_over_predicted"] is None  # a CPU's RSS is not the model's quantity
    assert "memory: CPU: the process's peak RSS" in stdout
    assert f"memory model: predicted {mm['predicted_gib']:.3f} GiB" in stdout


@pytest.mark.slow
def test_the_printed_table_names_every_phase(run) -> None:
    figures, stdout = run
    for label in ("rollout (SDE trajectories)", "completions (ODE)", "scoring (jpeg_compressibility)", "score wait",
                  "credit", "update", "epoch", "samples/s", "settings:", "parameters:"):
        assert label in stdout, label
    tp = figures["variants"]["tp_grpo"]
    assert f"{tp['samples_per_s']:.3f}" in stdout
