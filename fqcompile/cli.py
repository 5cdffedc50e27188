"""The `fqcompile` command line. Bad input: one line on stderr, exit code 2, nothing written.

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so
`fqcompile --help` and argument errors answer at once.
"""

import json
import sys
import time
from pathlib import Path

import typer

from .cli_options import (MODEL_HELP, POLICY_HELP, Int8Activations, JsonPath, OneLineErrors, QuantizedHead,
                          check_json_path, fast_options, parse_ladder, parse_percent,
                          parse_rung_weights, policy_spec, write_json)
from .errors import FqError

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Compile LLMs into switchable nested-bit checkpoints and run them.",
)


@app.command()
def export(
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint folder to create"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    ladder: str = typer.Option("4,8", help="precisions the checkpoint serves, increasing, each 2..8"),
    group_size: int = typer.Option(128, help="quantization group along the input dimension"),
    force: bool = typer.Option(False, "--force", help="replace an existing checkpoint folder"),
    calib: Path = typer.Option(None, "--calib", help="calibration folder whose fitted policy goes into the checkpoint"),
    method: str = typer.Option(None, help="rtn | gptq (default: gptq when calibration text is given, "
                                          "by --dataset or by --calib's dataset; else rtn)"),
    dataset: str = typer.Option(None, help="GPTQ calibration text: local files/folder, hub name[:config], or 'self'"),
    samples: int = typer.Option(64, help="GPTQ calibration samples"),
    seq_len: int = typer.Option(512, help="tokens per GPTQ calibration sample"),
    seed: int = typer.Option(0, help="seed for 'self' calibration text and for --rotate"),
    grid: str = typer.Option("lowest-rung", help="nested grid: lowest-rung (format 1) or zero-exact (format 2: 0 is "
                                                 "a level of every precision; experimental, docs/results.md)"),
    rotate: bool = typer.Option(False, "--rotate/--no-rotate",
                                help="rotate the model first (Hadamard-based, offline: same outputs, outliers "
                                     "spread, better low-bit slices); Llama, Mistral and Qwen2 models"),
    damp: float = typer.Option(0.01, help="GPTQ damping, a fraction of the mean Hessian diagonal"),
    block_size: int = typer.Option(128, help="GPTQ columns per lazy update (speed only)"),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order",
                                   help="GPTQ: quantize columns by decreasing activation energy (static groups)"),
    rung_weights: str = typer.Option(None, help="GPTQ: how much each precision's error counts, e.g. 4:1,8:0.25 "
                                                "(default: searched per layer, see --upper-budget)"),
    upper_budget: float = typer.Option(1.0, help="GPTQ: searched rung weights keep every precision above the "
                                                 "lowest within this factor of RTN's layer error"),
    propagate: int = typer.Option(None, help="GPTQ: the precision whose outputs feed the next block "
                                             "(default: the lowest)"),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential",
                                         help="GPTQ: take each layer's Hessian after the earlier layers of its "
                                              "block are quantized"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Quantize a model to nested-bit codes and write a checkpoint folder."""
    from .calibration.gptq import GPTQConfig
    from .exporter import ExportConfig
    from .exporter import export as run_export

    start = time.perf_counter()
    gptq = GPTQConfig(damp=damp, block_size=block_size, act_order=act_order,
                      rung_weights=parse_rung_weights(rung_weights), upper_budget=upper_budget, propagate=propagate,
                      true_sequential=true_sequential)
    config = ExportConfig(ladder=parse_ladder(ladder), group_size=group_size, method=method, dataset=dataset,
                          samples=samples, seq_len=seq_len, seed=seed, grid=grid, rotate=rotate, gptq=gptq)
    folder = run_export(model, out, config, force=force, progress=not quiet, calib=calib)
    if not quiet:
        print(f"wrote {folder} in {time.perf_counter() - start:.1f} s")
        _print_summary(folder, verify=False)
        log_path = folder / "gptq-log.json"
        if log_path.is_file():
            log = json.loads(log_path.read_text())
            print(f"memory      peak {log['peak_rss_mib']:.0f} MiB resident (the process held "
                  f"{log['rss_before_mib'] or 0:.0f} MiB before quantizing; the whole model in fp32 "
                  f"would add {log['model_fp32_mib']:.0f} MiB)")


@app.command(name="export-gptq")
def export_gptq(
    folder: Path = typer.Argument(..., help="fqcompile checkpoint folder"),
    policy: str = typer.Option(..., "--policy", help="the plan to write: static:B or static-mixed:BITS"),
    out: Path = typer.Option(..., "--out", "-o", help="GPTQ checkpoint folder to create"),
    checkpoint_format: str = typer.Option("gptq_v2", "--checkpoint-format", help="gptq_v2 (zero points as they "
                                          "are) or gptq (v1: minus one, for older loaders; docs/gptq-export.md)"),
    dataset: str = typer.Option(None, help="text to measure the export's perplexity on, beside fqcompile's"),
    samples: int = typer.Option(8, min=1, help="evaluation samples for --dataset"),
    seq_len: int = typer.Option(512, min=2, help="tokens per evaluation sample"),
    force: bool = typer.Option(False, "--force", help="replace an existing export folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Write one static plan of a checkpoint as a GPTQ checkpoint (GPTQModel, transformers, vLLM)."""
    from .gptq_export import export_gptq as run, summary

    start = time.perf_counter()
    record = run(folder, out, policy, checkpoint_format, force=force, dataset=dataset, samples=samples,
                 seq_len=seq_len, progress=not quiet)
    for note in record["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if not quiet:
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s: " + "\n".join(summary(record)))


@app.command()
def calibrate(
    out: Path = typer.Option(..., "--out", "-o", help="calibration folder (resumable)"),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (default: smollm2-135m, or the "
                                                                        "--checkpoint's source)"),
    checkpoint: Path = typer.Option(None, help="measure this checkpoint's own slices (GPTQ, rotated: what it serves) "
                                               "and write the policy into it; its ladder, group size and grid apply"),
    dataset: str = typer.Option("self", help="'self' (sampled from the model), local files/folder, or hub name[:config]"),
    ladder: str = typer.Option("4,8", help="precisions, as for export"),
    unit: str = typer.Option("projection", help="switching unit: block (a decoder layer's linears), projection (the "
                                           "linears reading one input: q/k/v, o, gate/up, down) or linear"),
    target_bits: float = typer.Option(None, help="average bits per weight to reach (default: middle of the ladder)"),
    max_ppl_increase: str = typer.Option(None, help="allowed perplexity increase instead, e.g. 1%"),
    samples: int = typer.Option(4, help="calibration samples"),
    eval_samples: int = typer.Option(8, help="held-out samples for validating the fit"),
    seq_len: int = typer.Option(256, min=8),
    group_size: int = typer.Option(128),
    signal: str = typer.Option("estimate", help="per-token switch: entropy (previous token), estimate (each unit's error "
                                               "estimated on its input) or both"),
    buckets: int = typer.Option(8, help="entropy buckets (with --signal entropy or both)"),
    smoothing: float = typer.Option(0.0, help="EMA smoothing of the entropy signal (0 = none)"),
    batch_size: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    grid: str = typer.Option("lowest-rung", help="the grid of the RTN slices measured: the export's --grid"),
):
    """Measure layer sensitivity by entropy and KL, fit the switching policy, validate and report."""
    from .calibrator import calibrate as run_calibrate

    start = time.perf_counter()
    policy = run_calibrate(model or (None if checkpoint else "smollm2-135m"), out, checkpoint=checkpoint,
                           dataset=dataset, ladder=parse_ladder(ladder), unit=unit, signal=signal,
                           target_bits=target_bits, max_ppl_increase=parse_percent(max_ppl_increase),
                           samples=samples, eval_samples=eval_samples, seq_len=seq_len, group_size=group_size,
                           buckets=buckets, smoothing=smoothing, batch_size=batch_size, seed=seed, grid=grid)
    exp, sm = policy["expected"], policy["static_mixed"]
    print(f"policy: {exp['avg_bits']:.2f} average bits, expected mean KL {exp['kl']:.4f} "
          f"(static mixed at {sm['avg_bits']:.2f} bits: {sm['expected_kl']:.4f})")
    print(f"wrote {out}/policy.json{f' (and into {checkpoint})' if checkpoint else ''} and {out}/report.md in "
          f"{time.perf_counter() - start:.0f} s")


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="checkpoint folder"),
    verify: bool = typer.Option(False, "--verify", help="check every file's SHA-256 against the manifest"),
    json_path: JsonPath = None,
):
    """Show a checkpoint's ladder, parts and sizes; check its files."""
    check_json_path(json_path)
    write_json(json_path, _print_summary(folder, verify=verify))


