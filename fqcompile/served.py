"""Evaluation "as served": each position under the plan the controller chose one step before."""

import math
import time

import torch
from rich.progress import Progress

from .controller import Controller, resolve
from .formats.checkpoint import precision_stats
from .metrics import evaluate, kl_per_token, log_probs
from .runtime import dense_weights


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
    print(f"{'policy':>18} {'bits read/weight':>17} {'perplexity':>11} {'KL':>9}  tokens at each precision")
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
            kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
            share = ", ".join(f"{b}: {s:.0%}" for b, s in r["share"].items())
            print(f"{r['policy']:>18} {r['avg_bits_read']:17.3f} {r['perplexity']:11.3f} {kl:>9}  {share}")
            rows[r["policy"]] = r
    return rows
