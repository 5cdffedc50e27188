"""Generation speed per policy, side by side in one run (`fqcompile bench`, scripts/bench_generate.py).

Every row runs in a process of its own (so its peak memory is its own) that loads only
what it needs: a policy's process reads the planes up to the highest precision its plan
uses. For each policy: prefill tokens/s for the prompt and decode tokens/s for a fixed
number of greedy tokens (stop tokens ignored, so every row decodes the same count), the
controller's share of the decode time and the bits read per weight. Optionally the source
model in bf16 through Hugging Face `generate` (eager) as the baseline, and llama.cpp
(llama-cpp-python, the optional `bench` extra) on the source GGUF requantized to Q8_0
and Q4_0.
"""

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import decoding, sources
from .controller import Controller, resolve
from .errors import FqError
from .formats import checkpoint as ckpt
from .files import atomic_file
from .processes import python_command
from .generation import choose_engine, decoder
from .loader import load, options_label, read_policy, set_int8_activations

LLAMA_CPP_TYPES = ("Q8_0", "Q4_0")
BENCH_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
              "in want of a wife. However little known the feelings or views of such a man may be on his first "
              "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he "
              "is considered as the rightful property of some one or other of their daughters. ")


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    """The benchmark prompt: `tokens` tokens of BENCH_TEXT."""
    return tokenizer(BENCH_TEXT * 8)["input_ids"][:tokens]


