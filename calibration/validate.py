"""Run a precision plan token by token on held-out text and measure its KL and bits.

Each position t of a teacher-forced sequence runs every unit at the precision the plan
gives for the bucket of the signal at t (the reference model's entropy at t-1), or, for an
error-estimate plan, at the precision its rule gives that bucket for the unit's own input
at t (computed in this quantized forward, from what earlier units' choices produced);
position 0 runs at the top precision, as prefill does. Linear layers compute every ladder
slice and keep, per token, the one the plan chose, so one pass measures a whole dynamic plan.
"""

import contextlib

import torch
import torch.nn.functional as F

from fqcompile.calibration.sensitivity import capture, run_from
from fqcompile.calibration.divergence import entropy, kl_per_token, log_probs
from fqcompile.calibration.estimate import input_ms
from fqcompile.calibration.policy import bucket_of, signal


def ladder_slices(units, ladder, slice_of) -> dict:
    """Every ladder slice of every unit's linears, dense: {module: {bits: weight}}."""
    return {name: {b: slice_of(name, b) for b in ladder}
            for unit in units for name in unit.modules}


@contextlib.contextmanager
def tokenwise(model, units, slices: dict, choice: dict):
    """Make each unit's linears follow `choice[unit_index]`: [B, T] precisions per token, or a
    function of the unit's first linear's input giving them (decided when that linear runs)."""
    patched, current = [], {}
    try:
        for u, unit in enumerate(units):
            for i, name in enumerate(unit.modules):
                module = model.get_submodule(name)

                def forward(x, u=u, first=i == 0, weights=slices[name], bias=module.bias):
                    if first:
                        current[u] = choice[u](x) if callable(choice[u]) else choice[u]
                    pick = current[u][..., None]
                    y = None
                    for b, w in weights.items():
                        out = F.linear(x, w, bias)
                        y = out if y is None else torch.where(pick == b, out, y)
                    return y

                module.forward = forward
                patched.append(module)
        yield current
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _rule_choice(rule: dict, u: int, buckets: torch.Tensor, top: int):
    """A unit's per-token precisions from its input, by the rule of each token's bucket."""
    def choose(x):
        ms = input_ms(x).double()
        bits = torch.full(ms.shape, top, dtype=torch.long)
        for k, (edges, values) in enumerate(zip(rule["edges"], rule["bits"])):
            here = buckets == k
            index = torch.bucketize(ms[here], torch.tensor(edges[u], dtype=ms.dtype), right=True)
            bits[here] = torch.tensor(values[u])[index]
        bits[:, 0] = top
        return bits

    return choose


@torch.inference_mode()
def run_plans(model, samples, units, ladder, slice_of, edges, smoothing, plan_list, shares, batch_size=4):
    """Per plan (a [k, u] tensor of ladder indices, or an error-estimate rule {"edges", "bits"}):
    measured mean KL and average bits per weight (positions >= 1); and the per-bucket token share."""
    n_layers = len(model.get_decoder().layers)
    ladder_t = torch.tensor(ladder)
    slices = ladder_slices(units, ladder, slice_of)
    sums = [0.0] * len(plan_list)
    bit_sums = [0.0] * len(plan_list)
    counts = torch.zeros(len(edges) + 1, dtype=torch.float64)
    tokens = 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        ref = log_probs(run_from(model, n_layers, capture(model, batch)[1]))
        sig = signal(entropy(ref), smoothing)
        buckets = bucket_of(sig.nan_to_num(0.0), edges)
        counts += torch.bincount(buckets[:, 1:].flatten(), minlength=len(edges) + 1).double()
        tokens += buckets[:, 1:].numel()
        # one more column for the last input token (its prediction is not scored)
        buckets = torch.cat([buckets, buckets[:, -1:]], dim=1)
        for p, plan in enumerate(plan_list):
            if isinstance(plan, dict):
                choice = {u: _rule_choice(plan, u, buckets, ladder[-1]) for u in range(len(units))}
            else:  # per position: the plan's precision for its bucket
                bits = ladder_t[plan[buckets]]  # [B, T, u]
                bits[:, 0] = ladder[-1]
                choice = {u: bits[..., u] for u in range(len(units))}
            with tokenwise(model, units, slices, choice) as chosen:
                kl = kl_per_token(ref, log_probs(model(batch, use_cache=False).logits))
            sums[p] += float(kl[:, 1:].double().sum())
            bit_sums[p] += sum(float(s) * float(chosen[u][:, 1:-1].double().sum()) for u, s in enumerate(shares))
    return [s / tokens for s in sums], [b / tokens for b in bit_sums], counts / counts.sum()
