"""The one exception users see.

Every user mistake (bad config field, missing file, bad data) raises :class:`TunerError`.
The CLI prints its message as one line and exits with code 2, so the message must name the
field or file, the bad value, and the fix.
"""

from __future__ import annotations

__all__ = ["TunerError"]


class TunerError(ValueError):
    """A user mistake: the message says what is wrong and how to fix it (one line)."""
