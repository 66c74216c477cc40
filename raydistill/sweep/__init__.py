"""Ray Tune sweeps over students: ``raydistill tune`` and ``raydistill compare``.

- :mod:`raydistill.sweep.space`: the search-space YAML (``tune_spaces/*.yaml``), validated and turned into
  Tune's param space;
- :mod:`raydistill.sweep.capacity`: what a trial reserves and how many fit on the cluster;
- :mod:`raydistill.sweep.driver`: a sweep from start (or an interrupted one resumed) to its results: the cache
  filled once, the trials, the MLflow parent run;
- :mod:`raydistill.sweep.trial`: what runs inside Tune for one trial;
- :mod:`raydistill.sweep.results`: the sweep's table, Pareto sets and files.
"""
