"""The model maths and the population engine: what one trial trains and how many train at once.

Data (:mod:`.data`), stacked layers, models and their families (:mod:`.layers`, :mod:`.models`,
:mod:`.priors`, :mod:`.flows`, :mod:`.ladder`, :mod:`.mixture`, :mod:`.diffusion`; the collapse
remedies :mod:`.remedies`, :mod:`.mmd`, :mod:`.ortho`, :mod:`.aggressive`), counter-based noise,
schedules, the stacked optimizer, the population (:mod:`.population`, :mod:`.engine`, :mod:`.slot_state`, :mod:`.epoch_graph`), the
metrics and gaps a trial is scored by, and the pictures of a model (:mod:`.images`, captioned by
:mod:`.captions`).

May import: torch, numpy, and of tuner only the training config (:mod:`tuner.spec`, for types) and
:mod:`tuner.errors`; nothing from ``store``, ``study`` or ``results`` (a GPU host runs it with torch
and numpy alone; Pillow only where a picture is drawn). ``tests/test_layout.py`` holds the rule.
"""
