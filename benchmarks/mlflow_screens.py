"""Screenshots of the MLflow UI as a new user of this project meets it, from a headless Chromium.

Copies the store's database to a temporary directory (the runs' artifacts are read where they
lie; nothing is written there), brings the copy up to date with what runs log now
(:func:`tpgrpo.tracking.describe_store`; ``--as-is`` leaves it as it is), serves it with
``mlflow ui`` and saves, under ``--out``:

- ``1_experiments.png``: the experiments list (``/#/experiments``), as a fresh browser profile
  sees it: on a local server MLflow's Assistant panel opens by itself the first time;
- ``2_experiment.png``: the experiment as it opens from that list (``/#/experiments/<id>``);
- ``3_key_metrics.png``: the address :func:`tpgrpo.tracking.ui_url` prints: the runs table
  with the "Key metrics" view;
- ``4_run.png``: the page of the newest finished training run (``--run-height`` pixels tall,
  to show its description and metrics).

Shots 2-4 are taken as after closing the Assistant panel once (the browser remembers that).
Chromium is driven over the DevTools protocol; each page is shot once the network has been
quiet for ``--quiet`` seconds.

    python benchmarks/mlflow_screens.py [--db mlflow.db] [--experiment tpgrpo] [--out /tmp/mlflow_screens]

Needs ``chromium`` on PATH (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpgrpo.tracking import describe_store, ui_url  # noqa: E402

WIDTH, HEIGHT = 1400, 900
# localStorage of the MLflow UI (mlflow 3.17): the Assistant panel, closed, after its first opening.
ASSISTANT_CLOSED = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True, "mlflow.assistant.panelOpen_v1": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path("mlflow.db"), help="the sqlite store to show (a copy is served)")
    parser.add_argument("--experiment", default="tpgrpo")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlflow_screens"))
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--as-is", action="store_true", help="show the copy without describe_store")
    parser.add_argument("--quiet", type=float, default=2.0, help="seconds without network activity before a shot")
    parser.add_argument("--run-height", type=int, default=1700)
    args = parser.parse_args()
    if not args.db.is_file():
        parser.exit(2, f"--db: {args.db} is not a file; expected an MLflow sqlite database\n")
    if shutil.which("chromium") is None:
        parser.exit(2, "chromium: not found on PATH; expected Chromium (apt-get install chromium)\n")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="mlflow-screens-") as tmp:
        db = Path(tmp) / "mlflow.db"
        shutil.copy2(args.db, db)
        uri = f"sqlite:///{db}"
        if not args.as_is:
            print(f"describe_store: {describe_store(uri, args.experiment)} runs described")
        base = f"http://127.0.0.1:{args.port}"
        with mlflow_ui(uri, args.port, Path(tmp)):
            experiment_id = _api(base, "experiments/get-by-name", {"experiment_name": args.experiment})["experiment"]["experiment_id"]
            run_id = _newest_training_run(base, experiment_id)
            shots = [
                Shot(f"{base}/#/experiments", args.out / "1_experiments.png", storage={}),
                Shot(f"{base}/#/experiments/{experiment_id}", args.out / "2_experiment.png"),
                Shot(ui_url(uri, args.experiment, base) or "", args.out / "3_key_metrics.png"),
            ]
            if run_id:
                url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
                shots.append(Shot(url, args.out / "4_run.png", height=args.run_height))
            asyncio.run(shoot(shots, base, args.quiet))


class Shot:
    """One screenshot: ``url`` saved to ``path``; ``storage``: localStorage to set first (None:
    the Assistant closed), ``height``: the viewport's."""

    def __init__(self, url: str, path: Path, storage: dict[str, Any] | None = None, height: int = HEIGHT) -> None:
        self.url, self.path, self.height = url, path, height
        self.storage = ASSISTANT_CLOSED if storage is None else storage


