"""Prefect flows: thin shells over tpgrpo's trainer and report (no algorithm here).

- ``flows.training.train_variant`` (flow ``tpgrpo-train``): one variant, a task per trainer step.
- ``flows.ablation.ablation`` (flow ``tpgrpo``): the fan-out over variants and seeds, and the
  comparison.
- ``python -m flows.serve``: both as deployments ``tpgrpo-train/train`` and ``tpgrpo/ablation``.

Importing this package does not import Prefect; import the submodules.
"""


def require_api(prog: str) -> None:
    """Exit with status 2 and one line on stderr when the configured Prefect API
    (``PREFECT_API_URL``, or ``prefect.toml`` in this directory) does not answer: Prefect's own
    report is a page of connection tracebacks. Without a configured API Prefect starts a
    temporary server of its own, and nothing is checked."""
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        detail = " ".join(str(problem).split()) or type(problem).__name__
        print(
            f"{prog}: error: Prefect API {url} does not answer ({detail}); expected a running server: "
            "`prefect server start`, or point PREFECT_API_URL at one",
            file=sys.stderr,
        )
        sys.exit(2)
