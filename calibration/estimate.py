"""The error-estimate signal: each unit's precision per token from an estimate of its own error.

DP-LLM's idea: right before a unit runs, estimate how large its low-precision error
||(W_top - W_b) x|| will be on this token's input x, and run it higher where that error is
large. The estimator is a per-unit linear fit of the error energy on the mean square of the
input the unit is decided on (its first linear's input: q/k/v's for a block), e ~ a + c ms(x),
which costs one dot product per row at run time and no extra weights.

The cost side is what calibration measures: KL per unit of error energy, k[bucket, unit, b]
= sum of the measured dKL over the bucket's tokens / sum of their estimated energies, so the
predicted dKL of a token is k (a + c ms). With one bucket the signal is the estimate alone;
with entropy buckets the two are combined (the KL per energy differs by bucket).

A plan for the price lam runs unit u on a token at the precision b minimising
    k_b (a_b + c_b ms) + lam * b * share_u      (0 + lam * top * share_u at the top)
the per-token form of policy.plans' rule. Each cost is a line in ms, so per bucket and unit
the choice is a few intervals of ms: `rules` gives their edges and precisions, which every
engine applies (bisect the row's ms, take the precision).

The fit works on per-(bucket, unit) quantiles of ms, not on raw tokens: expected bits and
predicted KL are sums over units of per-unit expectations, so marginals are enough, and the
same numbers are stored in policy.json for a runtime refit (`dynamic:BITS`).
"""

import bisect

import torch
from safetensors.torch import load_file

from fqcompile.calibration import policy as pol
from fqcompile.calibration.sensitivity import save_atomic

QUANTILES = 32  # per (bucket, unit): midpoints of 32 equal-count slices of the calibration tokens


def input_ms(x: torch.Tensor) -> torch.Tensor:
    """The estimator's input: the mean square over features of each row, in float64 (as the C++
    stack sums it, so the engines agree at a rule's edges)."""
    return x.double().pow(2).mean(-1)


