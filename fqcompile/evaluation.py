"""Evaluate: perplexity and KL(p_ref || p_q) against the full-precision model, on token samples.

Teacher-forced per precision (`evaluate`), or "as served" (`evaluate_served`,
`evaluate_policies`): each position under the plan the controller chose one step before.
"""

import math
import time

import torch
from rich.progress import Progress

from .calibration.divergence import kl_per_token, log_probs
from .controller import Controller, resolve
from .errors import FqError
from .formats.checkpoint import precision_stats
from .loader import dense_weights, set_precision

FULL = "fp"  # label of the unquantized reference row


@torch.inference_mode()
def evaluate(model, samples: torch.Tensor, precisions=(None,), reference=None, batch_size: int = 2, progress=True):
    """Per precision: perplexity, mean per-token KL against `reference`, tokens, seconds.

    `precisions` are ladder widths for a checkpoint model (None: leave it as it is).
    Every row is scored on the same next-token predictions (positions 1..T-1). With a
    reference model, its own perplexity is reported under the label "fp".
    """
    labels = ([FULL] if reference is not None else []) + list(precisions)
    sums = {label: {"nll": 0.0, "kl": 0.0, "seconds": 0.0} for label in labels}
    tokens = 0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("evaluating", total=len(samples))
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            targets = batch[:, 1:].unsqueeze(-1)
            tokens += targets.numel()
            ref_lp = None
            if reference is not None:
                ref_lp, seconds = _log_probs(reference, batch)
                sums[FULL]["nll"] -= ref_lp.gather(-1, targets).double().sum().item()
                sums[FULL]["seconds"] += seconds
            for bits in precisions:
                if bits is not None:
                    set_precision(model, bits)
                lp, seconds = _log_probs(model, batch)
                row = sums[bits]
                row["nll"] -= lp.gather(-1, targets).double().sum().item()
                row["seconds"] += seconds
                if ref_lp is not None:
                    if ref_lp.shape != lp.shape:
                        raise FqError(f"reference model's vocabulary ({ref_lp.shape[-1]}) differs from the model's ({lp.shape[-1]})")
                    row["kl"] += kl_per_token(ref_lp, lp).double().sum().item()
                del lp
            bar.advance(task, len(batch))
    return {
        label: {
            "perplexity": math.exp(s["nll"] / tokens),
            "kl": s["kl"] / tokens if reference is not None else None,
            "tokens": tokens,
            "seconds": s["seconds"],
        }
        for label, s in sums.items()
    }


def _log_probs(model, batch):
    start = time.perf_counter()
    logits = model(batch).logits
    seconds = time.perf_counter() - start
    return log_probs(logits), seconds


@torch.inference_mode()
def evaluate_served(model, controller, samples: torch.Tensor, reference=None, batch_size: int = 8, progress=True):
    """Perplexity and KL "as served": sequential teacher forcing through the KV cache.

    Position 0 is the prompt (prefill precision); every later position t runs under the
    plan the controller chose from the distribution at t-1, and the KV cache is built by
    those same plans. Returns the metrics plus the controller's statistics.
    """
    nll = kl = 0.0
    tokens = 0
    controller.reset()
    start_time = time.perf_counter()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"evaluating {controller.plan.label} as served", total=len(samples) * (samples.shape[1] - 1))
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            ref_lp = log_probs(reference(batch).logits) if reference is not None else None
            controller.signal = None  # a new prompt
            past = None
            for t in range(batch.shape[1] - 1):
                out = model(batch[:, t : t + 1], cache=past, use_cache=True)
                past = out.cache
                lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
                nll -= lp.gather(-1, batch[:, t + 1, None]).double().sum().item()
                if ref_lp is not None:
                    kl += kl_per_token(ref_lp[:, t], lp).double().sum().item()
                tokens += len(batch)
                bar.advance(task, len(batch))
    return {
        "perplexity": math.exp(nll / tokens),
        "kl": kl / tokens if reference is not None else None,
        "tokens": tokens,
        "seconds": time.perf_counter() - start_time,
        **controller.stats(),
    }



def evaluate_policies(loaded, data, specs, reference=None, batch_size: int = 8, progress=True) -> dict:
    """Each policy evaluated as served (static:B as one teacher-forced pass: it does not depend on the signal)."""
    rows = {}
    with dense_weights(loaded.model):
        for spec in specs:
            plan = resolve(loaded.policy, loaded.manifest, spec)
            if plan.label.startswith("static:"):
                bits = int(plan.label.split(":")[1])
                r = evaluate(loaded.model, data, precisions=[bits], reference=reference, batch_size=batch_size,
                             progress=progress)[bits]
                r.update(policy=plan.label, avg_bits_read=precision_stats(loaded.manifest)[bits]["bits_per_weight"],
                         share={str(b): float(b == bits) for b in loaded.manifest["ladder"]})
            else:
                controller = Controller(loaded.model, loaded.manifest, plan)
                try:
                    r = evaluate_served(loaded.model, controller, data, reference=reference, batch_size=batch_size,
                                        progress=progress)
                finally:
                    controller.close()
            rows[r["policy"]] = r
    return rows
