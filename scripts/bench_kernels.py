"""Kernel speed, side by side in one run: our nested-bit linear against torch's baselines.

For each weight shape (out x in) and batch, times y = x @ W^T with:
  fp32 / bf16      F.linear on dense weights
  int8pack         torch._weight_int8pack_mm (bf16 activations, per-channel int8)
  int4pack         torch._weight_int4pack_mm_for_cpu (bf16 activations, group 128)
  deq+linear       our torch reference: dequantize the b-bit slice, then F.linear (fp32)
  ours-b           fqcompile's kernel (the fast CPU path) at every precision of the ladder
  ours-b-i8a       the same in the int8-activation mode (activations quantized per block of 16), through
                   FlexLinear: on AVX2 builds batches up to 8 read pack_rows' copy (kernels.md)
plus a plain streaming read of >= 1 GiB for this machine's memory bandwidth.

Each method's weights are rotated through --rotate-mib distinct copies, so each call
reads them from RAM rather than cache, and the methods are timed round-robin (one call of
each in turn, many rounds), so drifting machine load hits all of them alike; the
table shows medians. Writes a Markdown report (default docs/benchmarks.md) and JSON.

    python scripts/bench_kernels.py                      # the full run (a few minutes)
    python scripts/bench_kernels.py --shapes 1024x1024 --batches 1 --rounds 20 --out /tmp/b
"""

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fqcompile.flex_linear import FlexLinear
from fqcompile.formats.nested import Layout, dequantize, pack_planes, quantize_rtn
from fqcompile.kernels import backend, flex_linear, ops

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"

GROUP = 128


