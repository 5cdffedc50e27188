"""The pure-torch reference path: the oracle every faster kernel is tested against."""

import torch
import torch.nn.functional as F

from fqcompile.formats.nested import dequantize


def reference_linear(x: torch.Tensor, planes, meta, precision: int) -> torch.Tensor:
    layout, scale, zero = meta
    weight = dequantize(planes, scale, zero, layout, precision, dtype=x.dtype)
    return F.linear(x, weight)
