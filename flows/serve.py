"""Serve both flows from one process: ``python -m flows.serve`` (run it in the project root).

Deployments ``tpgrpo/ablation`` and ``tpgrpo-train/train``; every flow run executes in its own
subprocess of this one, so an ablation's runs train in parallel: as many at once as the study's
``ablation.max_parallel`` (the ablation submits no more), and never more than ``--limit`` flow
runs (the ablation's own run holds one slot while it waits). Then, from any shell with the same
``PREFECT_API_URL`` (prefect.toml pins it for this directory)::

    prefect deployment run tpgrpo/ablation --watch

Ctrl-C or SIGTERM stops it: deployments paused and running flow runs cancelled while the API
answers; within 15 seconds in any case (with the API gone, Prefect's own shutdown would retry for
over a minute).

Alternative with a work pool (several machines, or workers with their own limits): see
prefect.yaml (``prefect deploy --all`` and ``prefect worker start --pool tpgrpo-pool``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Sequence

from prefect.deployments.runner import EntrypointType

ABLATION_DEPLOYMENT = "ablation"


def build_deployments(train_concurrency: int | None = None) -> list:
    """The two runner deployments (module entrypoints: they resolve wherever the package is
    installed, independent of the working directory)."""
    from flows.ablation import ablation
    from flows.training import DEPLOYMENT_NAME, train_variant

    return [
        ablation.to_deployment(
            name=ABLATION_DEPLOYMENT,
            description="A seeded study of params.yaml (study=NAME under `studies`, default the `ablation` section): every (variant, seed) as a child run, then the comparison over seeds with 95% intervals and power.",
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        train_variant.to_deployment(
            name=DEPLOYMENT_NAME,
            description="GRPO fine-tuning of one variant of params.yaml.",
            entrypoint_type=EntrypointType.MODULE_PATH,
            concurrency_limit=train_concurrency,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="most flow runs at once, the ablation's own run included (at least 2; default: no limit)",
    )
    parser.add_argument(
        "--train-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="most training runs at once (a deployment concurrency limit; default: no limit)",
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 2:
        parser.error("--limit: expected at least 2 (an ablation run waits on its training runs)")
    if args.train_concurrency is not None and args.train_concurrency < 1:
        parser.error("--train-concurrency: expected at least 1")

    from flows import require_api

    require_api(parser.prog)
    if os.environ.get(_SERVING) == "1":
        from prefect import serve

        serve(*build_deployments(args.train_concurrency), limit=args.limit)
        return
    sys.exit(_supervise(parser.prog, list(sys.argv[1:] if argv is None else argv)))


# Set in the serving child: the parent only supervises it.
_SERVING = "TPGRPO_SERVE_CHILD"
# How long a stop may take: pausing the deployments takes seconds while the Prefect API answers;
# with the API gone, Prefect retries every call for over a minute before giving up.
STOP_GRACE_SECONDS = 15.0


def _supervise(prog: str, argv: list[str]) -> int:
    """Serve in a child process (its own process group, with the flow runs it starts) and stop it
    on SIGINT / SIGTERM: a graceful stop first (deployments paused, runs cancelled), then, after
    ``STOP_GRACE_SECONDS``, the whole group killed with one line saying so."""
    child = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", *argv], env={**os.environ, _SERVING: "1"}, start_new_session=True
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not stop.is_set():
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    while child.poll() is None and not stop.is_set():
        stop.wait(0.5)
    if not stop.is_set():
        return child.returncode
    try:
        child.wait(STOP_GRACE_SECONDS)
        return 0
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        print(
            f"{prog}: stopped after {STOP_GRACE_SECONDS:.0f} s without a graceful shutdown (the Prefect API did "
            "not answer); deployments were not paused and running flow runs were killed",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    main()
