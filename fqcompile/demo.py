"""`fqcompile demo`: the main job end to end on the built-in model, with a results table.

Calibrate, export (with the fitted policy; round-to-nearest by default, nested GPTQ on request), load, generate under each policy,
time each policy's decode the way `fqcompile bench` does (after the one-time kernel build
and a warm-up), time Hugging Face bf16 the same way, and evaluate each policy as served.
"""

import statistics
import time
from pathlib import Path

import torch

from . import sources
from .bench import hf_timing, prompt_ids, run_policy
from .calibrator import calibrate
from .calibration.data import load_samples
from .controller import Controller, resolve
from .exporter import export
from .formats import checkpoint as ckpt
from .kernels import backend
from .evaluation import evaluate
from .generation import generate
from .loader import load, options_label, set_int8_activations
from .evaluation import evaluate_policies

PROMPT = "Write two sentences about the sea."
SPEED_RUNS = 3  # decode timings per policy; the table shows their median


def run_demo(out: Path, dataset: str = "self", samples: int = 4, seq_len: int = 128, target_bits: float = 6.0,
             new_tokens: int = 64, fast: tuple[bool, bool] = (True, True), method: str = "rtn") -> None:
    """The main job end to end with small settings; `method` "gptq" gives better low-bit slices but
    takes about five more minutes on two cores (docs/results.md)."""
    quantized_head, int8_activations = fast
    start = time.perf_counter()
    stages = {}
    out = Path(out)
    calib, folder = out / "calibration", out / "smollm2-135m-nested"
    kernels = backend(torch.device("cpu"))  # the one-time build happens here, before anything is timed
    stages["kernel build"] = time.perf_counter() - start
    print(f"[0/5] CPU kernels: {kernels} (ready in {stages['kernel build']:.0f} s)")
    print(f"[1/5] calibrating {sources.BUILTIN_NAME} on {dataset} text (small settings; see `fqcompile calibrate`)")
    mark = time.perf_counter()
    policy = calibrate(sources.BUILTIN_NAME, calib, dataset=dataset, target_bits=target_bits, samples=4,
                       eval_samples=2, seq_len=96)
    stages["calibrate"] = time.perf_counter() - mark
    print(f"      policy: {policy['expected']['avg_bits']:.2f} average bits; report in {calib}/report.md")
    what = "nested GPTQ on the same text (16 x 256 tokens)" if method == "gptq" else "round-to-nearest (no data)"
    print(f"[2/5] exporting with {what}, ladder [4, 8], group size 128 and the fitted policy -> {folder}")
    mark = time.perf_counter()
    gptq = dict(dataset=dataset, samples=16, seq_len=256) if method == "gptq" else {}
    export(sources.BUILTIN_NAME, folder, ladder=(4, 8), group_size=128, force=True, calib=calib, method=method,
           **gptq)
    stages["export"] = time.perf_counter() - mark
    mark = time.perf_counter()
    loaded = load(folder, quantized_head=quantized_head)
    set_int8_activations(loaded.model, int8_activations)
    options = options_label(quantized_head, int8_activations)
    print(f"[3/5] loaded the checkpoint (config + safetensors only; {options}); "
          f"generating and timing each policy ({new_tokens} greedy tokens, median of {SPEED_RUNS})")
    specs = ["static:8", "static:4", f"static-mixed:{target_bits:g}", "dynamic"]
    ids = prompt_ids(loaded.tokenizer, 64)
    speed = {}
    for spec in specs:
        controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, spec))
        r = generate(loaded, PROMPT, max_new_tokens=40, chat=True, controller=controller)
        controller.close()
        runs = [run_policy(loaded, spec, ids, new_tokens, "auto") for _ in range(SPEED_RUNS)]
        speed[spec] = statistics.median(row["decode_tokens_per_s"] for row in runs)
        print(f"--- {spec}: {speed[spec]:.1f} tokens/s decode ({runs[0]['engine']} engine), "
              f"{r['controller']['avg_bits_read']:.2f} bits read per weight ---\n{r['text'].strip()}\n")
    baseline, tok, _ = sources.load(sources.BUILTIN_NAME)
    baseline = baseline.to(torch.bfloat16)  # loaded once, timed SPEED_RUNS times
    hf = statistics.median(hf_timing(baseline, tok, ids, new_tokens)["decode_tokens_per_s"] for _ in range(SPEED_RUNS))
    del baseline
    print(f"--- Hugging Face generate, bf16 (eager): {hf:.1f} tokens/s decode ---")
    stages["generate and time"] = time.perf_counter() - mark
    mark = time.perf_counter()
    print(f"[4/5] evaluating as served against the full-precision model ({samples} x {seq_len} held-out tokens)")
    ref, tok, _ = sources.load(sources.BUILTIN_NAME)
    # seed 7: text the calibration (seeds 0 and 1) never saw
    data = load_samples(dataset, tok, split="eval", seq_len=seq_len, max_samples=samples, model=ref, seed=7)
    rows = evaluate_policies(loaded, data, specs, reference=ref, batch_size=samples)
    fp = evaluate(ref, data, progress=False)[None]
    stages["evaluate"] = time.perf_counter() - mark
    stats = ckpt.precision_stats(loaded.manifest)
    print("[5/5] results")
    print("| policy | bits read/weight | checkpoint MB | perplexity | KL vs full precision | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    fp_mb = sum(p.numel() * p.element_size() for p in ref.parameters()) / 1e6
    print(f"| full precision (HF bf16 for speed) | {ref.dtype.itemsize * 8} | {fp_mb:.1f} | {fp['perplexity']:.3f} "
          f"| 0 | {hf:.1f} |")
    for spec, r in zip(specs, rows.values()):
        resident = stats[4] if spec == "static:4" else stats[8]
        print(f"| {r['policy']} | {r['avg_bits_read']:.3f} | {resident['resident_bytes'] / 1e6:.1f} | "
              f"{r['perplexity']:.3f} | {r['kl']:.4f} | {speed[spec]:.1f} ({speed[spec] / hf:.1f}x) |")
    print(f"checkpoint MB = bytes resident under that policy (planes it needs + scales/zeros + unquantized tensors); "
          f"decode tokens/s at batch 1 after a warm-up, as `fqcompile bench` times them; options: "
          f"{options}")
    print(f"demo took {time.perf_counter() - start:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
