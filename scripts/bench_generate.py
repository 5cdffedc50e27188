"""Generation speed per policy in one run, written to docs/bench-generate.{md,json}.

    python scripts/bench_generate.py CKPT [--new-tokens 128] [--prompt-tokens 64] [--repeats 3] [--out PREFIX]

Runs `fqcompile bench` (fqcompile/bench.py) three times: every policy as exported (float
head, float activations); every policy with the 8-bit head (--quantized-head); and with
the 8-bit head and int8 activations (--int8-activations), which is what llama.cpp's
Q4_0/Q8_0 dot products do (activations in 8-bit blocks of 32), together with the baselines
(Hugging Face generate in bf16; llama.cpp at Q8_0 and Q4_0 when llama-cpp-python is
installed and the source is a GGUF), their runs taken in turn with those rows'. Each row is
its own process, so its peak memory is its own.
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_kernels import cpu_name
from fqcompile.processes import python_command

ROOT = Path(__file__).resolve().parents[1]


def bench(checkpoint: str, new_tokens: int, prompt_tokens: int, repeats: int, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = python_command("-m", "fqcompile.cli", "bench", checkpoint, "--new-tokens", str(new_tokens),
                             "--prompt-tokens", str(prompt_tokens), "--repeats", str(repeats), "--json", str(out), *extra)
        run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode:
            sys.exit(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "fqcompile bench failed")
        return json.loads(out.read_text())


def breakdown(checkpoint: str, bits: int, quantized_head: bool, int8: bool, new_tokens: int, prompt: list[int]) -> dict:
    """Where a slim-engine decode step goes at a static precision: the median step; the same
    with the per-op Python loop instead of the one-call C++ stack; then a pass with the
    stack's projections, attention and whole calls clocked inside C++, the quantized head's
    calls and a float head's matmul timed from Python (means per step, so they add up)."""
    from fqcompile import decoding, generation, loader, slim
    from fqcompile.flex_linear import FlexLinear

    loaded = loader.load(checkpoint, precision=bits, quantized_head=quantized_head)
    loader.set_precision(loaded.model, bits)
    loader.set_int8_activations(loaded.model, int8)
    dec = generation.decoder(loaded)
    clock, marks = {"linear": 0.0, "head": 0.0, "attend": 0.0, "stack": 0.0, "stack_linear": 0.0}, []

    def mark(step, _logits):
        if step == 0:  # the prefill is over: count decode steps only
            clock.update(linear=0.0, head=0.0, attend=0.0, stack=0.0, stack_linear=0.0)
            if dec.stack is not None:
                dec.stack.timings()  # resets the stack's clocks (built anew by each generate)
        marks.append(time.perf_counter())

    def steps(mean: bool = False) -> float:
        """The median decode step (or the mean, to match the clocks' sums)."""
        marks.clear()
        decoding.generate(dec, [prompt], new_tokens, stop_ids=[], pad=0, on_logits=mark)
        gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
        return sum(gaps) / len(gaps) if mean else gaps[len(gaps) // 2]

    def timed(fn, key):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            clock[key] += time.perf_counter() - start
            return out
        return call

    steps()  # warm-up
    step = steps()
    dec.use_stack = False
    try:
        loop_step = steps()
    finally:
        dec.use_stack = True
    build = slim.Decoder._build_stack
    run, began, hooks = FlexLinear.run, {}, []
    FlexLinear.run = timed(run, "linear")  # the quantized head (and every projection if there is no stack)
    if not isinstance(dec.head, FlexLinear):  # a float head is an nn.Linear: time it by hooks
        hooks = [dec.head.register_forward_pre_hook(lambda m, a: began.update(t=time.perf_counter())),
                 dec.head.register_forward_hook(lambda m, a, o: clock.update(head=clock["head"] + time.perf_counter()
                                                                             - began["t"]))]

    def build_timed(self):
        stack = build(self)
        if stack is not None:
            stack.set_timing(True)
        return stack

    slim.Decoder._build_stack = build_timed
    try:
        timed_step = steps(mean=True)
        if dec.stack is not None:  # (checked below)
            clock["stack_linear"], clock["attend"], clock["stack"] = dec.stack.timings()
    finally:
        FlexLinear.run = run
        slim.Decoder._build_stack = build
        for h in hooks:
            h.remove()
    if dec.stack is None:
        sys.exit("the breakdown needs the C++ stack (CPU kernels, float32)")
    ms = {k: 1e3 * v / (new_tokens - 1) for k, v in clock.items()}  # means over the decode steps
    glue = ms["stack"] - ms["stack_linear"] - ms["attend"]  # norms, SwiGLU, residuals
    return {"config": f"static:{bits}" + (", 8-bit head" if quantized_head else "") + (", int8 activations" if int8 else ""),
            "step_ms": 1e3 * step, "per_op_loop_step_ms": 1e3 * loop_step, "timed_step_ms": 1e3 * timed_step,
            "linears_ms": ms["linear"] + ms["stack_linear"], "attention_ms": ms["attend"], "glue_ms": glue,
            "float_head_ms": ms["head"],
            "outside_ms": 1e3 * timed_step - ms["linear"] - ms["stack_linear"] - ms["attend"] - glue - ms["head"]}


def _shown(script: str) -> str:
    """The script as run from the repository root (the command a reader can repeat)."""
    path = Path(script).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else script


def report(checkpoint: str, out: Path, new_tokens: int, prompt_tokens: int, title: str, about: str,
           repeats: int = 3) -> str:
    """The three bench runs and the breakdown; writes OUT.json and OUT.md and returns the markdown."""
    plain = bench(checkpoint, new_tokens, prompt_tokens, repeats, "--no-quantized-head", "--no-int8-activations",
                  "--no-baseline")
    head = bench(checkpoint, new_tokens, prompt_tokens, repeats, "--quantized-head", "--no-int8-activations",
                 "--no-baseline")
    # The baselines run with the rows the targets compare them to, in the same turns: run to
    # run, this machine's speed moves by more than the differences being measured.
    both = bench(checkpoint, new_tokens, prompt_tokens, repeats, "--quantized-head", "--int8-activations")
    rows = plain["rows"] + head["rows"] + both["rows"]
    from transformers import AutoTokenizer

    from fqcompile.bench import prompt_ids

    prompt = prompt_ids(AutoTokenizer.from_pretrained(checkpoint), prompt_tokens)
    manifest = json.loads((Path(checkpoint) / "fqcompile.json").read_text())
    ends = (manifest["ladder"][0], manifest["ladder"][-1])
    parts = [breakdown(checkpoint, b, qh, i8, new_tokens, prompt) for b in ends for qh, i8 in ((0, 0), (1, 1))]
    data = {"checkpoint": checkpoint, "threads": plain["threads"], "repeats": repeats, "rows": rows, "notes": both["notes"],
            "breakdown": parts}
    out.with_name(out.name + ".json").write_text(json.dumps(data, indent=1) + "\n")
    from fqcompile.bench import table

    notes = [f"- {n}" for n in both["notes"]]
    split = ["| config | decode step ms | per-op loop step ms | timed step ms | quantized linears ms | attention ms "
             "| norms, SwiGLU, residuals ms | float head ms | outside the layers ms |", "|---|---|---|---|---|---|---|---|---|"]
    split += [f"| {b['config']} | {b['step_ms']:.2f} | {b['per_op_loop_step_ms']:.2f} | {b['timed_step_ms']:.2f} | "
              f"{b['linears_ms']:.2f} | {b['attention_ms']:.2f} | {b['glue_ms']:.2f} | {b['float_head_ms']:.2f} | "
              f"{b['outside_ms']:.2f} |" for b in parts]
    text = "\n".join([
        f"# {title}", "",
        f"Measured {datetime.date.today()} on {cpu_name()}, {data['threads']} threads, torch {torch.__version__}, batch 1, greedy, "
        f"{prompt_tokens}-token prompt, {new_tokens} new tokens (stop tokens ignored); "
        + (f"every row run {repeats} times, the rows in turn, medians shown. " if repeats > 1 else "one run a row. ")
        + "Command:", "",
        f"    python {' '.join([_shown(sys.argv[0]), *sys.argv[1:]])}", "",
        about,
        f"Checkpoint: {manifest['source']['model']}, {manifest['quantizer']['method']} nested "
        f"{manifest['ladder']}, group {manifest['group_size']}.", "",
        table(rows), "", *notes, "" if notes else "",
        "Controller share: the precision controller's hooks as a share of the decode time. Bits read/weight: "
        "the quantized layers' planes, scales and zeros per weight (the head is not counted). "
        "\"8-bit head\": `--quantized-head`; \"int8 activations\": `--int8-activations`. Peak RSS: each row is a process of its own.", "",
        "Where a decode step goes (slim engine, static precision). \"Decode step\": the median step; "
        "\"per-op loop\": the same with the layers run op by op from Python instead of in one C++ call "
        "(kernels/cpu_stack.cpp). A third pass (\"timed step\", its mean step) clocks, inside the C++ stack, "
        "the projections' kernels, attention and the rest of the layers (norms, SwiGLU, residual adds), and "
        "from Python the 8-bit head's calls (counted with the linears) and a float head's matmul; \"outside "
        "the layers\" is the remainder: embedding, the final norm, sampling, the controller, Python:", "",
        *split, ""])
    out.with_name(out.name + ".md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of every row, in turn; medians reported")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-generate"))
    args = ap.parse_args()
    print(report(args.checkpoint, Path(args.out), args.new_tokens, args.prompt_tokens, "Generation benchmark", "",
                 args.repeats))


if __name__ == "__main__":
    main()
