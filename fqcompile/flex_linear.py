"""FlexLinear: a linear layer over nested-bit weights whose precision can change per call; and fusion
of several such layers on one input into one (their planes become row views of the fused one's)."""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FqError
from .formats.nested import Layout
from .kernels import (MAX_PACKED_BATCH, kernel_args, nested_linear, pack_rows, packed_linear, quantize_activations,
                      unpack_rows)

# Bumped whenever a layer's precision, int8 flag, dense weights or gate change: the slim decoder
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


def set_gate(layer, gate) -> None:
    """Give `layer` a function its forward calls first with the input (None: no gate): the
    controller's per-token decision for the unit it starts (an error-estimate policy)."""
    global changes
    changes += 1
    layer.gate = gate


class FlexLinear(nn.Module):
    """y = x W_b^T + bias, W_b the b-bit slice of the nested weights (b = self.precision).

    Holds only the planes it was given: a layer loaded for at most 4 bits of an [4, 8]
    ladder has the top plane resident and refuses precision 8. In int8-activation mode on
    CPUs with the packed kernel it holds them packed instead (pack(); same bytes).
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
        self.gate = None  # set_gate
        self._calls = {}  # bits -> nested_linear's arguments: a decode step calls ~200 layers
        self._slices = {b: layout.slice_args(b) for b in layout.ladder}  # packed_linear's grid arguments
        self._packs = None  # bits -> packed_linear's tensors while the planes are held packed (pack())
        self._packable = None  # whether pack() applies (known after its first try)
        self._rows = []  # a fused layer's parts and their first rows (fuse) ...
        self._owner = None  # ... and a part's fused layer, which packs and unpacks for it

    @property
    def precisions(self) -> tuple[int, ...]:
        """Ladder precisions whose planes are resident."""
        return tuple(b for b in self.layout.ladder if self.layout.planes_for(b) <= self.n_planes)

    def planes(self) -> list[torch.Tensor]:
        """The nested planes (unpacked first if the layer holds them packed)."""
        if self._packs is not None:
            self.unpack()
        return [getattr(self, f"plane{i}") for i in range(self.n_planes)]

    def repoint(self, planes, scale, zero) -> None:
        """Use other tensors of the same shapes (e.g. views of a fused layer's)."""
        for i, plane in enumerate(planes):
            setattr(self, f"plane{i}", plane)
        self.scale, self.zero = scale, zero
        self._calls, self._packs = {}, None

    def pack(self) -> bool:
        """Hold the planes packed 8 rows at a time (kernels.pack_rows: the same bytes, in the CPU
        int8-activation decode kernel's order) instead of nested, where that kernel applies.
        True if they are held packed. A fused layer's parts get row views of its packs."""
        if self._owner is not None:
            return self._owner.pack()
        if self._packs is not None or self._packable is False:
            return self._packs is not None
        packs = []
        if all(part.out_features % 8 == 0 for part, _ in self._rows):  # parts own whole 8-row blocks
            packs = pack_rows(self.planes(), self.layout.widths[:self.n_planes], self.scale, self.zero,
                              self.in_features, self.layout.group_size)
        self._packable = bool(packs)
        if packs:
            # per precision: its planes' codes, then the packed scale and zero (shared)
            by_bits = {b: packs[:self.layout.planes_for(b)] + packs[-2:] for b in self.precisions}
            self._hold(by_bits)
            for part, start in self._rows:
                part._hold({b: [t[start // 8:(start + part.out_features) // 8] for t in ts] for b, ts in by_bits.items()})
        return self._packable

    def _hold(self, packs: dict) -> None:
        for i in range(self.n_planes):
            setattr(self, f"plane{i}", None)  # the packs hold the same bytes
        self._calls, self._packs = {}, packs

    def unpack(self) -> None:
        """Hold the nested planes again (made from the packs, bit for bit), e.g. for float activations."""
        if self._owner is not None:
            return self._owner.unpack()
        if self._packs is None:
            return
        codes = self._packs[max(self.precisions)][:self.n_planes]
        planes = [unpack_rows(c, self.out_features) for c in codes]
        self.repoint(planes, self.scale, self.zero)
        for part, start in self._rows:
            part.repoint([plane[start:start + part.out_features] for plane in planes], part.scale, part.zero)

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() replace the buffers the caches hold
        self.unpack()
        self._calls = {}
        return super()._apply(fn, *args, **kwargs)

    def set_precision(self, bits) -> None:
        """One precision for the whole batch (int), or one per batch row (a [B] tensor of bits;
        the controller also sets [B, T] tensors, one per position, through set_precisions)."""
        wanted = set(bits.tolist()) if torch.is_tensor(bits) else {bits}
        if not wanted <= set(self.precisions):
            raise FqError(f"precision {sorted(wanted)} is not available (loaded: {list(self.precisions)})")
        self.precision = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate(x)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """forward without the gate: at the precision set now."""
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
                return self._linear(v, b, int8)
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
        y = self._linear(x, bits, int8_activations)
        return y if self.bias is None else y + self.bias

    def _linear(self, x: torch.Tensor, bits: int, int8_activations: bool) -> torch.Tensor:
        # In int8 mode the packed rows serve every call once held (from the first decode-sized
        # call on, where they apply); float activations need the nested planes (planes() unpacks).
        if int8_activations and (self._packs is not None
                                 or (x.numel() <= MAX_PACKED_BATCH * self.in_features and self.pack())):
            return packed_linear(x, self._packs[bits], self.out_features, *self._slices[bits])
        return nested_linear(x, *self.call_args(bits), int8_activations)

    def packed(self, bits: int) -> list:
        """packed_linear's tensors for `bits` while the planes are held packed (pack()), else []."""
        return self._packs[bits] if self._packs is not None else []

    def call_args(self, bits: int) -> tuple:
        """nested_linear's arguments after x for `bits` (built once per precision)."""
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


def fuse(parts: list[FlexLinear]) -> FlexLinear:
    """One FlexLinear over the parts' rows; the parts' planes become views of its planes."""
    first = parts[0].layout
    if any(p.layout.in_features != first.in_features or p.layout.group_size != first.group_size
           or p.layout.ladder != first.ladder or p.layout.grid != first.grid
           or p.layout.zero_offset != first.zero_offset or p.n_planes != parts[0].n_planes for p in parts):
        raise FqError("cannot fuse layers with different inputs or layouts")
    rows = [p.out_features for p in parts]
    planes = [torch.cat([p.planes()[i] for p in parts]) for i in range(parts[0].n_planes)]
    scale = torch.cat([p.scale for p in parts])
    zero = torch.cat([p.zero for p in parts])
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([p.bias.data if p.bias is not None else scale.new_zeros(n, dtype=torch.float32)
                          for p, n in zip(parts, rows)])
    fused = FlexLinear(replace(first, out_features=sum(rows)), planes, scale, zero, bias)
    start = 0
    for p, n in zip(parts, rows):
        p.repoint([plane[start:start + n] for plane in fused.planes()], fused.scale[start:start + n],
                  fused.zero[start:start + n])
        fused._rows.append((p, start))  # it packs and unpacks for them (pack)
        p._owner = fused
        start += n
    return fused
