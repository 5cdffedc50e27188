"""GPTQ for nested codes: one set of master codes, error compensation for every rung.

GPTQ (Frantar et al., 2022) quantizes W [N, K] one column at a time and spreads each
column's error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's inputs (H = XᵀX), which greedily minimises ‖XWᵀ − XŴᵀ‖². A nested checkpoint
serves every rung of its ladder from the same codes, and each rung makes a different
error: compensating the 4-bit error moves weights that the 8-bit slice had right.

So every rung r keeps its own running copy W_r of the weights (a "stream"), updated with
its own errors only, exactly as single-precision GPTQ at r bits would be. The streams
meet in one place, the choice of each master code, which must serve all rungs at once:
the code is picked among one candidate per rung (the r-bit code nearest to W_r, refined
towards the higher rungs' stream values inside that cell) by the smallest
    Σ_r λ_r (W_r − deq_r(q))²,   λ_r = weight_r · 4^(r − B),
i.e. each rung's error in units of its own step size (formats.nested.choose_codes, which
RTN shares); weight_r (default 1) says how much a rung matters. With a one-rung ladder
this is plain GPTQ. Either grid of the format works (formats/nested.py); on the
zero-exact one every rung's stream sees 0 as a level, so its error feedback can settle
near-zero weights exactly.

Group grids follow the format (formats/nested.py): one scale and zero per group, of the
lowest rung. Without act-order a group's grid is fitted when its first column comes up,
over all streams (as GPTQ fits it on the updated weights); with act-order the columns
are visited by decreasing H_jj and the grids are fitted on the original weights first
("static groups"), so codes stay in the original column order and kernels need no
permutation. The visiting order is returned for the record.
"""

from dataclasses import dataclass, field, replace

import torch

from fqcompile.errors import FqError
from fqcompile.formats.nested import Layout, choose_codes, decode_codes, group_grid, group_range, quantize_rtn, rung_weights


TILTS = (1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0)  # weights tried for the rungs above the lowest


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy batch update (speed only)
    act_order: bool = True  # visit columns by decreasing H_jj (static groups)
    rung_weights: dict[int, float] = field(default_factory=dict)  # rung -> weight; empty: searched (`balance`)
    upper_budget: float = 1.0  # searched weights keep every upper rung's error within this x RTN's
    propagate: int | None = None  # the rung whose outputs feed the next block (None: the lowest)
    true_sequential: bool = True  # each layer's Hessian after the earlier layers of its block are quantized


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8 [N, K], B-bit master codes, original column order
    scale: torch.Tensor  # fp16 [N, G]
    zero: torch.Tensor  # uint8 [N, G]
    order: torch.Tensor  # int32 [K], the column visiting order
    damp: float  # the damping that made H positive definite


def inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + δI)⁻¹ (float64); δ grows 10x until H is positive definite."""
    mean = h.diagonal().mean().item()
    eye = torch.eye(len(h), dtype=h.dtype)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inverse, upper=True), damp
        damp *= 10
    raise FqError("the layer's Hessian is not positive definite even with heavy damping (degenerate calibration data?)")


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖², from H = XᵀX alone."""
    err = w - w_hat
    num = ((err @ h) * err).sum()
    den = ((w @ h) * w).sum()
    return (num / den).item() if den > 0 else 0.0


