"""The precision requirement model: from measured KL to a switching policy.

Signal: the entropy H of the previous position's next-token distribution (nats),
optionally smoothed by an exponential moving average. Entropy buckets: quantiles of the
signal on calibration tokens. Table: mean KL[unit, precision, bucket] with only that unit
lowered (dKL), plus the KL of the all-top-precision model per bucket (base).

Plan: for each bucket k and unit u, the precision b that minimises
    dKL[u, b, k] + lam * b * share_u          (share_u: the unit's share of the weights)
i.e. a unit runs lower where its KL cost per bit saved is below the price `lam`. This is
the Lagrangian solution of "least predicted KL for a given average bits" under the
additive assumption (predicted KL = base + sum of the units' dKL), and it orders units by
sensitivity per bucket by construction. One `lam` is fitted to the user's target.
A static-mixed plan is the same rule on KL averaged over all buckets.
"""

import math

import torch

from fqcompile.errors import FqError

LAM_RANGE = (1e-9, 1e3)


def unit_label(names) -> str:
    """A unit's name from its linears' names: the name of one; under one parent, e.g.
    model.layers.0.self_attn.q_proj+k_proj+v_proj; else their common prefix (a block)."""
    if len(names) == 1:
        return names[0]
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) == 1:
        return parents.pop() + "." + "+".join(n.rpartition(".")[2] for n in names)
    prefix = [p[0] for p in zip(*(n.split(".") for n in names)) if len(set(p)) == 1]
    return ".".join(prefix) or "all"


def signal(entropy: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Decode-time signal per position: the (smoothed) entropy at the previous position.

    entropy [n, T] -> signal [n, T], NaN at position 0 (it has no previous position).
    """
    prev = torch.full_like(entropy, float("nan"))
    prev[:, 1:] = entropy[:, :-1]
    if smoothing:
        for t in range(2, prev.shape[1]):
            prev[:, t] = smoothing * prev[:, t - 1] + (1 - smoothing) * prev[:, t]
    return prev


def bucket_edges(sig: torch.Tensor, buckets: int) -> list[float]:
    values = sig[~torch.isnan(sig)].double()
    qs = torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]
    return torch.quantile(values, qs).tolist()


def bucket_of(sig: torch.Tensor, edges: list[float]) -> torch.Tensor:
    return torch.bucketize(sig, torch.tensor(edges, dtype=sig.dtype), right=True)


def table(results: dict, ladder, edges: list[float], smoothing: float, rows=None):
    """Mean dKL [units, len(ladder), buckets] (top precision = 0), base [buckets], share [buckets]."""
    ent = results["reference"]["entropy"]
    rows = slice(None) if rows is None else rows
    sig = signal(ent, smoothing)[rows]
    valid = ~torch.isnan(sig)
    buckets = bucket_of(sig.nan_to_num(0.0), edges)
    k = len(edges) + 1
    onehot = torch.nn.functional.one_hot(buckets[valid], k).double()  # [tokens, k]
    count = onehot.sum(0)
    if (count == 0).any():
        raise FqError("an entropy bucket has no calibration tokens: use fewer `buckets` or more `samples`")

    def means(values):
        return (values[rows][valid].double() @ onehot) / count

    dkl = torch.zeros(len(results["units"]), len(ladder), k, dtype=torch.float64)
    for u, unit in enumerate(results["units"]):
        for j, b in enumerate(ladder[:-1]):
            dkl[u, j] = means(unit[f"kl_{b}"])
    return dkl, means(results["baseline"]), count / count.sum()


def plans(dkl: torch.Tensor, shares: torch.Tensor, ladder, lam: float) -> torch.Tensor:
    """Precision index per (bucket, unit): argmin_b dKL[u, b, k] + lam * bits_b * share_u."""
    bits = torch.tensor(ladder, dtype=torch.float64)
    cost = dkl.permute(2, 0, 1) + lam * bits[None, None, :] * shares[None, :, None]  # [k, u, b]
    return cost.argmin(-1)


def expected(dkl, base, token_share, shares, ladder, plan_idx):
    """(average bits per weight, predicted mean KL) of a plan on tokens with `token_share` per bucket."""
    bits = torch.tensor(ladder, dtype=torch.float64)[plan_idx]  # [k, u]
    avg_bits = float((token_share[:, None] * bits * shares[None, :]).sum())
    chosen = dkl.permute(2, 0, 1).gather(-1, plan_idx[..., None])[..., 0]  # [k, u]
    kl = float((token_share * (base + chosen.sum(-1))).sum())
    return avg_bits, kl


def fit(dkl, base, token_share, shares, ladder, target_bits=None, max_kl=None, correction=1.0):
    """The price `lam` whose plan meets the target: average bits <= target_bits, or predicted KL <= max_kl."""
    low, high = math.log(LAM_RANGE[0]), math.log(LAM_RANGE[1])

    def at(log_lam):
        return expected(dkl, base, token_share, shares, ladder, plans(dkl, shares, ladder, math.exp(log_lam)))

    if target_bits is not None:
        if target_bits < ladder[0] - 1e-9:  # expected bits are float sums: all-lowest may land at 4 - 4e-16
            raise FqError(f"target of {target_bits} average bits is below the lowest precision {ladder[0]}")
        if at(low)[0] <= target_bits:
            return 0.0
        for _ in range(60):  # bits fall as the price rises: smallest price that meets the target
            mid = (low + high) / 2
            low, high = (mid, high) if at(mid)[0] > target_bits else (low, mid)
        return math.exp(high)
    floor = correction * at(low)[1]
    if floor > max_kl:
        raise FqError(f"the allowed increase cannot be met: even the top precision everywhere is predicted "
                      f"at KL {floor:.4f} > {max_kl:.4f}")
    for _ in range(60):  # KL grows with the price: largest price that stays within the budget
        mid = (low + high) / 2
        low, high = (mid, high) if correction * at(mid)[1] <= max_kl else (low, mid)
    return math.exp(low)


def static_mixed(dkl, base, token_share, shares, ladder, target_bits):
    """Per-unit precision fixed for all tokens, chosen by the same rule on bucket-averaged KL."""
    flat = (dkl * token_share[None, None, :]).sum(-1, keepdim=True)
    one = torch.ones(1, dtype=torch.float64)
    lam = fit(flat, (base * token_share).sum().reshape(1), one, shares, ladder, target_bits=target_bits)
    return plans(flat, shares, ladder, lam)[0]  # [u] precision index


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
