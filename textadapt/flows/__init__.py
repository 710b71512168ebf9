"""The Prefect flows over the textadapt library: the only part of textadapt that imports Prefect.

``adapt.py`` the flow (``textadapt run``; entrypoint ``textadapt.flows.adapt.adapt``), ``workers.py``
its batches as Prefect tasks (threads or Dask), ``deployments.py`` ``textadapt schedule`` / ``serve``,
``artifacts.py`` the run's results in the Prefect UI, ``temporary_api.py`` the temporary Prefect API that
``textadapt run`` starts as its own child when there is no Prefect server.
"""
