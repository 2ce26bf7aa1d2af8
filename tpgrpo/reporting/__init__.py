"""Reports over run directories.

- :mod:`tpgrpo.reporting.report`: the ablation table and plots of ``tpgrpo report`` (DVC outputs:
  no wall-clock time in them);
- :mod:`tpgrpo.reporting.study`: a seeded study's report over seeds (``tpgrpo study``, the
  ``tpgrpo`` flow), and the names of its runs;
- :mod:`tpgrpo.reporting.stats`: their statistics, on scipy;
- :mod:`tpgrpo.reporting.plots`: the figures' common parts.

Runs are read with :func:`tpgrpo.rundir.read_run`, files written with :mod:`tpgrpo.fileio`,
MLflow reached through :mod:`tpgrpo.tracking`. Importing this package imports none of them.
"""
