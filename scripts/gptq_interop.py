"""GPTQ exports loaded by GPTQModel and by transformers, against fqcompile at the same plan.

Calibrates and exports the built-in model on the zero-exact grid (unless --ckpt is given),
writes each plan as a GPTQ checkpoint (`fqcompile export-gptq`), then loads every export
on CPU with GPTQModel and with transformers' GPTQ integration (both in GPTQModel's own
venv, through scripts/gptqmodel_eval.py) and reports each loader's perplexity on the same
held-out tokens beside fqcompile's (float head and activations, the export's plan) and a
greedy generation. Writes OUT.md and OUT.json.

    python scripts/gptq_interop.py --out docs/interop
"""

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

import fqcompile
from fqcompile import sources
from fqcompile.calibration.data import load_samples
from fqcompile.calibrator import calibrate
from fqcompile.gptq_export import export_gptq

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "austen"
GPTQMODEL_PYTHON = Path("/work/gptqmodel-venv/bin/python")
LOADERS = ("gptqmodel", "transformers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a zero-exact checkpoint to export (default: calibrate and export the built-in "
                                   "model here)")
    ap.add_argument("--describe", help="how --ckpt was made, for the report")
    ap.add_argument("--method", default="gptq", help="quantizer of the checkpoint made here: gptq or rtn")
    ap.add_argument("--group-size", type=int, default=128,
                    help="group size of the checkpoint made here (64 for vLLM on the built-in model's 576-wide layers)")
    ap.add_argument("--dataset", default=str(DEFAULT_DATA))
    ap.add_argument("--plans", nargs="+", default=["static:4", "static:8", "static-mixed:6"])
    ap.add_argument("--formats", default="gptq_v2", help="GPTQ checkpoint formats to write, comma-separated")
    ap.add_argument("--samples", type=int, default=2,
                    help="evaluation samples (of --seq-len tokens); GPTQModel's float16 CPU path scores ~7 tokens/s here")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration samples for the policy")
    ap.add_argument("--gptqmodel-python", default=str(GPTQMODEL_PYTHON),
                    help="python of a venv with GPTQModel and optimum (docs/gptq.md)")
    ap.add_argument("--dtype", default="float16", help="compute dtype of the GPTQ loaders: float16 or bfloat16")
    ap.add_argument("--keep", help="write the exports into this folder (kept, e.g. for scripts/gpu_check.sh)")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "interop"), help="output prefix (.md/.json)")
    args = ap.parse_args()
    if not Path(args.gptqmodel_python).is_file():
        raise SystemExit(f"no GPTQModel python at {args.gptqmodel_python} (docs/gptq.md says how to make one)")

    info = {"dataset": args.dataset, "samples": args.samples, "seq_len": args.seq_len, "dtype": args.dtype,
            "machine": cpu_name(), "fqcompile": fqcompile.__version__, "timings_s": {}}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(work, args, info["timings_s"])
        info["checkpoint"] = (args.describe or str(ckpt)) if args.ckpt else \
            f"built-in model, {args.method}, [4, 8], zero-exact, group {args.group_size}"
        tok = AutoTokenizer.from_pretrained(ckpt)
        data = load_samples(args.dataset, tok, split="eval", seq_len=args.seq_len, max_samples=args.samples)
        tokens = work / "tokens.json"
        tokens.write_text(json.dumps(data.tolist()))
        for plan in args.plans:
            for fmt in args.formats.split(","):
                out = (Path(args.keep) if args.keep else work) / f"{plan.replace(':', '-')}-{fmt}"
                start = time.perf_counter()
                record = export_gptq(ckpt, out, plan, fmt, dataset=args.dataset, samples=args.samples,
                                     seq_len=args.seq_len, progress=False)
                info["timings_s"][f"export-gptq {plan} {fmt}"] = round(time.perf_counter() - start, 1)
                row = {"plan": record["plan"], "format": fmt, "layers_at": record["layers_at"],
                       "bits_per_weight": record["bits_per_weight"], "exact": record["exact"]["identical"],
                       "fqcompile": record["quality"]["fqcompile_perplexity"],
                       "dense_export": record["quality"]["perplexity"], "notes": record["notes"]}
                for loader in LOADERS:
                    row[loader] = run_loader(args.gptqmodel_python, out, tokens, loader, args.dtype, work)
                rows.append(row)
                print(summary(row), flush=True)
                write(rows, info, Path(args.out))


