"""Run a precision plan token by token on held-out text and measure its KL.

Each position t of a teacher-forced sequence runs every unit at the precision the plan
gives for the bucket of the signal at t (the reference model's entropy at t-1); position 0
runs at the top precision, as prefill does. Linear layers compute every ladder slice and
keep, per token, the one the plan chose, so one pass measures a whole dynamic plan.
"""

import contextlib

import torch
import torch.nn.functional as F

from fqcompile.calibration.sensitivity import capture, run_from
from fqcompile.calibration.divergence import entropy, kl_per_token, log_probs
from fqcompile.calibration.policy import bucket_of, signal


def ladder_slices(units, ladder, slice_of) -> dict:
    """Every ladder slice of every unit's linears, dense: {module: {bits: weight}}."""
    return {name: {b: slice_of(name, b) for b in ladder}
            for unit in units for name in unit.modules}


@contextlib.contextmanager
def tokenwise(model, units, slices: dict, choice: dict):
    """Make each unit's linears follow `choice[unit_index]` ([B, T] precisions) per token."""
    patched = []
    try:
        for u, unit in enumerate(units):
            for name in unit.modules:
                module = model.get_submodule(name)

                def forward(x, u=u, weights=slices[name], bias=module.bias):
                    pick = choice[u][..., None]
                    y = None
                    for b, w in weights.items():
                        out = F.linear(x, w, bias)
                        y = out if y is None else torch.where(pick == b, out, y)
                    return y

                module.forward = forward
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


@torch.inference_mode()
def run_plans(model, samples, units, ladder, slice_of, edges, smoothing, plan_list, batch_size=4):
    """Measured mean KL (positions >= 1) and the per-bucket token share, for each plan [k, u] of indices."""
    n_layers = len(model.get_decoder().layers)
    ladder_t = torch.tensor(ladder)
    slices = ladder_slices(units, ladder, slice_of)
    sums = [0.0] * len(plan_list)
    counts = torch.zeros(len(edges) + 1, dtype=torch.float64)
    tokens = 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        ref = log_probs(run_from(model, n_layers, capture(model, batch)[1]))
        sig = signal(entropy(ref), smoothing)
        buckets = bucket_of(sig.nan_to_num(0.0), edges)
        counts += torch.bincount(buckets[:, 1:].flatten(), minlength=len(edges) + 1).double()
        tokens += buckets[:, 1:].numel()
        for p, plan in enumerate(plan_list):
            # per position: the plan's precision for its bucket; one more column for the last input token
            bits = ladder_t[plan[buckets]]  # [B, T-1, u]
            bits = torch.cat([bits, bits[:, -1:]], dim=1)
            bits[:, 0] = ladder[-1]
            choice = {u: bits[..., u] for u in range(len(units))}
            with tokenwise(model, units, slices, choice):
                kl = kl_per_token(ref, log_probs(model(batch, use_cache=False).logits))
            sums[p] += float(kl[:, 1:].double().sum())
    return [s / tokens for s in sums], counts / counts.sum()
