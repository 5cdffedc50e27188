"""Nested-bit weights: master codes, their bit planes, and the dequantization of a slice.

A weight matrix W [N, K] is quantized group-wise along K (groups of `group_size`; the
last group of a row may be shorter). Each group has one scale s (fp16) and one integer
zero point z (uint8) that define the grid of the LOWEST rung b0 of the ladder:
    W_b0 = s * (q_b0 - z)            (plain asymmetric round-to-nearest at b0 bits)
The b-bit model is the top b bits of every B-bit master code (B = top of the ladder),
q_b = q >> (B - b), on a grid 2^(b - b0) times finer:
    W_b = s_b * (q_b - z_b),  s_b = s / 2^(b-b0),  z_b = z * 2^(b-b0) + c_b
Two grids differ only in c_b:
- "lowest-rung" (format 1, cell centres): c_b = (2^(b-b0) - 1) / 2. Each level is the centre
  of its cell, so a weight's nearest master code is the nearest code of every rung; but
  above b0, z_b is a half-integer and 0 sits on a cell edge: near-zero weights, the
  densest part of the distribution, are off by half a step at the middle and top rungs.
- "zero-exact" (format 2): c_b = c >> (B - b) for one integer c in [0, 2^(B-b0)) per
  checkpoint, i.e. the b-bit zero point is the top b bits of the master zero point
  Z = z * 2^(B-b0) + c. Every z_b is an integer, so 0 is a level of every rung (q = Z),
  and each b-bit level is also a level of every higher rung. A rung's levels are no
  longer all at their cells' centres, so the codes are chosen to balance the rungs'
  errors (choose_codes); c is picked per ladder to keep that balance cheap
  (fit_zero_offset).
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

import functools
import math
from dataclasses import dataclass

import torch

from fqcompile.errors import FqError

MIN_BITS, MAX_BITS = 2, 8
# Grid names as manifests write them; "lowest-rung" (version 1) dequantizes each slice at its cell centres.
CELL_CENTRE, ZERO_EXACT = "lowest-rung", "zero-exact"
GRIDS = {CELL_CENTRE: 1, ZERO_EXACT: 2}  # grid -> the format version that introduced it
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


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise FqError(f"unknown `grid` '{grid}' (known: {', '.join(GRIDS)})")
    return grid


def rung_offset(ladder, bits: int, grid: str, zero_offset: int = 0) -> float:
    """c_b in the b-bit slice's zero point z_b = z * 2^(b - b0) + c_b (module doc)."""
    if check_grid(grid) == CELL_CENTRE:
        return (2 ** (bits - ladder[0]) - 1) / 2
    return float(zero_offset >> (ladder[-1] - bits))


@dataclass(frozen=True)
class Layout:
    """Shape and bit layout of one quantized linear weight.

    zero_offset: c of the zero-exact grid (module doc); None picks fit_zero_offset's.
    """

    out_features: int
    in_features: int
    group_size: int
    ladder: tuple[int, ...]
    grid: str = CELL_CENTRE
    zero_offset: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "ladder", tuple(self.ladder))
        check_grid(self.grid)
        if self.zero_offset is None:
            object.__setattr__(self, "zero_offset", fit_zero_offset(self.ladder) if self.grid == ZERO_EXACT else 0)
        elif not 0 <= self.zero_offset < 2 ** (self.master_bits - self.ladder[0]):
            raise FqError(f"`zero_offset` {self.zero_offset} is outside [0, {2 ** (self.master_bits - self.ladder[0])})")

    def offset(self, bits: int) -> float:
        return rung_offset(self.ladder, bits, self.grid, self.zero_offset)

    def offsets(self) -> list[float]:
        return [self.offset(b) for b in self.ladder]

    def slice_args(self, bits: int) -> tuple[int, float, int]:
        """(low, offset, group_size): how the kernels read the b-bit slice's grid."""
        return self.ladder[0], self.offset(bits), self.group_size

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


