"""FlexLinear: a linear layer over nested-bit weights whose precision can change per call."""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FqError
from .formats.nested import Layout
from .kernels import MAX_PACKED_BATCH, kernel_args, nested_linear, pack_rows, packed_linear, quantize_activations

# Bumped whenever a layer's precision, int8 flag or dense weights change: the slim decoder
# reuses its per-step plan until then (reading ~200 layers' settings cost ~0.25 ms a step).
changes = 0


def _watched(name: str) -> property:
    """An attribute that counts its assignments in `changes` (object.__setattr__ included)."""
    key = "_" + name

    def assign(self, value):
        global changes
        changes += 1
        self.__dict__[key] = value

    return property(lambda self: self.__dict__[key], assign)


def set_precisions(layers, bits) -> None:
    """Set the precision of many layers at once, unchecked (the controller's per-step switch:
    ~25 ns a layer, against ~0.5 us through the attribute and ~2 us through nn.Module)."""
    global changes
    changes += 1
    for layer in layers:
        layer.__dict__["_precision"] = bits


class FlexLinear(nn.Module):
    """y = x W_b^T + bias, W_b the b-bit slice of the nested weights (b = self.precision).

    Holds only the planes it was given: a layer loaded for at most 4 bits of an [4, 8]
    ladder has the top plane resident and refuses precision 8.
    """

    precision = _watched("precision")
    int8_activations = _watched("int8_activations")
    dense = _watched("dense")

    def __init__(self, layout: Layout, planes, scale: torch.Tensor, zero: torch.Tensor, bias=None):
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.in_features, layout.out_features
        for i, plane in enumerate(planes):
            if tuple(plane.shape) != layout.plane_shape(i) or plane.dtype != torch.uint8:
                raise FqError(f"plane {i} has shape {tuple(plane.shape)}, expected {layout.plane_shape(i)} uint8")
            self.register_buffer(f"plane{i}", plane, persistent=False)
        self.n_planes = len(planes)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.precision = max(self.precisions)
        self.dense = None  # {bits: weight} while runtime.dense_weights() is active
        self.int8_activations = False  # quantize inputs to int8 in blocks (kernels.quantize_activations)
        self._calls = {}  # bits -> the kernel's arguments: a decode step calls ~200 layers
        self._packs = {}  # bits -> pack_rows' tensors (or []), made on the first int8-activation call


    @property
    def precisions(self) -> tuple[int, ...]:
        """Ladder precisions whose planes are resident."""
        return tuple(b for b in self.layout.ladder if self.layout.planes_for(b) <= self.n_planes)

    def planes(self) -> list[torch.Tensor]:
        return [getattr(self, f"plane{i}") for i in range(self.n_planes)]

    def repoint(self, planes, scale, zero) -> None:
        """Use other tensors of the same shapes (e.g. views of a fused layer's)."""
        for i, plane in enumerate(planes):
            setattr(self, f"plane{i}", plane)
        self.scale, self.zero = scale, zero
        self._calls, self._packs = {}, {}

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() replace the buffers the caches hold
        self._calls, self._packs = {}, {}
        return super()._apply(fn, *args, **kwargs)

    def set_precision(self, bits) -> None:
        """One precision for the whole batch (int), or one per batch row (a [B] tensor of bits)."""
        wanted = set(bits.tolist()) if torch.is_tensor(bits) else {bits}
        if not wanted <= set(self.precisions):
            raise FqError(f"precision {sorted(wanted)} is not available (loaded: {list(self.precisions)})")
        self.precision = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.precision
        int8 = self.int8_activations
        if type(bits) is int and not self.dense:  # the decode path: as few Python steps as possible
            return self.run(x, bits, int8)
        values = bits.unique().tolist() if torch.is_tensor(bits) else [bits]
        if self.dense:
            def run(v, b):
                return F.linear(quantize_activations(v) if int8 else v, self.dense[b])
        else:
            def run(v, b):
                return nested_linear(v, *self._args(b), int8)
        if len(values) == 1:
            y = run(x, values[0])
        else:  # per-row precisions: each group of rows through its own slice
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for b in values:
                rows = bits == b
                y[rows] = run(x[rows], b)
        return y + self.bias if self.bias is not None else y

    def run(self, x: torch.Tensor, bits: int, int8_activations: bool = False) -> torch.Tensor:
        """The kernel at one precision for every row (what forward does for an int precision)."""
        if int8_activations and x.numel() <= MAX_PACKED_BATCH * self.in_features and (packs := self.packed(bits)):
            y = packed_linear(x, packs, self.out_features, self.layout.ladder[0], self.layout.group_size)
        else:
            y = nested_linear(x, *self._args(bits), int8_activations)
        return y if self.bias is None else y + self.bias

    def packed(self, bits: int) -> list:
        """The planes of `bits` packed by rows for the CPU int8-activation decode kernel, or [] where it
        does not apply (kernels.pack_rows). Made once, on first use: a copy of the slice's plane."""
        packs = self._packs.get(bits)
        if packs is None:
            packs = self._packs[bits] = pack_rows(*self._args(bits)[:4], self.in_features, self.layout.group_size)
        return packs

    def _args(self, bits: int) -> tuple:
        call = self._calls.get(bits)
        if call is None:
            call = self._calls[bits] = kernel_args(self.planes(), (self.layout, self.scale, self.zero), bits)
        return call

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, group={self.layout.group_size}, "
            f"ladder={list(self.layout.ladder)}, precision={self.precision}"
            + (", int8_activations=True" if self.int8_activations else "")
        )
