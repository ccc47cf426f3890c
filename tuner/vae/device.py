"""Which torch device a name means, checked against this machine (one line when it has no such device)."""

from __future__ import annotations

import torch

from tuner.errors import TunerError

__all__ = ["resolve_device"]


def resolve_device(name: str, source: str = "--device") -> torch.device:
    """'auto' -> the first GPU if there is one, else CPU; 'cpu'; 'cuda' or 'cuda:N' (checked).

    source: where the name came from, for the error (a worker's name may come from the study spec)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise TunerError(f"{source} '{name}' is not a device; use auto, cpu or cuda:N")
        count = torch.cuda.device_count()
        if count == 0 or (index and int(index) >= count):
            raise TunerError(f"{source} '{name}': this machine has {count} CUDA device(s); use auto or cpu")
        return torch.device(name)
    raise TunerError(f"{source} '{name}' is not a device; use auto, cpu or cuda:N")
