"""Prefect flows: thin shells over tpgrpo's trainer and report (no algorithm here).

- ``flows.training.train_variant`` (flow ``tpgrpo-train``): one variant, a task per trainer step.
- ``flows.ablation.ablation`` (flow ``tpgrpo``): the fan-out over variants and seeds, and the
  comparison.
- ``python -m flows.serve``: both as deployments ``tpgrpo-train/train`` and ``tpgrpo/ablation``.

Importing this package does not import Prefect; import the submodules.
"""