@functools.cache
def fit_zero_offset(ladder: tuple[int, ...]) -> int:
    """The c that export writes for a ladder on the zero-exact grid.

    Every c in [0, 2^(B - b0)) is a valid grid. This one gives the smallest round-to-nearest
    error summed over the rungs (each in units of its own step) on Gaussian weights, which
    keeps every rung's grid over a group's range and each cell close to its level.
    """
    if len(ladder) == 1:
        return 0
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    lam = rung_weights(ladder)
    costs = []
    for c in range(2 ** (ladder[-1] - ladder[0])):
        layout = Layout(*w.shape, 128, ladder, ZERO_EXACT, c)
        codes, scale, zero = quantize_rtn(w, 128, ladder, ZERO_EXACT, c)
        costs.append(sum(lam[i].item() * (decode_codes(codes, scale, zero, layout, b) - w).pow(2).sum().item()
                         for i, b in enumerate(ladder)))
    return min(range(len(costs)), key=costs.__getitem__)


def group_grid(wmin: torch.Tensor, wmax: torch.Tensor, low: int, top: int | None = None):
    """Scale (fp16) and zero (uint8) of the lowest rung's grid for groups spanning [wmin, wmax].

    The range is widened to include 0 (as GPTQ does) so the zero point is a valid code.
    The stored fp16 scale is rounded up, never down, so the lowest rung's grid still spans
    the range and no weight is clamped there by more than half a step (on the zero-exact
    grid a higher rung's levels are shifted by its c_b and may clamp the range's ends more).
    With `top` (the master width), the top rung's scale s / 2^(top - low) is an fp16 number
    too (for tiny ranges it would fall below fp16's normal range and lose bits), so every
    rung's scale is exact in fp16, as a GPTQ export stores it.
    """
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    qmax = 2**low - 1
    cells = 2 ** ((top or low) - low)
    # An all-zero group has no range: the smallest fp16 top-rung step keeps it at 0 at the lowest
    # rung and within 2^-25 * 2^(top - b) of 0 at rung b above it (on the lowest-rung grid 0
    # sits on a cell edge there; 3e-8 at the top).
    exact = ((wmax - wmin) / qmax / cells).clamp(min=2.0**-24)
    finest = exact.to(torch.float16)
    finest = torch.where(finest.float() < exact, torch.nextafter(finest, torch.full_like(finest, torch.inf)), finest)
    scale = (finest.float() * cells).to(torch.float16)  # exact: a power of two
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


def rung_weights(ladder, weights=None) -> torch.Tensor:
    """λ_r of choose_codes for each rung r: weight_r (default 1) x 4^(r - B), i.e. each rung's
    squared error in units of its own step."""
    weights = weights or {}
    return torch.tensor([weights.get(b, 1.0) * 4.0 ** (b - ladder[-1]) for b in ladder])


def choose_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ladder, offsets, lam: torch.Tensor):
    """Master codes that serve every rung at once, and their value at each rung.

    x: [R, ...] the value each rung wants (R = rungs; RTN passes the weights R times, GPTQ
    its per-rung streams); scale/zero: the lowest rung's grid, broadcastable to x[0];
    offsets: each rung's c_b (Layout.offsets()).
    Candidates: for each rung r the code nearest x_r at r bits, whose lower bits then follow
    the higher rungs' wishes inside that cell. The candidate with the smallest
    Σ_r λ_r (x_r − value_r)² wins (ties: the lower rung's). On the cell-centre grid every
    candidate is the top rung's nearest code; on the zero-exact grid they differ.
    Returns codes [...] (float, integral) and values [R, ...].
    """
    low, top = ladder[0], ladder[-1]
    grids = [slice_params(scale, zero, low, b, c) for b, c in zip(ladder, offsets)]
    nearest = [torch.floor(x[r] / s + z + 0.5) for r, (s, z) in enumerate(grids)]  # halves round up
    best = best_cost = best_values = None
    for r in range(len(ladder)):
        q = nearest[r].clamp(0, 2 ** ladder[r] - 1)
        for b in range(r + 1, len(ladder)):
            span = 2 ** (ladder[b] - ladder[b - 1])
            q = torch.minimum(torch.maximum(nearest[b], q * span), q * span + span - 1)
        values = torch.stack([(torch.floor(q / 2 ** (top - b)) - z) * s for b, (s, z) in zip(ladder, grids)])
        cost = (lam.view(-1, *[1] * (x.dim() - 1)) * (x - values) ** 2).sum(0)
        if best is None:
            best, best_cost, best_values = q, cost, values
        else:
            better = cost < best_cost
            best, best_cost = torch.where(better, q, best), torch.where(better, cost, best_cost)
            best_values = torch.where(better, values, best_values)
    return best, best_values