@torch.inference_mode()
def record(model, batches, units, ladder, slice_of, folder):
    """Per unit, on the reference model's own inputs: ms of its decision input and the true
    error energy per weight ||(W_top - W_b) x||^2 / weights for each lower precision b.

    Saved as estimates.safetensors: `ms` [units, n, T-1], `energy` [units, rungs-1, n, T-1]
    (positions 0..T-2, as the per-token KL). Reused when present (resume).
    """
    path = folder / "estimates.safetensors"
    if path.exists():
        return load_file(str(path))
    top, lower = ladder[-1], ladder[:-1]
    size = torch.tensor([sum(model.get_submodule(m).weight.numel() for m in u.modules) for u in units],
                        dtype=torch.float64)
    owner = {m: i for i, u in enumerate(units) for m in u.modules}
    gate = {u.modules[0]: i for i, u in enumerate(units)}
    ms_all, energy_all = [], []
    for batch in batches:
        ms = torch.zeros(len(units), *batch[:, 1:].shape, dtype=torch.float64)
        energy = torch.zeros(len(units), len(lower), *batch[:, 1:].shape, dtype=torch.float64)

        def hook(name):
            def pre(_module, args):
                x = args[0][:, :-1].float()
                if name in gate:
                    ms[gate[name]] = input_ms(x)
                top_w = slice_of(name, top)  # made here, not kept: all of them would be a model's size per rung
                for j, b in enumerate(lower):
                    energy[owner[name], j] += (x @ (top_w - slice_of(name, b)).T).pow(2).sum(-1)

            return pre

        hooks = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in owner]
        try:
            model(batch, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        ms_all.append(ms)
        energy_all.append(energy / size[:, None, None, None])
    result = {"ms": torch.cat(ms_all, 1).float(), "energy": torch.cat(energy_all, 2).float()}
    save_atomic(path, result)
    return result


def fit_estimators(ms: torch.Tensor, energy: torch.Tensor):
    """Least-squares e ~ a + c ms per unit and lower precision, with a, c >= 0 (an estimate is
    never negative): a, c, R^2 [units, rungs-1]."""
    units, rungs = energy.shape[:2]
    a, c, r2 = (torch.zeros(units, rungs, dtype=torch.float64) for _ in range(3))
    for u in range(units):
        x = ms[u].flatten().double()
        for j in range(rungs):
            y = energy[u, j].flatten().double()
            xc, yc = x - x.mean(), y - y.mean()
            slope = float((xc * yc).sum() / (xc * xc).sum()) if (xc * xc).sum() > 0 else 0.0
            icpt = float(y.mean() - slope * x.mean())
            if slope < 0:
                slope, icpt = 0.0, float(y.mean())
            elif icpt < 0:  # through the origin instead
                slope, icpt = float((x * y).sum() / (x * x).sum()), 0.0
            a[u, j], c[u, j] = icpt, slope
            total = (yc * yc).sum()
            r2[u, j] = 1 - (y - icpt - slope * x).pow(2).sum() / total if total > 0 else 1.0
    return a, c, r2


def fit(rec: dict, results: dict, ladder, edges: list[float], smoothing: float) -> dict:
    """The estimate table of policy.json: estimators, KL per energy per bucket, ms quantiles."""
    ms = rec["ms"]
    # position 0 (BOS, often with outsized activations) always runs at the prefill precision
    a, c, r2 = fit_estimators(ms[:, :, 1:], rec["energy"][:, :, :, 1:])
    sig = pol.signal(results["reference"]["entropy"], smoothing)
    valid = ~torch.isnan(sig)
    bucket = pol.bucket_of(sig.nan_to_num(0.0), edges)[valid]
    k = len(edges) + 1
    units = len(results["units"])
    kl_per_energy = torch.zeros(k, units, len(ladder) - 1, dtype=torch.float64)
    quantiles = torch.zeros(k, units, QUANTILES, dtype=torch.float64)
    qs = (torch.arange(QUANTILES, dtype=torch.float64) + 0.5) / QUANTILES
    for u, unit in enumerate(results["units"]):
        x = ms[u][valid].double()
        for kk in range(k):
            here = bucket == kk  # never empty: policy.table refuses such buckets first
            quantiles[kk, u] = torch.quantile(x[here], qs)
            for j, b in enumerate(ladder[:-1]):
                est = (a[u, j] + c[u, j] * x[here]).sum()
                kl = unit[f"kl_{b}"][valid][here].double().clamp_min(0).sum()
                kl_per_energy[kk, u, j] = kl / est if est > 0 else 0.0
    return {"a": a.tolist(), "c": c.tolist(), "r2": r2.tolist(), "kl_per_energy": kl_per_energy.tolist(),
            "input_quantiles": quantiles.tolist()}


def _tensors(est: dict):
    return (torch.tensor(est["a"], dtype=torch.float64), torch.tensor(est["c"], dtype=torch.float64),
            torch.tensor(est["kl_per_energy"], dtype=torch.float64))


def predicted(est: dict, ms: torch.Tensor) -> torch.Tensor:
    """Predicted dKL [bucket, unit, n, rung] (top rung: 0) for inputs ms [bucket, unit, n]."""
    a, c, k = _tensors(est)
    low = k[:, :, None, :] * (a[None, :, None, :] + c[None, :, None, :] * ms[..., None])
    return torch.cat([low, torch.zeros_like(low[..., :1])], -1)


def table(est: dict, base: torch.Tensor, token_share: torch.Tensor):
    """policy.fit's inputs over the stored quantiles: each (bucket, quantile) one pseudo-bucket.

    Returns dkl [units, rungs, K * Q], base and token share [K * Q].
    """
    q = torch.tensor(est["input_quantiles"], dtype=torch.float64)  # [K, U, Q]
    pred = predicted(est, q)  # [K, U, Q, R]
    k, u, n, r = pred.shape
    dkl = pred.permute(1, 3, 0, 2).reshape(u, r, k * n)
    return dkl, base.repeat_interleave(n), token_share.repeat_interleave(n) / n


def rules(est: dict, lam: float, shares: torch.Tensor, ladder) -> dict:
    """Per bucket and unit, the ms edges and the precision of each interval, at price lam."""
    a, c, k = _tensors(est)
    bits = [float(b) for b in ladder]
    all_edges, all_bits = [], []
    for kk in range(k.shape[0]):
        row_edges, row_bits = [], []
        for u in range(a.shape[0]):
            # cost_j(ms) = intercept_j + slope_j * ms: the lowest line wins
            lines = [(float(k[kk, u, j] * a[u, j]) + lam * bits[j] * float(shares[u]),
                      float(k[kk, u, j] * c[u, j])) for j in range(len(ladder) - 1)]
            lines.append((lam * bits[-1] * float(shares[u]), 0.0))
            edges, choice = _envelope(lines)
            row_edges.append(edges)
            row_bits.append([ladder[j] for j in choice])
        all_edges.append(row_edges)
        all_bits.append(row_bits)
    return {"edges": all_edges, "bits": all_bits}


def _envelope(lines: list[tuple[float, float]]) -> tuple[list[float], list[int]]:
    """Where on ms > 0 each line is the lowest: increasing edges and the line of each interval."""
    cuts = sorted({(b0 - b1) / (s1 - s0) for i, (b0, s0) in enumerate(lines) for b1, s1 in lines[i + 1:]
                   if s1 != s0 and (b0 - b1) / (s1 - s0) > 0})
    probes = [cuts[0] / 2, *[(x + y) / 2 for x, y in zip(cuts, cuts[1:])], cuts[-1] * 2] if cuts else [1.0]
    best = [min(range(len(lines)), key=lambda j: (lines[j][0] + lines[j][1] * p, j)) for p in probes]  # ties: lower, as policy.plans
    edges, choice = [], [best[0]]
    for e, j in zip(cuts, best[1:]):
        if j != choice[-1]:
            edges.append(e)
            choice.append(j)
    return edges, choice


def decide(edges: list[float], bits: list[int], ms: float) -> int:
    """The precision a rule gives an input of mean square ms."""
    return bits[bisect.bisect_right(edges, ms)]