def _print_summary(folder: Path, verify: bool) -> dict:
    from .inspection import summary

    text, data = summary(folder, verify)
    print(text)
    return data


@app.command()
def generate(
    folder: Path = typer.Argument(..., help="checkpoint folder"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="repeat for a batch of prompts"),
    policy: str = typer.Option(None, help=POLICY_HELP),
    precision: int = typer.Option(None, help="shortcut for --policy static:B"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="share of tokens at each precision per unit"),
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    stream: bool = typer.Option(True, "--stream/--no-stream"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="check file hashes on load"),
    int8_activations: Int8Activations = None,
    quantized_head: QuantizedHead = None,
    engine: str = typer.Option("auto", help="slim (fqcompile's decoder: Llama, Mistral, Qwen2/3, Gemma 3, Phi-3), "
                               "hf (Hugging Face generate), or auto: slim where the model allows"),
    json_path: JsonPath = None,
):
    """Generate text from a checkpoint under a precision policy (dynamic or static)."""
    check_json_path(json_path)
    spec = policy_spec(policy, precision)
    quantized_head, int8_activations = fast_options(quantized_head, int8_activations)
    from transformers import TextStreamer

    from .controller import Controller, resolve
    from .generation import generate as run_generate
    from .loader import load, options_label, set_int8_activations

    static_bits = int(spec.split(":")[1]) if spec and spec.startswith("static:") else None
    loaded = load(folder, precision=static_bits, verify=verify, quantized_head=quantized_head)  # a static precision reads only its planes
    set_int8_activations(loaded.model, int8_activations)
    controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, spec))
    batch = len(prompt) > 1
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream and not batch else None
    result = run_generate(loaded, prompt if batch else prompt[0], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, chat=chat,
                          streamer=streamer, controller=controller, engine=engine)
    stats = controller.stats(verbose=verbose)
    if streamer is None:
        print("\n---\n".join(result["text"]) if batch else result["text"])
    result.update(controller=stats, precision=static_bits, bits_per_weight=stats["avg_bits_read"],
                  options={"quantized_head": quantized_head, "int8_activations": int8_activations})
    share = ", ".join(f"{b}-bit {s:.0%}" for b, s in stats["share"].items())
    print(f"{result['new_tokens']} tokens in {result['seconds']:.2f} s ({result['tokens_per_s'] or 0:.2f} tokens/s), "
          f"policy {stats['policy']}: {stats['avg_bits_read'] or 0:.3f} bits read per weight; tokens at {share}; "
          f"engine {result['engine']} ({result['engine_reason']}); "
          f"{options_label(quantized_head, int8_activations)}", file=sys.stderr)
    for unit, shares in stats.get("per_unit", {}).items():
        print(f"  {unit}: " + ", ".join(f"{b}-bit {s:.0%}" for b, s in shares.items()), file=sys.stderr)
    write_json(json_path, result)