def quantize_rtn(w: torch.Tensor, group_size: int, ladder, grid: str = CELL_CENTRE, zero_offset: int | None = None,
                 rows: int = 4096):
    """Round-to-nearest group quantization of W [N, K] to nested master codes (module doc).

    Returns codes (uint8 [N, K], B bits), scale (fp16 [N, G]) and zero (uint8 [N, G]) of
    the lowest rung's grid. On the cell-centre grid every weight is within half a step of
    its value at every precision; on the zero-exact grid the codes balance the rungs'
    errors, each in units of its own step (choose_codes), with `zero_offset` (default: the
    fitted one, as Layout). `rows` at a time bound the memory.
    """
    if not torch.isfinite(w).all():
        raise FqError("weights contain NaN or Inf")
    w = w.detach().to(torch.float32)
    layout = Layout(w.shape[0], w.shape[1], group_size, tuple(ladder), grid, zero_offset)
    scale, zero = group_grid(*group_range(w, group_size), ladder[0], ladder[-1])
    g_idx = torch.arange(w.shape[1]) // group_size
    if grid == CELL_CENTRE or len(ladder) == 1:  # every candidate is the top rung's nearest code: skip the others
        s, z = slice_params(scale[:, g_idx], zero[:, g_idx], ladder[0], layout.master_bits,
                            layout.offset(layout.master_bits))
        return torch.floor(w / s + z + 0.5).clamp(0, 2 ** layout.master_bits - 1).to(torch.uint8), scale, zero
    lam = rung_weights(layout.ladder)
    codes = torch.cat([
        choose_codes(w[i:i + rows].expand(len(ladder), -1, -1), scale[i:i + rows, g_idx].float(),
                     zero[i:i + rows, g_idx].float(), layout.ladder, layout.offsets(), lam)[0]
        for i in range(0, w.shape[0], rows)
    ])
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


def slice_params(scale: torch.Tensor, zero: torch.Tensor, low: int, bits: int, offset: float):
    """(s_b, z_b) in float32 of the b-bit slice: s_b = s / 2^(b - low), z_b = z * 2^(b - low) + offset."""
    cells = 2 ** (bits - low)
    return scale.float() / cells, zero.float() * cells + offset


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: Layout, bits: int) -> torch.Tensor:
    """Values of b-bit codes q (scale/zero given per element), exactly as `dequantize` computes them."""
    s_b, z_b = slice_params(scale, zero, layout.ladder[0], bits, layout.offset(bits))
    return (q.to(torch.float32) - z_b) * s_b


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: Layout, bits: int) -> torch.Tensor:
    """The b-bit slice of master codes [N, K] (unpacked) as float32 weights, each column on its group's grid."""
    g = torch.arange(codes.shape[1]) // layout.group_size
    return decode(codes >> (layout.master_bits - bits), scale[:, g], zero[:, g], layout, bits)


def dequantize(planes, scale, zero, layout: Layout, bits: int, dtype=torch.float32) -> torch.Tensor:
    """The b-bit slice as a dense [N, K] weight (the torch reference path)."""
    n = layout.planes_for(bits)
    return dequantize_planes(planes[:n], layout.widths[:n], scale, zero, layout.ladder[0], layout.offset(bits),
                             layout.group_size, layout.in_features, dtype)


def dequantize_planes(planes, widths, scale, zero, low: int, offset: float, group_size: int, in_features: int,
                      dtype=torch.float32) -> torch.Tensor:
    """Dense [N, K] weight from the top planes alone: their widths sum to the precision b."""
    s_b, z_b = slice_params(scale, zero, low, sum(widths), offset)
    n, groups = scale.shape
    q = unpack_codes(planes, widths)
    # Pad (or cut) the row to whole groups so scales broadcast instead of being gathered.
    q = torch.nn.functional.pad(q, (0, groups * group_size - q.shape[1])).view(n, groups, group_size)
    w = (q.to(torch.float32) - z_b.unsqueeze(-1)) * s_b.unsqueeze(-1)
    return w.view(n, groups * group_size)[:, :in_features].to(dtype)