def cpu_name() -> str:
    """The CPU's model name and the widest instruction set the kernels use on it (they differ most by that)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = next((label for flag, label in (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), None)
    return f"{name} ({isa})" if isa else name


def stream_gbs(gib: float = 1.0, runs: int = 9) -> float:
    """Read bandwidth of a plain reduction over a >= 1 GiB float32 buffer (GB/s, median)."""
    data = torch.rand(int(gib * 2**30) // 4)
    data.sum()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def copies(nbytes: int, rotate_mib: int) -> int:
    return max(2, math.ceil(rotate_mib * 2**20 / nbytes))


def methods(out: int, inp: int, ladder, rotate_mib: int):
    """{name: (bytes read per call, [calls taking (x fp32, x bf16)])}, each with its own rotated weights."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=gen) * 0.02
    layout = Layout(out, inp, group_size=GROUP, ladder=ladder)
    codes, scale, zero = quantize_rtn(w, GROUP, ladder)
    planes = pack_planes(codes, layout)
    meta_bytes = scale.numel() * 3
    found = {}

    n = copies(w.numel() * 4, rotate_mib)
    dense = [w.clone() for _ in range(n)]
    found["fp32"] = (w.numel() * 4, [lambda x, xb, d=d: F.linear(x, d) for d in dense])
    n = copies(w.numel() * 2, rotate_mib)
    dense16 = [w.bfloat16() for _ in range(n)]
    found["bf16"] = (w.numel() * 2, [lambda x, xb, d=d: F.linear(xb, d) for d in dense16])

    n = copies(w.numel(), rotate_mib)
    q8 = (w / (w.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
    s8 = (w.abs().amax(1) / 127).bfloat16()
    found["int8pack"] = (w.numel() + out * 2, [
        lambda x, xb, q=q8.clone(): torch._weight_int8pack_mm(xb, q, s8) for _ in range(n)])

    n = copies(w.numel() // 2, rotate_mib)
    q4 = torch.randint(0, 16, (out, inp), generator=gen, dtype=torch.int32)
    sz = torch.rand(inp // GROUP, out, 2, generator=gen).bfloat16()
    packed = [torch._convert_weight_to_int4pack_for_cpu(q4, 1) for _ in range(n)]
    found["int4pack"] = (w.numel() // 2 + sz.numel() * 2, [
        lambda x, xb, p=p: torch._weight_int4pack_mm_for_cpu(xb, p, GROUP, sz) for p in packed])

    for bits in ladder:
        k = layout.planes_for(bits)
        nbytes = sum(p.numel() for p in planes[:k]) + meta_bytes
        sets = [([p.clone() for p in planes[:k]], scale.clone(), zero.clone())
                for _ in range(copies(nbytes, rotate_mib))]
        found[f"ours-{bits}"] = (nbytes, [
            lambda x, xb, s=s, bits=bits: flex_linear(x, s[0], (layout, s[1], s[2]), bits) for s in sets])
        # As the runtime runs it: FlexLinear, which holds its planes packed for int8 calls where
        # this machine's kernels have the packed rows (kernels.md), packed here, not while timed.
        layers = [FlexLinear(layout, s[0], s[1], s[2]) for s in sets]
        for m in layers:
            m.pack()
        found[f"ours-{bits}-i8a"] = (nbytes, [lambda x, xb, m=m, bits=bits: m.run(x, bits, True) for m in layers])
        # The reference path is slow and allocates a dense weight per call: few copies suffice.
        found[f"deq+linear-{bits}"] = (nbytes, [
            lambda x, xb, s=s, bits=bits: F.linear(x, dequantize(s[0], s[1], s[2], layout, bits)) for s in sets[:2]])
    return found


def time_round_robin(found: dict, x: torch.Tensor, rounds: int) -> dict:
    """Median seconds per call of each method; one call of each per round, in turn."""
    xb = x.bfloat16()
    times = {name: [] for name in found}
    turn = {name: 0 for name in found}
    for name, (_, calls) in found.items():  # warm-up: first-call setup, page faults
        for call in calls[:2]:
            call(x, xb)
    for _ in range(rounds):
        for name, (_, calls) in found.items():
            call = calls[turn[name] % len(calls)]
            turn[name] += 1
            start = time.perf_counter()
            call(x, xb)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def perplexity_check(data: Path, samples: int, ladder) -> dict:
    """Built-in model, RTN nested checkpoint: perplexity through our kernels and the reference."""
    import tempfile

    import fqcompile
    from fqcompile import sources
    from fqcompile.calibration.data import load_samples

    with tempfile.TemporaryDirectory() as tmp:
        folder = fqcompile.export(sources.BUILTIN_NAME, Path(tmp) / "ckpt", ladder=ladder, progress=False)
        loaded = fqcompile.load(folder)
    chunks = load_samples(str(data), loaded.tokenizer, split="eval", seq_len=512, max_samples=samples)
    found = {}
    fast = backend(torch.device("cpu"))
    for name, int8 in ((fast, False), ("reference", False), (fast, True)):
        ops._ready["cpu"] = name
        fqcompile.set_int8_activations(loaded.model, int8)
        start = time.perf_counter()
        result = fqcompile.evaluate(loaded.model, chunks, precisions=list(ladder), progress=False)
        found[name + (" int8-activations" if int8 else "")] = {
            "seconds": time.perf_counter() - start, **{str(b): result[b]["perplexity"] for b in ladder}}
    ops._ready.pop("cpu")
    return {"tokens": sum(c.numel() for c in chunks), "results": found}


def ratios(row: dict, ladder, stream: float) -> dict:
    lo, hi = ladder[0], ladder[-1]
    t = row["ms"]
    return {
        f"{hi}-bit vs int8pack": t["int8pack"] / t[f"ours-{hi}"],
        f"{lo}-bit vs our {hi}-bit": t[f"ours-{hi}"] / t[f"ours-{lo}"],
        f"{lo}-bit vs int4pack": t["int4pack"] / t[f"ours-{lo}"],
        f"{lo}-bit bandwidth / stream": row["bytes"][f"ours-{lo}"] / (t[f"ours-{lo}"] * 1e-3) / 1e9 / stream,
        f"{lo}-bit vs bf16": t["bf16"] / t[f"ours-{lo}"],
        f"{hi}-bit vs bf16": t["bf16"] / t[f"ours-{hi}"],
        f"{hi}-bit vs deq+linear": t[f"deq+linear-{hi}"] / t[f"ours-{hi}"],
        f"{lo}-bit i8a vs our {hi}-bit": t[f"ours-{hi}"] / t[f"ours-{lo}-i8a"],
        f"{lo}-bit i8a vs int4pack": t["int4pack"] / t[f"ours-{lo}-i8a"],
        f"{lo}-bit i8a bandwidth / stream": row["bytes"][f"ours-{lo}-i8a"] / (t[f"ours-{lo}-i8a"] * 1e-3) / 1e9 / stream,
    }


TARGETS = [  # (shape, batch, ratio name, minimum) from the kernels issue
    ("4096x4096", 1, "{hi}-bit vs int8pack", 1.3),
    ("4096x4096", 1, "{lo}-bit vs our {hi}-bit", 1.45),
    ("4096x4096", 1, "{lo}-bit vs int4pack", 2.0),
    ("4096x4096", 1, "{lo}-bit bandwidth / stream", 0.8),
    ("4096x4096", 4, "{lo}-bit vs bf16", 1.0),
    ("4096x4096", 4, "{hi}-bit vs bf16", 1.0),
    ("4096x4096", 32, "{hi}-bit vs deq+linear", 1 / 1.2),
    ("4096x4096", 1, "{lo}-bit i8a vs our {hi}-bit", 1.8),
]


def report(results: list, ladder, stream: float, args, elapsed: float, ppl: dict | None) -> str:
    lo, hi = ladder[0], ladder[-1]
    names = list(results[0]["ms"])
    lines = [
        "# Kernel benchmarks",
        "",
        f"Measured {datetime.date.today()} on {cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, fqcompile kernel backend `{backend(torch.device('cpu'))}`; "
        f"{elapsed / 60:.1f} min. Command:",
        "",
        f"    python scripts/bench_kernels.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
        f"Streaming read of a 1 GiB buffer: **{stream:.1f} GB/s**. Weights rotate through "
        f"≥ {args.rotate_mib} MiB of copies per method; medians of {args.rounds} calls, methods "
        "timed in turn. Activations fp32 for ours, fp32 and deq+linear; bf16 for the others. "
        f"Ours: ladder {list(ladder)}, group {GROUP}. Design, GPU status and how to read these: "
        "[kernels.md](kernels.md).",
        "",
        "## Milliseconds per call",
        "",
        "| shape (out×in) | batch | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in results:
        lines.append(f"| {r['shape']} | {r['batch']} | " + " | ".join(f"{r['ms'][n]:.3f}" for n in names) + " |")
    keys = list(ratios(results[0], ladder, stream))
    lines += ["", "## Ratios (higher is better for ours)", "",
              "| shape | batch | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"| {r['shape']} | {r['batch']} | " + " | ".join(f"{r['ratios'][k]:.2f}" for k in keys) + " |")
    lines += ["", "## Targets", "", "| shape | batch | ratio | target | measured | |", "|---|---|---|---|---|---|"]
    for shape, batch, key, minimum in TARGETS:
        key = key.format(lo=lo, hi=hi)
        row = next((r for r in results if r["shape"] == shape and r["batch"] == batch), None)
        if row is None:
            continue
        got = row["ratios"][key]
        lines.append(f"| {shape} | {batch} | {key} | ≥ {minimum:.2f} | {got:.2f} | {'met' if got >= minimum else 'missed'} |")
    if ppl:
        lines += ["", "## Perplexity through the kernels", "",
                  f"Built-in SmolLM2-135M, RTN nested checkpoint {list(ladder)}, {ppl['tokens']} held-out Austen "
                  "tokens, the whole model evaluated once through each path:", "",
                  "| path | " + " | ".join(f"{b}-bit ppl" for b in ladder) + " | eval seconds |",
                  "|---|" + "---|" * (len(ladder) + 1)]
        for name, r in ppl["results"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[str(b)]:.6f}" for b in ladder) + f" | {r['seconds']:.1f} |")
        (fast, exact), (_, ref), (_, int8) = list(ppl["results"].items())
        lines += ["", "Fast path vs reference, relative: " + ", ".join(
            f"{b}-bit {exact[str(b)] / ref[str(b)] - 1:+.1e}" for b in ladder) + ". Int8-activation cost: " + ", ".join(
            f"{b}-bit {int8[str(b)] / exact[str(b)] - 1:+.2%}" for b in ladder) + " (target ≤ +0.2%)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma-separated")
    ap.add_argument("--batches", default="1,4,32")
    ap.add_argument("--ladder", default="4,8")
    ap.add_argument("--rounds", type=int, default=60, help="timed calls per method (median)")
    ap.add_argument("--rotate-mib", type=int, default=512, help="distinct weight bytes per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/benchmarks", help="writes OUT.md and OUT.json")
    ap.add_argument("--ppl-samples", type=int, default=8,
                    help="512-token held-out samples for the perplexity check (0 skips it)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="held-out text for the perplexity check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ladder = tuple(int(b) for b in args.ladder.split(","))
    started = time.perf_counter()
    backend(torch.device("cpu"))  # build the CPU kernels before anything is timed
    stream = stream_gbs()
    print(f"streaming read: {stream:.1f} GB/s")
    results = []
    for shape in args.shapes.split(","):
        out, inp = (int(v) for v in shape.lower().split("x"))
        found = methods(out, inp, ladder, args.rotate_mib)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(batch))
            secs = time_round_robin(found, x, args.rounds)
            row = {"shape": shape, "batch": batch, "ms": {k: v * 1e3 for k, v in secs.items()},
                   "bytes": {k: v[0] for k, v in found.items()}}
            row["ratios"] = ratios(row, ladder, stream)
            results.append(row)
            print(f"{shape} batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ms"].items()))
        del found
    ppl = perplexity_check(Path(args.data), args.ppl_samples, ladder) if args.ppl_samples else None
    text = report(results, ladder, stream, args, time.perf_counter() - started, ppl)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"stream_gbs": stream, "ladder": list(ladder), "threads": args.threads, "results": results,
         "perplexity": ppl}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
