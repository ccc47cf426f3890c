"""Atomic file writes: a reader never sees a torn file, and a crash never leaves one behind.

Shared by every part of the package (the data cache, checkpoints, rankings, reports, run folders),
like :mod:`tuner.errors`: it imports nothing of tuner.

The data goes to a temporary file in the target's folder (the same file system), which is then
renamed over the target; on any failure the temporary file is removed and the error re-raised,
so each caller turns it into its own one-line message.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["save_atomic", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (str as UTF-8; a callable writes to the open file itself, sparing a copy of
    large data) to `path` atomically; OSError (nothing left behind) on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; checkpoints, rankings and reports are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save, written atomically: a crash never leaves a torn checkpoint. Straight into the
    file: through a BytesIO it cost twice the CPU."""
    import torch  # lazy: the rest of this module needs no torch

    write_atomic(path, lambda f: torch.save(obj, f))
