"""Layers with a leading slot axis: one module holds N independent models.

A dense layer is a batched matmul over slots; a conv layer is a grouped convolution with one group
per slot. Slots may use fewer units than the population's maximum: their weights are drawn at the
slot's *true* shape (so the initial scale follows the slot's real fan-in, and the draws match the
same model built alone), and the rest is zero. Zero padding stays zero during training: a padded
unit has zero input weights and bias, so it outputs 0 after ReLU and receives zero gradient, and
every optimizer update (Adam, AdamW, SGD, weight decay) of a zero with a zero gradient is zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StackedConv2d", "StackedConvTranspose2d", "StackedLinear", "fold_slots", "unfold_slots"]


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class StackedLinear(nn.Module):
    """y[s] = x[s] @ W[s] + b[s] for every slot s.  x (S, B, in_max) -> (S, B, out_max)."""

    def __init__(self, slots: int, in_max: int, out_max: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(slots, in_max, out_max))  # (S, in, out)
        self.bias = nn.Parameter(torch.zeros(slots, 1, out_max))  # (S, 1, out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

    @torch.no_grad()
    def init_slot(self, slot: int, fan_in: int, fan_out: int, generator: torch.Generator) -> None:
        """PyTorch's default Linear init (U(+-1/sqrt(fan_in))) at the slot's true shape, zero-padded."""
        bound = 1.0 / math.sqrt(fan_in)
        self.weight[slot].zero_()
        self.bias[slot].zero_()
        self.weight[slot, :fan_in, :fan_out] = _uniform((fan_in, fan_out), bound, generator)
        self.bias[slot, 0, :fan_out] = _uniform((fan_out,), bound, generator)


class StackedConv2d(nn.Module):
    """Grouped (transposed) conv, one group per slot.  x (B, S*C_in, H, W) -> (B, S*C_out, H', W')."""

    transposed = False

    def __init__(self, slots: int, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.slots, self.stride, self.padding = slots, stride, padding
        # conv weights are (C_out, C_in, k, k) per group, transposed ones (C_in, C_out, k, k)
        pair = (c_in, c_out) if self.transposed else (c_out, c_in)
        self.fan_in = c_in * kernel * kernel
        self.weight = nn.Parameter(torch.zeros(slots, *pair, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(slots, c_out))

    def forward(self, x: Tensor) -> Tensor:
        conv = F.conv_transpose2d if self.transposed else F.conv2d
        w = self.weight.flatten(0, 1)  # (S*first, second, k, k): one group per slot
        return conv(x, w, self.bias.flatten(), self.stride, self.padding, groups=self.slots)

    @torch.no_grad()
    def init_slot(self, slot: int, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.fan_in)
        self.weight[slot] = _uniform(tuple(self.weight.shape[1:]), bound, generator)
        self.bias[slot] = _uniform(tuple(self.bias.shape[1:]), bound, generator)


class StackedConvTranspose2d(StackedConv2d):
    """Grouped transposed conv, one group per slot (the decoder's upsampling)."""

    transposed = True


def fold_slots(x: Tensor) -> Tensor:
    """(S, B, C, H, W) -> (B, S*C, H, W): the layout grouped convolutions want."""
    s, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, s * c, h, w)


def unfold_slots(x: Tensor, slots: int) -> Tensor:
    """(B, S*C, H, W) -> (S, B, C*H*W): back to the slot-major layout of dense layers."""
    b = x.shape[0]
    return x.reshape(b, slots, -1).transpose(0, 1)
