"""What reads a running or finished study: the ranking, confirmation (:mod:`.confirm`: the winners
retrained with other seeds by :mod:`.retrain`), export and backup, the report, the dashboard.

May import: :mod:`tuner.store`, :mod:`tuner.vae`, :mod:`tuner.study` (for specs), :mod:`tuner.spec`,
:mod:`tuner.errors`. Nothing imports it but the top level (the CLI, the public API).
``tests/test_layout.py`` holds the rule.
"""
