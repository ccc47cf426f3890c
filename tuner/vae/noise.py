"""Counter-based random numbers, one independent stream per slot.

Why not ``torch.Generator``: a population of N slots would need N generators and N kernel launches
per draw, and a slot's numbers would depend on the population's padded shapes. Here every value is a
pure function of (slot key, element coordinates): a hash, like Philox or JAX's PRNG keys. So

* a slot's noise does not depend on its neighbours or on the population's maximum latent/hidden
  size (coordinates are per axis, not flat offsets), which makes a slot in a population of 8
  bit-for-bit the same stream as that config trained alone;
* resuming from a checkpoint needs only (seed, step): there is no generator state to save;
* a draw is a handful of elementwise integer ops (graph-capturable, no host sync).

Keys are int64 tensors of shape (S,) holding 32-bit values. :func:`derive` folds counters (stream
id, step, epoch, ...) into keys; :func:`uniform` and :func:`normal` draw (S, *shape) tensors.
The mixer is Chris Wellons' ``lowbias32``; multiplication is split into 16-bit halves so every
intermediate stays exact in int64 on every backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["bernoulli", "derive", "keys_from_seeds", "normal", "uniform"]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_TWO_POW_M24 = 1.0 / (1 << 24)


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """(x * c) mod 2**32 for x in [0, 2**32), exact in int64 (no signed overflow); x a tensor or an int."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix(x: Tensor) -> Tensor:
    """lowbias32: a bijective 32-bit hash with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keys_from_seeds(seeds: Tensor) -> Tensor:
    """(S,) int64 seeds -> (S,) keys. Seeds are taken mod 2**32."""
    return _mix(seeds.to(torch.int64) & _M32)


def derive(keys: Tensor, *counters: int | Tensor) -> Tensor:
    """Fold counters (python ints or (S,) int64 tensors) into (S,) keys, in order.

    A python int is hashed on the host and enters as a scalar operand, the same bits a 0-dim tensor
    would give: no tensor is made from it, so no host-to-device copy (a sync on CUDA, and an error
    under CUDA graph capture) happens per call.
    """
    out = keys
    for c in counters:
        if isinstance(c, Tensor):
            h = _mul32((c.to(torch.int64) + 1) & _M32, _GOLDEN)
        else:
            h = _mul32((int(c) + 1) & _M32, _GOLDEN)  # an int in [0, 2**32), as the tensor path's
        out = _mix(out ^ h)
    return out


def _bits(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(S, *shape) 32-bit hashes; each element's value depends only on its key and coordinates."""
    h = keys.view(-1, *([1] * len(shape)))
    for axis, size in enumerate(shape):
        view = [1] * (len(shape) + 1)
        view[axis + 1] = size
        idx = torch.arange(size, dtype=torch.int64, device=keys.device).view(view)
        h = _mix(h ^ _mul32(idx + 1, _GOLDEN))
    return h


def uniform(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(S, *shape) float32 uniforms in [0, 1) with 24-bit resolution."""
    return (_bits(keys, shape) >> 8).to(torch.float32) * _TWO_POW_M24


def normal(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(S, *shape) float32 standard normals (Box-Muller on two uniforms per element)."""
    h1 = _bits(keys, shape)
    h2 = _mix(h1 ^ 0x5BD1E995)
    u1 = ((h1 >> 8) + 1).to(torch.float32) * _TWO_POW_M24  # (0, 1]: log is finite
    u2 = (h2 >> 8).to(torch.float32) * _TWO_POW_M24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def bernoulli(keys: Tensor, probs: Tensor) -> Tensor:
    """(S, *shape) draws of 1.0 with probability probs (same shape), else 0.0.

    Two 16-bit uniforms per hash along the last axis: half the hashing of :func:`uniform`, and
    16 bits resolve any 8-bit pixel intensity (the binarization use) far below its quantization.
    """
    *lead, d = probs.shape[1:]
    h = _bits(keys, (*lead, (d + 1) // 2))
    u = torch.stack(((h & 0xFFFF), (h >> 16)), dim=-1).flatten(-2)[..., :d]
    return ((u.to(torch.float32) + 0.5) * (1.0 / 65536) < probs).to(probs.dtype)