def quantize(w: torch.Tensor, h: torch.Tensor, layout: Layout, config: GPTQConfig = GPTQConfig()) -> Quantized:
    """Nested GPTQ of W [N, K] given H = Σ xxᵀ of its inputs [K, K] (module doc)."""
    if not torch.isfinite(w).all() or not torch.isfinite(h).all():
        raise FqError("weights or calibration activations contain NaN or Inf")
    ladder, group_size = layout.ladder, layout.group_size
    low, rungs = ladder[0], len(ladder)
    w0 = w.detach().to(torch.float32)
    n, k = w0.shape
    h = h.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0  # inputs that are always 0: their weights do not matter
    h[dead, dead] = 1.0
    w = w0.clone()
    w[:, dead] = 0.0

    lam, offsets = rung_weights(ladder, config.rung_weights), layout.offsets()
    groups = -(-k // group_size)
    if config.act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        scale, zero = group_grid(*group_range(w, group_size), low, layout.master_bits)
    else:
        order = torch.arange(k)
        scale, zero = torch.empty(n, groups, dtype=torch.float16), torch.empty(n, groups, dtype=torch.uint8)
    factor, damp = inverse_factor(h[order][:, order], config.damp)
    factor = factor.to(torch.float32)

    streams = w[:, order].unsqueeze(0).repeat(rungs, 1, 1)  # [R, N, K], in visiting order
    codes = torch.empty(n, k)
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        errors = torch.empty(rungs, n, i2 - i1)
        for j in range(i1, i2):
            col = int(order[j])
            g = col // group_size
            if not config.act_order and col % group_size == 0:  # fit the group's grid over every stream
                part = streams[:, :, j : min(j + group_size, k)]
                scale[:, g], zero[:, g] = group_grid(part.amin((0, 2)), part.amax((0, 2)), low, layout.master_bits)
            s, z = scale[:, g].float(), zero[:, g].float()
            x = streams[:, :, j]  # [R, N]
            codes[:, col], deq = choose_codes(x, s, z, ladder, offsets, lam)
            err = (x - deq) / factor[j, j]
            streams[:, :, j:i2] -= err.unsqueeze(-1) * factor[j, j:i2]
            errors[:, :, j - i1] = err
        streams[:, :, i2:] -= errors @ factor[i1:i2, i2:]

    return Quantized(codes.to(torch.uint8), scale, zero, order.to(torch.int32), damp)


def balance(w: torch.Tensor, h: torch.Tensor, layout: Layout, config: GPTQConfig = GPTQConfig()):
    """Nested GPTQ with the rung weights chosen for this layer: (Quantized, weights, losses).

    Unless `config.rung_weights` fixes them, the lowest rung gets weight 1 and every other
    rung weight t, the smallest value in TILTS that keeps every rung above the lowest
    within `upper_budget` x its RTN error on the calibration inputs: the lowest rung gains
    as much as the higher rungs can afford, layer by layer. Where no t fits, the t whose
    worst rung (relative to RTN) is best. (Measured alternative: t^i for rung i, which
    lets middle rungs outvote the top; on the built-in model's [3, 4, 6, 8] it helped the
    4-bit slice and hurt the 3-bit one: docs/results.md.)
    """
    ladder = layout.ladder
    rtn = quantize_rtn(w, layout.group_size, ladder, layout.grid)
    if config.rung_weights or len(ladder) == 1:
        q = quantize(w, h, layout, config)
        return q, {b: config.rung_weights.get(b, 1.0) for b in ladder}, losses(w, q, h, layout, rtn)

    def attempt(index):
        weights = {b: 1.0 if b == ladder[0] else TILTS[index] for b in ladder}
        q = quantize(w, h, layout, replace(config, rung_weights=weights))
        loss = losses(w, q, h, layout, rtn)
        ratios = [loss[b]["gptq"] / max(loss[b]["rtn"], 1e-30) for b in ladder]
        tried[index] = (all(r <= config.upper_budget for r in ratios[1:]), max(ratios), (q, weights, loss))
        return tried[index][0]

    # search from the middle: most layers settle within two or three tries
    tried: dict[int, tuple] = {}
    index = len(TILTS) // 2
    step = -1 if attempt(index) else 1
    while 0 <= index + step < len(TILTS):
        index += step
        if attempt(index) != (step < 0):  # going down: stop at the first miss; up: at the first fit
            break
    feasible = [i for i, (ok, _, _) in tried.items() if ok]
    # no tilt keeps the upper rungs within budget: take the one whose worst rung is best
    chosen = min(feasible) if feasible else min(tried, key=lambda i: tried[i][1])
    return tried[chosen][2]


def losses(w: torch.Tensor, q: Quantized, h: torch.Tensor, layout: Layout, rtn=None) -> dict:
    """Per rung: ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² of these codes ("gptq") and of plain RTN ("rtn") on the same grid."""
    w, h = w.detach().to(torch.float32), h.detach().to(torch.float32)
    rtn = rtn or quantize_rtn(w, layout.group_size, layout.ladder, layout.grid)
    out = {}
    for b in layout.ladder:
        ours = decode_codes(q.codes, q.scale, q.zero, layout, b)
        plain = decode_codes(*rtn, layout, b)
        out[b] = {"gptq": relative_error(w, ours, h), "rtn": relative_error(w, plain, h)}
    return out
