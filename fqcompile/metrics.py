"""Perplexity and KL(p_ref || p_q) of a model at one or more precisions, on token samples."""

import math
import time

import torch
from rich.progress import Progress

from .errors import FqError
from .runtime import set_precision

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


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def kl_per_token(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    p = ref_lp.exp()  # where p == 0 the term is 0, not 0 * inf
    return torch.where(p > 0, p * (ref_lp - lp), 0.0).sum(-1)


def entropy(lp: torch.Tensor) -> torch.Tensor:
    p = lp.exp()
    return -torch.where(p > 0, p * lp, 0.0).sum(-1)