@app.command()
def bench(
    folder: Path = typer.Argument(..., help="checkpoint folder"),
    policy: list[str] = typer.Option(None, "--policy", help="repeatable; default: static at every ladder "
                                     "precision, plus static-mixed and dynamic at the policy's budget if calibrated"),
    new_tokens: int = typer.Option(128, min=2, help="greedy tokens decoded per policy (stop tokens ignored)"),
    prompt_tokens: int = typer.Option(64, min=1),
    engine: str = typer.Option("auto", help="slim, hf or auto"),
    quantized_head: QuantizedHead = None,
    int8_activations: Int8Activations = None,
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="also time the source model in bf16 through Hugging Face generate, and "
                                  "llama.cpp at Q8_0 and Q4_0 if llama-cpp-python is installed"),
    repeats: int = typer.Option(1, min=1, help="run every row this many times, the rows in turn, and report "
                                "medians (on a shared, noisy machine)"),
    compare: list[Path] = typer.Option(None, "--compare", help="repeatable: another checkpoint whose rows for the "
                                       "same policies run in the same turns (e.g. another grid or ladder)"),
    json_path: JsonPath = None,
):
    """Decode and prefill tokens/s per policy, side by side in one run (each row in its own process)."""
    check_json_path(json_path)
    quantized_head, int8_activations = fast_options(quantized_head, int8_activations)
    from .bench import run_bench, table, threads

    def said(row, rep):
        which = f" (run {rep + 1} of {repeats})" if repeats > 1 else ""
        print(f"{row['policy']}: {row['decode_tokens_per_s']:.1f} tokens/s decode{which}", file=sys.stderr)

    rows, notes = run_bench(folder, policy, new_tokens=new_tokens, prompt_tokens=prompt_tokens, engine=engine,
                            quantized_head=quantized_head, int8_activations=int8_activations, baseline=baseline,
                            repeats=repeats, on_row=said, compare=compare or ())
    for note in notes:
        print(note, file=sys.stderr)
    print(table(rows))
    write_json(json_path, {"checkpoint": str(folder), "compare": [str(c) for c in compare or ()],
                           "threads": threads(), "repeats": repeats, "rows": rows, "notes": notes})


