"""The SQL store and the files beside it: where a study's state lives between processes and hosts.

Storage URLs and opening a store (:mod:`.urls`), the per-process trial cache (:mod:`.cache`), retries
through an outage (:mod:`.retry`), the budget lock, many attrs in one transaction (:mod:`.attrs`), the
artifact root and trial images as Optuna artifacts (:mod:`.artifacts`), and trial checkpoints on
disk (:mod:`.checkpoints`); atomic writes are :mod:`tuner.atomic`, shared with every part.

May import: :mod:`tuner.vae` (only for the types it stores), :mod:`tuner.spec`, :mod:`tuner.errors`;
nothing from ``study`` or ``results``. ``tests/test_layout.py`` holds the rule.
"""
