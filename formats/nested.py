"""Nested-bit weights: master codes, their bit planes, and the dequantization of a slice.

A weight matrix W [N, K] is quantized group-wise along K (groups of `group_size`; the
last group of a row may be shorter). Each group has one scale s (fp16) and one integer
zero point z (uint8) that define the grid of the LOWEST rung b0 of the ladder:
    W_b0 = s * (q_b0 - z)            (plain asymmetric round-to-nearest at b0 bits)
The B-bit master codes (B = top of the ladder) refine that grid: every b0-bit bucket is
cut into 2^(B-b0) equal cells and a weight takes the code of the cell it falls in. So
the b-bit model is the top b bits of every code, q_b = q >> (B - b), dequantized at the
centre of its cell:
    W_b = s_b * (q_b - z_b),  s_b = s / 2^(b-b0),  z_b = (z + 1/2) * 2^(b-b0) - 1/2
At b = b0 this is exactly round-to-nearest at b0 bits; at b = B the step is
range / ((2^b0 - 1) * 2^(B-b0)), e.g. 1/240 instead of 1/255 of the range for [4, 8].
Anchoring the grid at the top instead (8-bit RTN, 4-bit = top nibble) costs the lowest
slice far more than direct quantization at its width (docs/results.md).

Storage is plane-wise, most significant bits first. The bits between two neighbouring
rungs of the ladder form one or more planes whose widths are powers of two (1, 2, 4, 8),
so ladder [4, 8] -> planes of widths [4, 4]; [2, 3, 4, 6, 8] -> [2, 1, 1, 2, 2];
[3, 8] -> [2, 1, 4, 1]. A b-bit read touches only the planes covering the top b bits.

Within a plane of width w, each byte holds k = 8 / w codes of one row: the row (padded
with zero codes to a multiple of 8) is cut into k equal segments and byte j holds code j
of every segment, segment s in bits [s*w, (s+1)*w). Unpacking is k shift-and-mask
operations, each yielding a contiguous run of codes.
"""

import math
from dataclasses import dataclass

import torch

from fqcompile.errors import FqError

MIN_BITS, MAX_BITS = 2, 8
PLANE_WIDTHS = (8, 4, 2, 1)


def check_ladder(ladder) -> tuple[int, ...]:
    ladder = tuple(int(b) for b in ladder)
    if not ladder:
        raise FqError("the precision ladder is empty")
    if any(b < MIN_BITS or b > MAX_BITS for b in ladder):
        raise FqError(f"ladder {list(ladder)}: every width must be between {MIN_BITS} and {MAX_BITS} bits")
    if any(a >= b for a, b in zip(ladder, ladder[1:])):
        raise FqError(f"ladder {list(ladder)}: widths must be strictly increasing")
    return ladder


def plane_widths(ladder) -> tuple[int, ...]:
    """Widths of the stored planes, most significant first (see module doc)."""
    widths, prev = [], 0
    for rung in ladder:
        gap = rung - prev
        for w in PLANE_WIDTHS:
            while gap >= w:
                widths.append(w)
                gap -= w
        prev = rung
    return tuple(widths)


@dataclass(frozen=True)
class Layout:
    """Shape and bit layout of one quantized linear weight."""

    out_features: int
    in_features: int
    group_size: int
    ladder: tuple[int, ...]

    @property
    def master_bits(self) -> int:
        return self.ladder[-1]

    @property
    def n_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    @property
    def padded_in(self) -> int:
        return math.ceil(self.in_features / 8) * 8

    @property
    def widths(self) -> tuple[int, ...]:
        return plane_widths(self.ladder)

    def planes_for(self, bits: int) -> int:
        """How many planes (from the top) make up the top `bits` bits."""
        if bits not in self.ladder:
            raise FqError(f"precision {bits} is not in the ladder {list(self.ladder)}")
        total, n = 0, 0
        while total < bits:
            total += self.widths[n]
            n += 1
        return n

    def plane_shape(self, index: int) -> tuple[int, int]:
        return (self.out_features, self.padded_in * self.widths[index] // 8)


def group_grid(wmin: torch.Tensor, wmax: torch.Tensor, low: int):
    """Scale (fp16) and zero (uint8) of the lowest rung's grid for groups spanning [wmin, wmax].

    The range is widened to include 0 (as GPTQ does) so the zero point is a valid code.
    The stored fp16 scale is rounded up, never down, so the grid still spans the range
    and no weight is clamped by more than half a step.
    """
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    qmax = 2**low - 1
    exact = (wmax - wmin) / qmax
    scale = exact.to(torch.float16)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    # An all-zero group has no range: the smallest fp16 step keeps it within 3e-8 of 0 at
    # every precision (above the lowest rung, 0 sits on a cell edge, not a cell centre).
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))
    if not torch.isfinite(scale).all():
        raise FqError("weights too large for fp16 group scales")
    zero = torch.round(-wmin / scale.float()).clamp(0, qmax)
    return scale, zero.to(torch.uint8)