@app.command(name="eval")
def eval_(
    target: str = typer.Argument(..., help="checkpoint folder, or a model (" + MODEL_HELP + ")"),
    dataset: str = typer.Option("self", help="'self' (sampled from the model), local files/folder, or hub name[:config]"),
    split: str = typer.Option("eval", help="calib, eval or all"),
    precision: str = typer.Option("all", help="a ladder precision or 'all'"),
    policy: list[str] = typer.Option(None, "--policy", help="evaluate as served under a policy (repeatable): "
                                     + POLICY_HELP),
    seq_len: int = typer.Option(512, min=2),
    samples: int = typer.Option(None, min=1, help="number of samples (default: 32; 8 for 'self')"),
    batch_size: int = typer.Option(2, min=1),
    reference: str = typer.Option(None, help="full-precision model for KL (default: the checkpoint's source)"),
    no_reference: bool = typer.Option(False, "--no-reference", help="skip KL and the reference model"),
    text_column: str = typer.Option(None, help="column holding the text in jsonl/parquet/hub data"),
    seed: int = typer.Option(0, help="seed for 'self' sampling"),
    int8_activations: Int8Activations = None,
    quantized_head: QuantizedHead = None,
    json_path: JsonPath = None,
):
    """Perplexity and KL vs the full-precision model, per precision, on held-out text.

    A checkpoint is measured as `generate` serves it by default (8-bit head, int8 activations)
    unless those are turned off; the options in force are printed and written to --json.
    """
    check_json_path(json_path)
    from . import sources
    from .calibration.data import SELF, load_samples
    from .formats import checkpoint as ckpt
    from .evaluation import FULL, evaluate
    from .loader import load, options_label, set_int8_activations

    is_ckpt = (Path(target) / ckpt.MANIFEST).is_file()
    options = None
    if is_ckpt:
        quantized_head, int8_activations = fast_options(quantized_head, int8_activations)
        options = {"quantized_head": quantized_head, "int8_activations": int8_activations}
        ladder = ckpt.read_manifest(Path(target))["ladder"]
        if precision == "all":
            precisions = list(ladder)
        elif precision.isdigit() and int(precision) in ladder:
            precisions = [int(precision)]
        else:
            raise FqError(f"precision {precision} is not in the ladder {ladder} (or use 'all')")
        loaded = load(target, quantized_head=quantized_head)
        set_int8_activations(loaded.model, int8_activations)
        model, tok = loaded.model, loaded.tokenizer
        stats = ckpt.precision_stats(loaded.manifest)
        ref_spec = None if no_reference else (reference or loaded.manifest["source"]["model"])
        ref = _reference(ref_spec, explicit=reference is not None)
    else:
        if precision != "all" or int8_activations or quantized_head or policy:
            raise FqError("--precision, --policy, --int8-activations and --quantized-head apply to checkpoints; a "
                          "plain model is evaluated as it is")
        model, tok, _ = sources.load(target)
        precisions, stats, ref, ref_spec = [None], {}, None, None
    n = samples or (8 if dataset == SELF else 32)
    data = load_samples(dataset, tok, split=split, seq_len=seq_len, max_samples=n, model=ref or model,
                        seed=seed, text_column=text_column)
    if options is not None:
        served = "" if all(options.values()) else " (generate serves 8-bit head, int8 activations by default)"
        print(f"options: {options_label(**options)}{served}")
    if policy:
        from .evaluation import evaluate_policies

        rows = evaluate_policies(loaded, data, policy, ref, batch_size)
        print(f"{'policy':>18} {'bits read/weight':>17} {'perplexity':>11} {'KL':>9}  tokens at each precision")
        for r in rows.values():
            kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
            share = ", ".join(f"{b}: {s:.0%}" for b, s in r["share"].items())
            print(f"{r['policy']:>18} {r['avg_bits_read']:17.3f} {r['perplexity']:11.3f} {kl:>9}  {share}")
        write_json(json_path, {"target": target, "dataset": dataset, "split": split, "seq_len": seq_len,
                               "samples": int(data.shape[0]), "reference": ref_spec if ref is not None else None,
                               "options": options, "policies": rows})
        return
    results = evaluate(model, data, precisions=precisions, reference=ref, batch_size=batch_size)
    print(f"{data.shape[0]} samples x {seq_len} tokens of {dataset} ({split}), "
          f"{results[precisions[0]]['tokens']} tokens scored")
    print(f"{'precision':>10} {'bits/weight':>12} {'resident MB':>12} {'perplexity':>11} {'KL':>9}")
    rows = {}
    for label, r in results.items():
        name = FULL if label in (FULL, None) else str(label)
        s = stats.get(label, {})
        bpw = s.get("bits_per_weight")
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        print(f"{name:>10} {'-' if bpw is None else round(bpw, 3)!s:>12} "
              f"{'-' if not s else round(s['resident_bytes'] / 1e6, 1)!s:>12} {r['perplexity']:11.3f} {kl:>9}")
        rows[name] = dict(r, **s)
    write_json(json_path, {"target": target, "dataset": dataset, "split": split, "seq_len": seq_len,
                           "samples": int(data.shape[0]), "reference": ref_spec if ref is not None else None,
                           "options": options, "results": rows})


