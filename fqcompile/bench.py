"""Generation speed per policy, side by side in one run (`fqcompile bench`, scripts/bench_generate.py).

For each policy: prefill tokens/s for the prompt and decode tokens/s for a fixed number of
greedy tokens (stop tokens ignored, so every policy decodes the same count) through the
chosen engine, the controller's share of the decode time, and the bits read per weight.
Optionally the source model in bf16 through Hugging Face `generate` (eager) as the baseline.
"""

import resource
import time

import torch

from .controller import Controller, resolve
from .runtime import choose_engine, decoder


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_policy(loaded, spec: str, ids: list[int], new_tokens: int, engine: str) -> dict:
    """Time one policy: prefill of `ids`, then `new_tokens` greedy decode steps."""
    from . import llama

    name, _ = choose_engine(loaded, engine)
    plan = resolve(loaded.policy, loaded.manifest, spec)
    controller = Controller(loaded.model, loaded.manifest, plan)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    marks = []
    try:
        if name == "slim":
            dec = decoder(loaded)
            controller.attach(dec)
            controller.reset()
            start = time.perf_counter()
            llama.generate(dec, [ids], new_tokens, stop_ids=[], pad=pad,
                           on_logits=lambda step, _: marks.append(time.perf_counter()))
            end = time.perf_counter()
        else:
            controller.reset()
            with torch.inference_mode():
                prompt = torch.tensor([ids])
                start = time.perf_counter()
                out = loaded.model(prompt, use_cache=True)
                marks.append(time.perf_counter())
                loaded.model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=pad)
                end = time.perf_counter()
                del out
        stats = controller.stats()
    finally:
        controller.close()
    prefill = marks[0] - start  # the slim loop marks each step's logits; the first comes after prefill
    decode = end - marks[0] if name == "slim" else end - marks[0] - prefill  # HF re-runs the prompt
    return {
        "policy": plan.label, "engine": name, "prompt_tokens": len(ids), "new_tokens": new_tokens,
        "prefill_tokens_per_s": len(ids) / prefill, "decode_tokens_per_s": (new_tokens - 1) / decode,
        "avg_bits_read": stats["avg_bits_read"], "controller_share": stats["controller_seconds"] / decode,
        "peak_rss_mib": _rss_peak_mib(),
    }


def hf_baseline(source: str, ids: list[int], new_tokens: int, dtype=torch.bfloat16) -> dict:
    """The source model in `dtype` through Hugging Face `generate` (eager attention)."""
    from . import models

    model, tok, _ = models.load(source)
    model = model.to(dtype)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        total = time.perf_counter() - start
    return {"policy": f"HF eager {str(dtype).removeprefix('torch.')}", "engine": "hf", "prompt_tokens": len(ids),
            "new_tokens": new_tokens, "prefill_tokens_per_s": len(ids) / prefill,
            "decode_tokens_per_s": (new_tokens - 1) / max(total - prefill, 1e-9), "avg_bits_read": None,
            "controller_share": None, "peak_rss_mib": _rss_peak_mib()}


def table(rows: list[dict]) -> str:
    lines = ["| policy | engine | decode tokens/s | prefill tokens/s | bits read/weight | controller share | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = f"{r['avg_bits_read']:.2f}" if r["avg_bits_read"] else "-"
        share = f"{r['controller_share']:.2%}" if r["controller_share"] is not None else "-"
        lines.append(f"| {r['policy']} | {r['engine']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.1f} | {bits} | {share} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)
