"""The pure-torch reference path: the oracle every faster kernel is tested against."""

import math

import torch
import torch.nn.functional as F

from fqcompile.formats.nested import dequantize


def reference_linear(x: torch.Tensor, planes, meta, precision: int, int8_activations: bool = False) -> torch.Tensor:
    layout, scale, zero = meta
    if int8_activations:
        x = quantize_activations(x, layout.group_size)
    weight = dequantize(planes, scale, zero, layout, precision, dtype=x.dtype)
    return F.linear(x, weight)


def quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x^ of the int8-activation mode: per row and group of input columns (the weights'
    groups), s = max|x| / 127 and x^ = s * round(x / s), rounding half to even, in fp32.
    """
    k = x.shape[-1]
    groups = math.ceil(k / group_size)
    xf = F.pad(x.float(), (0, groups * group_size - k)).unflatten(-1, (groups, group_size))
    s = xf.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    xhat = torch.round(xf / s).clamp(-127, 127) * s
    return xhat.flatten(-2)[..., :k].to(x.dtype)