@contextmanager
def mlflow_ui(uri: str, port: int, workdir: Path) -> Iterator[None]:
    log = open(workdir / "mlflow-ui.log", "w")
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--port", str(port), "--workers", "1"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow ui did not start; see {workdir / 'mlflow-ui.log'}") from None
                time.sleep(0.5)
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _api(base: str, path: str, query: dict[str, str] | None = None, body: dict[str, Any] | None = None) -> Any:
    url = f"{base}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + "&".join(f"{k}={urllib.request.quote(v)}" for k, v in query.items())
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _newest_training_run(base: str, experiment_id: str) -> str | None:
    found = _api(
        base,
        "runs/search",
        body={
            "experiment_ids": [experiment_id],
            "filter": "attributes.status = 'FINISHED' and params.`credit.mode` != ''",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1,
        },
    )
    runs = found.get("runs", [])
    return runs[0]["info"]["run_id"] if runs else None


# --------------------------------------------------------------------------- Chromium


class DevTools:
    """A page of a headless Chromium over the DevTools protocol: calls, and the UI's API
    requests (fetch / XHR) in flight. Other requests are not waited for: some never report an
    end (the page's own document, MLflow's telemetry worker)."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.next_id, self.pending = ws, 0, {}
        self.in_flight: set[str] = set()
        self.finished = 0
        self.last_activity = time.monotonic()

    async def read(self) -> None:
        async for message in self.ws:
            msg = json.loads(message)
            if "id" in msg:
                self.pending.pop(msg["id"]).set_result(msg)
                continue
            method, params = msg.get("method", ""), msg.get("params", {})
            if method == "Network.requestWillBeSent":
                if params.get("type") not in ("Fetch", "XHR"):
                    continue
                self.in_flight.add(params["requestId"])
            elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                if params["requestId"] not in self.in_flight:
                    continue
                self.in_flight.discard(params["requestId"])
                self.finished += 1
            else:
                continue
            self.last_activity = time.monotonic()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        msg = await future
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg.get("result", {})

    async def goto(self, url: str, quiet: float, limit: float = 90.0) -> None:
        """Open ``url`` and wait until the UI has made its API requests: at least one has
        ended, none is in flight and none started or ended for ``quiet`` seconds (at most
        ``limit`` seconds in all: the runs page keeps refreshing)."""
        start, seen = time.monotonic(), self.finished
        await self.call("Page.navigate", url=url)
        while time.monotonic() - start < limit:
            await asyncio.sleep(0.2)
            if self.finished > seen and not self.in_flight and time.monotonic() - self.last_activity >= quiet:
                return
        print(f"{url}: still loading after {limit:.0f} s; shot as it is")

    async def loaded(self, url: str) -> None:
        """Open a page that is not the app (no API requests) and wait for its document."""
        await self.call("Page.navigate", url=url)
        for _ in range(300):
            state = await self.call("Runtime.evaluate", expression="location.href + ' ' + document.readyState")
            if state["result"]["value"] == f"{url} complete":
                return
            await asyncio.sleep(0.1)
        raise SystemExit(f"{url} did not load")


async def shoot(shots: list[Shot], base: str, quiet: float) -> None:
    import websockets

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            port = _devtools_port(Path(profile))
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            target = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            async with websockets.connect(target, max_size=2**27) as ws:
                page = DevTools(ws)
                reader = asyncio.create_task(page.read())
                await page.call("Network.enable")
                for shot in shots:
                    await page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=shot.height, deviceScaleFactor=1, mobile=False)
                    if shot.storage:
                        # A page of the same origin that is not the app, so the app starts afresh below.
                        await page.loaded(f"{base}/health")
                        for key, value in shot.storage.items():
                            await page.call("Runtime.evaluate", expression=f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))})")
                    await page.loaded("about:blank")
                    await page.goto(shot.url, quiet)
                    image = await page.call("Page.captureScreenshot", format="png")
                    shot.path.write_bytes(base64.b64decode(image["data"]))
                    where = (await page.call("Runtime.evaluate", expression="location.href"))["result"]["value"]
                    print(f"{shot.path}: {where}")
                reader.cancel()
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def _devtools_port(profile: Path) -> str:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            return marker.read_text().split()[0]
        time.sleep(0.1)
    raise SystemExit("chromium did not open its DevTools port")


if __name__ == "__main__":
    main()