def make_checkpoint(work: Path, args, timings: dict) -> Path:
    start = time.perf_counter()
    calibrate(sources.BUILTIN_NAME, work / "calib", dataset=args.dataset, grid="zero-exact",
              group_size=args.group_size, samples=args.calib_samples, progress=False)
    timings["calibrate"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    ckpt = fqcompile.export(sources.BUILTIN_NAME, work / "ckpt", ladder=(4, 8), grid="zero-exact", method=args.method,
                            group_size=args.group_size, calib=work / "calib", progress=False)
    timings["export"] = round(time.perf_counter() - start, 1)
    return ckpt


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.machine()


def run_loader(python: str, folder: Path, tokens: Path, loader: str, dtype: str, work: Path) -> dict:
    out = work / f"{folder.name}-{loader}.json"
    result = subprocess.run([python, str(HERE / "gptqmodel_eval.py"), "--model", str(folder), "--tokens", str(tokens),
                             "--loader", loader, "--dtype", dtype, "--out", str(out)], capture_output=True, text=True,
                            cwd=work)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit {result.returncode}"}
    return json.loads(out.read_text())


def delta(row, loader) -> str:
    r = row[loader]
    if "error" in r:
        return f"failed: {r['error']}"
    return f"{r['perplexity']:.3f} ({100 * (r['perplexity'] / row['fqcompile'] - 1):+.3f}%)"


def summary(row) -> str:
    return (f"{row['plan']} {row['format']}: fqcompile {row['fqcompile']:.3f}, dense export {row['dense_export']:.3f}, "
            + ", ".join(f"{loader} {delta(row, loader)}" for loader in LOADERS))


def write(rows, info, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Checkpoint: {info['checkpoint']}. Perplexity on {info['samples']} x {info['seq_len']} tokens of the `eval` "
        f"split of `{Path(info['dataset']).name}`; fqcompile: the nested slices at the export's plan, float head and "
        f"activations, float32; GPTQModel and transformers: the export loaded on CPU, {info['dtype']} compute. "
        f"Machine: {info['machine']}.", "",
        "| plan | format | layers per width | bits/weight | exact | fqcompile | dense export | GPTQModel | transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        widths = ", ".join(f"{n} at {b}" for b, n in r["layers_at"].items())
        lines.append(f"| {r['plan']} | {r['format']} | {widths} | {r['bits_per_weight']:.3f} | "
                     f"{'yes' if r['exact'] else 'no'} | {r['fqcompile']:.3f} | {r['dense_export']:.3f} | "
                     f"{delta(r, 'gptqmodel')} | {delta(r, 'transformers')} |")
    lines += ["", "fqcompile and the dense export (the export read back by `formats/gptq_format.py` into a plain "
              "Hugging Face model) compute in float32; the loaders' differences are their float16 arithmetic. "
              "A loader that fails shows its error: transformers' GPTQ integration (through optimum) has no "
              "per-layer widths, so it cannot build a mixed plan's `dynamic` layers; GPTQModel refuses asymmetric "
              "checkpoints in format `gptq` (v1) unless it wrote them itself.", "",
              "Kernels and generations (greedy, 32 tokens, newlines shown as ⏎):", ""]
    for r in rows:
        for loader in LOADERS:
            x = r[loader]
            if "error" not in x:
                text = (x["prompt"] + x["generation"]).replace("\n", " ⏎ ")
                lines.append(f"- {r['plan']} {r['format']}, {loader} ({', '.join(x['kernels'])}; load {x['load_s']} s, "
                             f"scoring {x['eval_s']} s): \"{text}\"")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in info["timings_s"].items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