def group_range(w: torch.Tensor, group_size: int):
    """Per-group (min, max) of W [..., N, K] along K; the last group may be shorter."""
    k = w.shape[-1]
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    lo = torch.nn.functional.pad(w, (0, pad), value=torch.inf).unflatten(-1, (groups, group_size)).amin(-1)
    hi = torch.nn.functional.pad(w, (0, pad), value=-torch.inf).unflatten(-1, (groups, group_size)).amax(-1)
    return lo, hi


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, bits: int) -> torch.Tensor:
    """The b-bit code of the cell each weight falls in (weights [..., K], scale/zero per weight).

    In units of the lowest rung's buckets, u = w / s + z + 1/2 puts bucket q at [q, q + 1);
    a b-bit cell is 1 / 2^(b - low) of a bucket.
    """
    cells = 2 ** (bits - low)
    codes = torch.floor((w / scale.float() + zero.float() + 0.5) * cells)
    return codes.clamp(0, 2**bits - 1)


def quantize_rtn(w: torch.Tensor, group_size: int, ladder):
    """Round-to-nearest group quantization of W [N, K] to nested master codes (module doc).

    Returns codes (uint8 [N, K], B bits), scale (fp16 [N, G]) and zero (uint8 [N, G]) of
    the lowest rung's grid. Every weight is within half a step of its dequantized value
    at every precision of the ladder.
    """
    if not torch.isfinite(w).all():
        raise FqError("weights contain NaN or Inf")
    w = w.detach().to(torch.float32)
    scale, zero = group_grid(*group_range(w, group_size), ladder[0])
    g_idx = torch.arange(w.shape[1]) // group_size
    codes = encode(w, scale[:, g_idx], zero[:, g_idx], ladder[0], ladder[-1])
    return codes.to(torch.uint8), scale, zero


def pack_planes(codes: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Split B-bit codes [N, K] into the layout's planes (uint8), most significant first."""
    codes = torch.nn.functional.pad(codes.to(torch.int32), (0, layout.padded_in - layout.in_features))
    planes, low = [], layout.master_bits
    for w in layout.widths:
        low -= w
        values = (codes >> low) & ((1 << w) - 1)
        k = 8 // w
        segments = values.view(layout.out_features, k, layout.padded_in // k)
        packed = torch.zeros_like(segments[:, 0])
        for s in range(k):
            packed |= segments[:, s] << (s * w)
        planes.append(packed.to(torch.uint8).contiguous())
    return planes


def unpack_codes(planes: list[torch.Tensor], widths) -> torch.Tensor:
    """The codes held by the given top planes (widths = theirs), as uint8 [N, padded_in].

    With the planes covering the top b bits, these are the b-bit codes in [0, 2^b).
    Columns past in_features are padding (zero codes).
    """
    codes = None
    for plane, w in zip(planes, widths, strict=True):
        mask = (1 << w) - 1
        values = torch.cat([(plane >> (s * w)) & mask for s in range(8 // w)], dim=1)
        codes = values if codes is None else (codes << w) | values
    return codes


def slice_params(scale: torch.Tensor, zero: torch.Tensor, low: int, bits: int):
    """(s_b, z_b) in float32 for the cell-centre dequantization of the b-bit slice."""
    cells = 2 ** (bits - low)
    return scale.float() / cells, (zero.float() + 0.5) * cells - 0.5


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, bits: int) -> torch.Tensor:
    """Values of b-bit codes q (scale/zero given per element), exactly as `dequantize` computes them."""
    s_b, z_b = slice_params(scale, zero, low, bits)
    return (q.to(torch.float32) - z_b) * s_b


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ladder, bits: int,
                 group_size: int) -> torch.Tensor:
    """The b-bit slice of master codes [N, K] (unpacked) as float32 weights, each column on its group's grid."""
    g = torch.arange(codes.shape[1]) // group_size
    return decode(codes >> (ladder[-1] - bits), scale[:, g], zero[:, g], ladder[0], bits)


def dequantize(planes, scale, zero, layout: Layout, bits: int, dtype=torch.float32) -> torch.Tensor:
    """The b-bit slice as a dense [N, K] weight (the torch reference path)."""
    n = layout.planes_for(bits)
    return dequantize_planes(planes[:n], layout.widths[:n], scale, zero, layout.ladder[0],
                             layout.group_size, layout.in_features, dtype)


def dequantize_planes(planes, widths, scale, zero, low: int, group_size: int, in_features: int,
                      dtype=torch.float32) -> torch.Tensor:
    """Dense [N, K] weight from the top planes alone: their widths sum to the precision b."""
    s_b, z_b = slice_params(scale, zero, low, sum(widths))
    n, groups = scale.shape
    q = unpack_codes(planes, widths)
    # Pad (or cut) the row to whole groups so scales broadcast instead of being gathered.
    q = torch.nn.functional.pad(q, (0, groups * group_size - q.shape[1])).view(n, groups, group_size)
    w = (q.to(torch.float32) - z_b.unsqueeze(-1)) * s_b.unsqueeze(-1)
    return w.view(n, groups * group_size)[:, :in_features].to(dtype)
