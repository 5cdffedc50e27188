"""The kernel interface: (activations, planes, metadata, precision) -> output.

`flex_linear` reads only the planes that hold the top `precision` bits and runs the op
fqcompile::nested_linear (kernels/ops.py), whose implementation depends on the device:
the C++ CPU kernel (cpu_nested.cpp, compiled on first use), Triton on CUDA
(triton_nested.py), or the torch reference (reference.py), with a one-line warning when
a fast one cannot be had. `kernel_args` is the op's arguments for one precision:
FlexLinear builds them once per precision and calls the op with them (a decode step makes
~200 calls).
"""

import torch

from fqcompile.kernels.ops import MAX_PACKED_BATCH, backend, nested_linear, pack_rows, packed_linear, packs_rows, unpack_rows
from fqcompile.kernels.reference import nested_linear_reference, quantize_activations


def flex_linear(x: torch.Tensor, planes, meta, precision: int, int8_activations: bool = False) -> torch.Tensor:
    """y = x @ W_b^T for the b-bit slice of nested weights.

    planes: uint8 plane tensors, most significant first (at least those needed for b);
    meta: a `formats.nested.Layout` plus `scale` (fp16 [N, G]) and `zero` (uint8 [N, G])
    as `(layout, scale, zero)`. int8_activations: quantize x to int8 per block of 16
    columns first (`reference.quantize_activations`); faster on CPUs with AVX-512 VNNI or
    AVX2, at a small accuracy cost (docs/kernels.md).
    """
    return nested_linear(x, *kernel_args(planes, meta, precision), int8_activations)


def reference_linear(x: torch.Tensor, planes, meta, precision: int, int8_activations: bool = False) -> torch.Tensor:
    """flex_linear through the pure-torch reference (the oracle of the tests)."""
    return nested_linear_reference(x, *kernel_args(planes, meta, precision), int8_activations)


def kernel_args(planes, meta, precision: int) -> tuple:
    """The op's arguments after x for the b-bit slice (FlexLinear builds them once per precision)."""
    layout, scale, zero = meta
    n = layout.planes_for(precision)
    return (list(planes[:n]), list(layout.widths[:n]), scale, zero, *layout.slice_args(precision))


__all__ = ["MAX_PACKED_BATCH", "backend", "flex_linear", "kernel_args", "nested_linear", "pack_rows", "packed_linear",
           "packs_rows", "quantize_activations", "reference_linear", "unpack_rows"]
