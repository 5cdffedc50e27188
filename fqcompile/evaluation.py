"""Evaluate: perplexity and KL(p_ref || p_q) against the full-precision model, on token samples.

Teacher-forced per precision (`evaluate`), or "as served": each position under the plan the
controller chose for it, step by step through the KV cache (`evaluate_served`) or, where no
decision reads the previous token's entropy, the same numbers in one teacher-forced pass
(`evaluate_served_parallel`). `evaluate_policies` picks.
"""

import math
import time
from types import SimpleNamespace

import torch
from rich.progress import Progress

from .calibration.divergence import kl_per_token, log_probs
from .controller import Controller, resolve
from .errors import FqError
from .formats.checkpoint import precision_stats
from .loader import dense_weights, set_precision

FULL = "fp"  # label of the unquantized reference row
CACHE_BYTES = 4 << 30  # evaluate_policies keeps the reference's logits up to this size (16k tokens x 49k: 3.2 GB)
STEP_ROWS = 32  # rows per step in evaluate_policies' step-by-step runs: a step reads every weight, whatever its rows


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
    return _served(nll, kl, tokens, reference is not None, start_time, controller)


@torch.inference_mode()
def evaluate_served_parallel(model, controller, samples: torch.Tensor, reference=None, batch_size: int = 8,
                             progress=True):
    """What evaluate_served measures, in one teacher-forced pass instead of a step per token, for
    a plan without entropy buckets (error estimates alone, static mixed).

    Position t runs under the plan's fixed bits and, for gated units, a decision on its own input
    at t, which a causal model computes from positions <= t only: one pass over whole sequences
    (Controller.run_tokens) is what serving runs. With entropy buckets, position t's plan depends
    on the served distribution at t-1: evaluate_served runs those (evaluate_policies picks).
    """
    plan = controller.plan
    if plan.edges:
        raise FqError(f"policy {plan.label} switches on the previous token's entropy: evaluate it step by step "
                      "(evaluate_served)")
    nll = kl = 0.0
    tokens = 0
    controller.reset()
    start_time = time.perf_counter()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"evaluating {plan.label} as served", total=len(samples))
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            inputs = batch[:, :-1]
            ref_lp = log_probs(reference(batch).logits) if reference is not None else None
            used = torch.zeros(inputs.shape, dtype=torch.long)
            controller.run_tokens(used)
            try:
                lp = torch.log_softmax(model(inputs).logits.float(), dim=-1)
                gated = controller.token_bits
            finally:
                controller.run_tokens(None)
            controller.count_passes(used, gated)
            nll -= float(lp.gather(-1, batch[:, 1:, None]).double().sum())
            if ref_lp is not None:
                kl += float(kl_per_token(ref_lp, lp).double().sum())
            tokens += inputs.numel()
            del lp, ref_lp
            bar.advance(task, len(batch))
    return _served(nll, kl, tokens, reference is not None, start_time, controller)


def _served(nll, kl, tokens, with_kl, start_time, controller) -> dict:
    """An as-served evaluation's row: the metrics, then the controller's statistics."""
    return {"perplexity": math.exp(nll / tokens), "kl": kl / tokens if with_kl else None, "tokens": tokens,
            "seconds": time.perf_counter() - start_time, **controller.stats()}


def _cached(model):
    """`model` as a function of a batch whose logits are computed once (the reference of every policy)."""
    seen = {}

    def run(batch):
        key = (batch.data_ptr(), tuple(batch.shape))
        if key not in seen:
            seen[key] = SimpleNamespace(logits=model(batch, use_cache=False).logits)
        return seen[key]

    return run



def evaluate_policies(loaded, data, specs, reference=None, batch_size: int = 8, progress=True) -> dict:
    """Each policy evaluated as served: static:B, static mixed and error estimates alone in
    teacher-forced passes, entropy-bucket plans step by step (STEP_ROWS rows a step)."""
    rows = {}
    vocab = loaded.model.get_output_embeddings().out_features  # a FlexLinear with --quantized-head
    if reference is not None and len(specs) > 1 and data[:, :-1].numel() * vocab * 4 <= CACHE_BYTES:
        reference = _cached(reference)
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
                    if plan.edges:  # each step's plan reads the served distribution of the step before
                        r = evaluate_served(loaded.model, controller, data, reference=reference,
                                            batch_size=max(batch_size, STEP_ROWS), progress=progress)
                    else:
                        r = evaluate_served_parallel(loaded.model, controller, data, reference=reference,
                                                     batch_size=batch_size, progress=progress)
                finally:
                    controller.close()
            rows[r["policy"]] = r
    return rows
