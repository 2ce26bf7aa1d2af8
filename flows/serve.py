"""Serve both flows from one process: ``python -m flows.serve`` (run it in the project root).

Deployments ``tpgrpo/ablation`` and ``tpgrpo-train/train``; every flow run executes in its own
subprocess of this one, so an ablation's runs train in parallel: as many at once as the study's
``ablation.max_parallel`` (the ablation submits no more), and never more than ``--limit`` flow
runs (the ablation's own run holds one slot while it waits). Then, from any shell with the same
``PREFECT_API_URL`` (prefect.toml pins it for this directory)::

    prefect deployment run tpgrpo/ablation --watch

Alternative with a work pool (several machines, or workers with their own limits): see
prefect.yaml (``prefect deploy --all`` and ``prefect worker start --pool tpgrpo-pool``).
"""

from __future__ import annotations

import argparse
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

    from prefect import serve

    from flows import require_api

    require_api(parser.prog)
    serve(*build_deployments(args.train_concurrency), limit=args.limit)


if __name__ == "__main__":
    main()