def run_policy(loaded, spec: str, ids: list[int], new_tokens: int, engine: str) -> dict:
    """Time one policy on a loaded checkpoint: prefill of `ids`, then `new_tokens` greedy decode steps."""
    name, _ = choose_engine(loaded, engine, length=len(ids) + new_tokens)
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
            decoding.generate(dec, [ids], new_tokens, stop_ids=[], pad=pad,
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


def policy_row(folder: str, spec: str, ids: list[int], new_tokens: int, engine: str, quantized_head=False,
               int8_activations=False) -> dict:
    """Load `folder` with only the planes `spec` needs, warm up, then time it (run_policy)."""

    manifest = ckpt.read_manifest(Path(folder))
    plan = resolve(read_policy(Path(folder)), manifest, spec)
    loaded = load(folder, precision=int(max(plan.bits.max(), plan.prefill)), quantized_head=quantized_head)
    set_int8_activations(loaded.model, int8_activations)
    run_policy(loaded, spec, ids[:4], 2, engine)  # warm-up: kernel load, fusion, first-call costs
    row = run_policy(loaded, spec, ids, new_tokens, engine)
    if quantized_head or int8_activations:
        row["policy"] += ", " + options_label(quantized_head, int8_activations)
    return row


def hf_row(source: str, ids: list[int], new_tokens: int, dtype: str = "bfloat16") -> dict:
    """The source model in `dtype` through Hugging Face `generate` (eager attention)."""
    model, tok, _ = sources.load(source)
    return hf_timing(model.to(getattr(torch, dtype)), tok, ids, new_tokens)


def hf_timing(model, tok, ids: list[int], new_tokens: int) -> dict:
    """hf_row's timing of an already loaded Hugging Face model."""
    dtype = str(model.dtype).removeprefix("torch.")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(prompt[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
        start = time.perf_counter()
        model(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        total = time.perf_counter() - start
    return {"policy": f"HF eager {dtype}", "engine": "hf", "prompt_tokens": len(ids), "new_tokens": new_tokens,
            "prefill_tokens_per_s": len(ids) / prefill,
            "decode_tokens_per_s": (new_tokens - 1) / max(total - prefill, 1e-9), "avg_bits_read": None,
            "controller_share": None, "peak_rss_mib": _rss_peak_mib()}


def source_gguf(source: str) -> Path | None:
    """The GGUF file a checkpoint's source model came from (None for other sources)."""
    if source in sources.BUILTIN:
        return sources.builtin_gguf(source)
    return Path(source) if source.endswith(".gguf") and Path(source).is_file() else None


def llama_cpp_row(gguf: str, kind: str, ids: list[int], new_tokens: int, threads: int, work: str) -> dict:
    """llama.cpp (llama-cpp-python) on `gguf` requantized to `kind`: same prompt, greedy, same count."""
    import ctypes

    import llama_cpp
    import numpy as np

    target = Path(work) / f"{Path(gguf).stem}.{kind}.gguf"
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.allow_requantize = True  # the built-in GGUF is itself quantized (Q4_1)
        params.nthread = threads
        with atomic_file(target) as partial:
            if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
                raise FqError(f"llama.cpp could not quantize {gguf} to {kind}")
    llm = llama_cpp.Llama(str(target), n_ctx=len(ids) + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    llm.eval(ids[:4])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = time.perf_counter() - start
    return {"policy": f"llama.cpp {kind}", "engine": "llama.cpp", "prompt_tokens": len(ids), "new_tokens": new_tokens,
            "prefill_tokens_per_s": len(ids) / prefill, "decode_tokens_per_s": (new_tokens - 1) / decode,
            "avg_bits_read": None, "controller_share": None, "peak_rss_mib": _rss_peak_mib()}


JOBS = {"policy": policy_row, "hf": hf_row, "llama.cpp": llama_cpp_row}


def isolated(job: str, **kwargs) -> dict:
    """Run JOBS[job](**kwargs) in a fresh Python process; its row (peak memory is that process's)."""
    cmd = python_command("-m", "fqcompile.bench", json.dumps({"job": job, "kwargs": kwargs}))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise FqError(f"{job} run failed: {lines[-1] if lines else 'no message'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_specs(manifest: dict, policy: dict) -> list[str]:
    """Static at every ladder precision, plus static-mixed and dynamic at the policy's budget if calibrated."""
    specs = [f"static:{b}" for b in manifest["ladder"]]
    if policy.get("kind") == "dynamic":
        budget = (policy.get("expected") or {}).get("avg_bits")
        specs += [f"static-mixed:{budget:g}", "dynamic"] if budget else ["dynamic"]
    return specs


def run_bench(folder, specs=None, new_tokens: int = 128, prompt_tokens: int = 64, engine: str = "auto",
              quantized_head: bool = True, int8_activations: bool = True, baseline: bool = True, repeats: int = 1,
              on_row=None, compare=()) -> tuple[list[dict], list[str]]:
    """Every policy in `specs` (default: default_specs) and the baselines, each row `repeats` times, the rows
    in turn, each run in a process of its own; returns the median rows and notes on baselines left out.
    `compare`: other checkpoint folders whose rows for the same policies run in the same turns (their
    policy names get the folder's name). `on_row(row, repeat)` hears of each run as it ends."""
    manifest, policy = ckpt.read_manifest(Path(folder)), read_policy(folder)
    specs = list(specs) if specs else default_specs(manifest, policy)
    folders = [Path(folder), *map(Path, compare)]
    for other in folders:  # refuse a bad folder or policy here, before any row runs
        other_manifest, other_policy = ckpt.read_manifest(other), read_policy(other)
        for spec in specs:
            resolve(other_policy, other_manifest, spec)
    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(folder), prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="fqcompile-bench-") as work:  # requantized GGUFs
        jobs = [("policy", dict(folder=str(f), spec=s, ids=ids, new_tokens=new_tokens, engine=engine,
                                quantized_head=quantized_head, int8_activations=int8_activations))
                for s in specs for f in folders]
        notes = []
        if baseline:
            jobs += baseline_jobs(manifest["source"]["model"], ids, new_tokens, work, notes)
        runs = [[] for _ in jobs]  # per job, its rows; None once a baseline failed
        for rep in range(repeats):
            for i, (job, kwargs) in enumerate(jobs):
                if runs[i] is None:
                    continue
                try:
                    row = isolated(job, **kwargs)
                except FqError as exc:
                    if job == "policy":
                        raise
                    notes.append(str(exc))
                    runs[i] = None
                    continue
                if compare and job == "policy":
                    row["policy"] = f"{row['policy']} [{Path(kwargs['folder']).name}]"
                runs[i].append(row)
                if on_row is not None:
                    on_row(row, rep)
    return [median_row(r) for r in runs if r], notes


def baseline_jobs(source: str, ids: list[int], new_tokens: int, work: str, notes: list[str]) -> list[tuple]:
    """Hugging Face bf16, and llama.cpp at Q8_0 and Q4_0 where it is installed and the source is a GGUF."""
    jobs = [("hf", dict(source=source, ids=ids, new_tokens=new_tokens))]
    gguf = source_gguf(source)
    if importlib.util.find_spec("llama_cpp") is None:
        gguf, why = None, "llama-cpp-python is not installed (pip install 'fqcompile[bench]')"
    else:
        why = f"the source model {source} is not a GGUF file"
    if gguf is None:
        notes.append(f"no llama.cpp rows: {why}")
        return jobs
    return jobs + [("llama.cpp", dict(gguf=str(gguf), kind=k, ids=ids, new_tokens=new_tokens, threads=threads(),
                                      work=work)) for k in LLAMA_CPP_TYPES]


def threads() -> int:
    return torch.get_num_threads()


def median_row(runs: list[dict]) -> dict:
    """One row from repeated runs of a job: the median speeds and shares, the largest peak memory."""
    row = dict(runs[0])
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "avg_bits_read", "controller_share"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    row["runs"] = len(runs)
    row["decode_tokens_per_s_runs"] = [r["decode_tokens_per_s"] for r in runs]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| policy | engine | decode tokens/s | prefill tokens/s | bits read/weight | controller share | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = f"{r['avg_bits_read']:.2f}" if r["avg_bits_read"] else "-"
        share = f"{r['controller_share']:.2%}" if r["controller_share"] is not None else "-"
        lines.append(f"| {r['policy']} | {r['engine']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.1f} | {bits} | {share} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one isolated row: python -m fqcompile.bench '{"job": ..., "kwargs": {...}}'
    try:
        spec = json.loads(sys.argv[1])
        print(json.dumps(JOBS[spec["job"]](**spec["kwargs"])))
    except FqError as exc:
        sys.exit(str(exc))  # isolated() passes this line on
