"""The user's path: a Prefect server, the flows served, `prefect deployment run tpgrpo/ablation`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_workspace  # noqa: E402
from tpgrpo.rundir import study_run_name  # noqa: E402
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(1.0)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_deployment_run_ablation_end_to_end(tmp_path: Path, tiny_pipe) -> None:
    from mlflow import MlflowClient

    path = tiny_workspace(tmp_path, tiny_pipe)
    params = yaml.safe_load(path.read_text())
    # A named study, run by name as a user runs the headline: `--param study=pair`.
    params["studies"] = {"pair": {"variants": ["flow_grpo", "tp_grpo"], "seeds": [1, 2], "epochs": 1}}
    path.write_text(yaml.safe_dump(params))

    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    port = api.rsplit(":", 1)[1].split("/")[0]
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
        env=env, cwd=tmp_path, start_new_session=True,
        stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    serve = None
    try:
        _wait(lambda: _healthy(api), 120, "Prefect server")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"], env=env, cwd=ROOT, start_new_session=True,
            stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT,
        )
        _wait(
            lambda: subprocess.run([PREFECT, "deployment", "inspect", "tpgrpo/ablation"], env=env, capture_output=True).returncode == 0,
            120, "tpgrpo/ablation deployment",
        )
        run = subprocess.run(
            [
                PREFECT, "deployment", "run", "tpgrpo/ablation",
                "--param", f"params_path={tmp_path / 'params.yaml'}",
                "--param", "study=pair",
                "--watch",
            ],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (logs / "serve.log").read_text()[-3000:]
        intervals = _train_run_intervals(env)
    finally:
        for proc in (serve, server):
            if proc is not None:
                _stop(proc)

    client = MlflowClient(params["tracking"]["uri"])
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id
    runs = client.search_runs([experiment])
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    names = {study_run_name(v, s, ["train.epochs=1"]) for v in ("flow_grpo", "tp_grpo") for s in (1, 2)}
    assert set(children) == names
    assert all(r.info.status == "FINISHED" for r in children.values())
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in children.values()}
    assert client.get_run(parent_id).info.status == "FINISHED"
    # The study's defaults from the params file: its run and report directories (next to it)
    # and at most ablation.max_parallel training runs at once.
    assert params["ablation"]["max_parallel"] == 2
    # Beside the run directories: each run's lock (.<name>.lock), hidden.
    assert {p.name for p in (tmp_path / "ablation" / "runs").iterdir() if not p.name.startswith(".")} == names
    study = (tmp_path / "ablation" / "reports" / "pair.md").read_text()
    assert "| `flow_grpo` | 2/2 |" in study and "| `tp_grpo` | 2/2 |" in study
    assert json.loads((tmp_path / "ablation" / "reports" / "pair.json").read_text())["study"] == "pair"
    assert len(intervals) == 4
    most = max(sum(start <= t < end for start, end in intervals) for t, _ in intervals)
    assert most <= 2, intervals


def _train_run_intervals(env: dict) -> list[tuple[float, float]]:
    """(start, end) in seconds of every finished tpgrpo-train flow run, from the Prefect CLI."""
    out = subprocess.run(
        [PREFECT, "flow-run", "ls", "--flow-name", "tpgrpo-train", "--output", "json"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    runs = json.loads(out)
    return [
        (datetime.fromisoformat(r["start_time"]).timestamp(), datetime.fromisoformat(r["end_time"]).timestamp())
        for r in runs
        if r.get("start_time") and r.get("end_time")
    ]