def _reference(spec: str | None, explicit: bool):
    """The full-precision model for KL; a missing default source only costs the KL column."""
    from . import sources

    if spec is None:
        return None
    try:
        return sources.load(spec)[0]
    except FqError as exc:
        if explicit:
            raise
        print(f"warning: source model unavailable ({exc}); KL not reported (use --reference)", file=sys.stderr)
        return None


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="working folder for the demo's outputs"),
    dataset: str = typer.Option("self", help="text: 'self' (sampled from the model) or local files"),
    samples: int = typer.Option(4, min=2, help="held-out samples for the final table"),
    seq_len: int = typer.Option(128, min=16),
    method: str = typer.Option("rtn", help="export quantizer: rtn (seconds) or gptq (better low-bit slices, "
                                           "about five more minutes on two cores)"),
    target_bits: float = typer.Option(6.0, help="average bits the dynamic policy aims for"),
    new_tokens: int = typer.Option(64, min=2, help="greedy tokens decoded per policy for the speed column"),
    quantized_head: QuantizedHead = None,
    int8_activations: Int8Activations = None,
):
    """The main job end to end on the built-in model: calibrate, export, generate, evaluate as served."""
    from .demo import run_demo

    run_demo(out, dataset=dataset, samples=samples, seq_len=seq_len, target_bits=target_bits, new_tokens=new_tokens,
             fast=fast_options(quantized_head, int8_activations), method=method)


def main() -> None:
    """Console entry point (the group's main turns every expected failure into one line on stderr)."""
    app()


if __name__ == "__main__":
    main()
