"""The custom op fqcompile::nested_linear and which implementation serves each device.

One op, so torch.compile traces around it (it has a fake kernel) and the dispatcher
picks the implementation by the activations' device: the C++ kernel on CPU, Triton on
CUDA, the torch reference everywhere else and whenever the fast one cannot be had (no
compiler, no Triton): then a one-line warning says so, once.
"""

import os
import sys

import torch
import torch.nn.functional as F

from fqcompile.formats.nested import dequantize_planes
from fqcompile.kernels.reference import quantize_activations

SCHEMA = ("nested_linear(Tensor x, Tensor[] planes, int[] widths, Tensor scale, Tensor zero, "
          "int low, int group_size, bool int8_activations=False) -> Tensor")
LIB = torch.library.Library("fqcompile", "DEF")
LIB.define(SCHEMA)


def reference(x, planes, widths, scale, zero, low, group_size, int8_activations=False):
    """Dequantize the slice held by `planes`, then F.linear: the oracle for every kernel.

    int8_activations: the activations are first quantized in blocks (quantize_activations).
    """
    if int8_activations:
        x = quantize_activations(x)
    weight = dequantize_planes(planes, widths, scale, zero, low, group_size, x.shape[-1], dtype=x.dtype)
    return F.linear(x, weight)


# Serves every device that has no kernel of its own.
LIB.impl("nested_linear", reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fqcompile::nested_linear")
def _fake(x, planes, widths, scale, zero, low, group_size, int8_activations=False):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


_ready: dict[str, str] = {}  # device type -> name of the implementation serving it


def _say(message: str) -> None:
    print(f"fqcompile: {message}", file=sys.stderr)


def _fast(device_type: str) -> str:
    """Install the fast implementation for a device type; return its name."""
    if device_type == "cpu":
        from fqcompile.kernels import cpu

        cpu.load()
        return "cpu-cpp"
    if device_type == "cuda":
        from fqcompile.kernels import triton_nested

        LIB.impl("nested_linear", triton_nested.nested_linear, "CUDA")
        return "triton"
    raise RuntimeError(f"no fast kernel for {device_type} devices")


def backend(device: torch.device) -> str:
    """The implementation serving `device` ("cpu-cpp", "triton" or "reference"), set up on first use.

    FQCOMPILE_KERNELS=reference forces the reference path (for comparisons and debugging).
    """
    kind = device.type
    if kind not in _ready:
        if os.environ.get("FQCOMPILE_KERNELS", "") == "reference":
            _ready[kind] = "reference"
        else:
            try:
                _ready[kind] = _fast(kind)
            except Exception as exc:  # any failure to build or import: the reference still works
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                _say(f"fast {kind} kernels unavailable ({reason[:160]}); using the slower torch reference")
                _ready[kind] = "reference"
    return _ready[kind]


def nested_linear(x, planes, widths, scale, zero, low: int, group_size: int,
                  int8_activations: bool = False) -> torch.Tensor:
    if backend(x.device) == "reference":
        return reference(x, planes, widths, scale, zero, low, group_size, int8_activations)
    return torch.ops.fqcompile.nested_linear(x, planes, widths, scale, zero, low, group_size, int8_activations)
