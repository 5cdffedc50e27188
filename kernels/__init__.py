"""The one kernel interface FlexLinear calls: (activations, planes, metadata, precision) -> output.

Today every device runs the torch reference (dequantize, then matmul); the fast CPU
path and the Triton kernels slot in behind `flex_linear` by device.

Imports are absolute on purpose: with the repository root on sys.path (python -m from
the checkout), transformers probes for the PyPI package `kernels` and imports this folder
under that name; absolute imports keep that harmless.
"""

import torch

from fqcompile.kernels.reference import reference_linear


def flex_linear(x: torch.Tensor, planes, meta, precision: int) -> torch.Tensor:
    """y = x @ W_b^T for the b-bit slice of nested weights.

    planes: uint8 plane tensors, most significant first (at least those needed for b);
    meta: a `formats.nested.Layout` plus `scale` (fp16 [N, G]) and `zero` (uint8 [N, G])
    as `(layout, scale, zero)`.
    """
    return reference_linear(x, planes, meta, precision)


__all__ = ["flex_linear", "reference_linear"]
