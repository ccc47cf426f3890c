"""From a study spec to running workers: what to search, how, and the processes that do it.

The spec (:mod:`.spec`, its space entries in :mod:`.entries`), sampling a trial's config
(:mod:`.space`), sampler and pruner (:mod:`.strategy`), creating and resuming a study (:mod:`.open`) and its first trials (:mod:`.start`),
the worker and its threads (:mod:`.worker`, :mod:`.bookkeeper`, :mod:`.evaluator`,
:mod:`.heartbeats`, :mod:`.memory`, :mod:`.worker_stats`), and the local and Ray launchers.

May import: :mod:`tuner.store`, :mod:`tuner.vae`, :mod:`tuner.spec`, :mod:`tuner.errors`; nothing from
``results``. ``tests/test_layout.py`` holds the rule.
"""
