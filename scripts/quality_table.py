"""Quality of nested slices vs models quantized directly at each precision, per method, in one run.

For each method (rtn, gptq), grid (lowest-rung = format 1, zero-exact = format 2),
rotation (off, on) and ladder, exports the nested checkpoint, and one direct
(single-precision) checkpoint per ladder width and rotation, through the product path;
every model is also evaluated out of domain (docstrings of torch.nn and torch.optim,
technical prose the Austen calibration never saw); optionally
quantizes the model directly with GPTQModel (run in its own virtual environment, on the
same calibration samples) and reads its GPTQ checkpoint back. Every model is evaluated
against the full-precision model on the same held-out samples. Writes a markdown table,
a JSON file and a PNG plot (perplexity vs bits per weight, one line per method).

    python scripts/quality_table.py --ladders 4,8 4,6,8 3,4,6,8 --out docs/quality
"""

import argparse
import ast
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import fqcompile
from fqcompile import sources
from fqcompile.calibration.data import load_samples
from fqcompile.formats import gptq_format
from fqcompile.formats.checkpoint import precision_stats
from fqcompile.loader import dense_weights

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "austen"
GPTQMODEL_PYTHON = Path("/work/gptqmodel-venv/bin/python")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=sources.BUILTIN_NAME)
    ap.add_argument("--dataset", default=str(DEFAULT_DATA))
    ap.add_argument("--ladders", nargs="+", default=["4,8", "4,6,8", "3,4,6,8"])
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--grids", default="lowest-rung,zero-exact")
    ap.add_argument("--rotate", default="off,on", help="rotations to try: off, on, or off,on")
    ap.add_argument("--gptq-grids", default=None, help="grids for GPTQ (default: --grids)")
    ap.add_argument("--gptq-ladders", nargs="+", default=None, help="ladders for GPTQ (default: --ladders)")
    ap.add_argument("--ood-samples", type=int, default=16, help="out-of-domain evaluation samples (0: none)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=32, help="evaluation samples (of --seq-len tokens)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=64, help="GPTQ calibration samples")
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--gptqmodel-python", default=str(GPTQMODEL_PYTHON) if GPTQMODEL_PYTHON.exists() else None,
                    help="python of a venv with GPTQModel installed (see docs/gptq.md); none: skip it")
    ap.add_argument("--gptqmodel-bits", default="4")
    ap.add_argument("--gptqmodel-act-order", default="on", help="GPTQModel desc_act: on, off, or off,on")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "quality"), help="output prefix (.md/.json/.png)")
    ap.add_argument("--merge", nargs="+", help="only combine earlier runs' .json files (same model, data and "
                                                "evaluation) into one table")
    args = ap.parse_args()
    if args.merge:
        return merge([Path(f) for f in args.merge], Path(args.out))
    torch.manual_seed(0)
    ladders = [tuple(int(b) for b in text.split(",")) for text in args.ladders]
    gptq_ladders = [tuple(int(b) for b in text.split(",")) for text in args.gptq_ladders or args.ladders]
    methods, grids, rotations = args.methods.split(","), args.grids.split(","), [r == "on" for r in args.rotate.split(",")]
    gptq_grids = (args.gptq_grids or args.grids).split(",")

    ref, tok, folder = sources.load(args.model)
    samples = load_samples(args.dataset, tok, split="eval", seq_len=args.seq_len, max_samples=args.samples)
    calib = dict(dataset=args.dataset, samples=args.calib_samples, seq_len=args.calib_seq_len)
    rows, timings = [], {}
    with tempfile.TemporaryDirectory() as work:
        ood = None
        if args.ood_samples:
            ood = load_samples(str(docstrings(Path(work) / "ood")), tok, split="eval", seq_len=args.seq_len,
                               max_samples=args.ood_samples)
        fp = fqcompile.evaluate(ref, samples, reference=None, progress=False)[None]
        fp_ood = fqcompile.evaluate(ref, ood, reference=None, progress=False)[None] if ood is not None else None
        rows.append(row("full precision", None, 32.0, dict(fp, kl=0.0), fp_ood and dict(fp_ood, kl=0.0)))
        runs = []
        for method in methods:
            for rot in rotations:
                for grid in (gptq_grids if method == "gptq" else grids):
                    runs += [(method, "nested", lad, grid, rot) for lad in (gptq_ladders if method == "gptq" else ladders)]
                widths = sorted({b for lad in (gptq_ladders if method == "gptq" else ladders) for b in lad})
                runs += [(method, "direct", (b,), "zero-exact", rot) for b in widths]  # one rung: both grids agree
        for method, kind, rungs, grid, rot in runs:
            name = f"{method}-{kind}-{'-'.join(map(str, rungs))}" + (f"-{grid}" if kind == "nested" else "") + \
                ("-rotated" if rot else "")
            out = Path(work) / name
            start = time.perf_counter()
            fqcompile.export(args.model, out, ladder=rungs, group_size=args.group_size, progress=False, method=method,
                             grid=grid, rotate=rot, **(calib if method == "gptq" else {}))
            timings[name] = round(time.perf_counter() - start, 1)
            loaded = fqcompile.load(out)
            with dense_weights(loaded.model):
                result = fqcompile.evaluate(loaded.model, samples, precisions=rungs, reference=ref, progress=False)
                other = (fqcompile.evaluate(loaded.model, ood, precisions=rungs, reference=ref, progress=False)
                         if ood is not None else {})
            stats = precision_stats(loaded.manifest)
            label = f"{method} {kind}" + (f" {list(rungs)} {grid}" if kind == "nested" else "") + \
                (" rotated" if rot else "")
            for b in rungs:
                rows.append(row(label, b, stats[b]["bits_per_weight"], result[b], other.get(b)))
            write(rows, run_info(args, samples, ood, ladders, calib, timings), Path(args.out), quiet=True)  # so far
            print(f"{name} ({timings[name]} s): " + ", ".join(
                f"{b}-bit KL {result[b]['kl']:.4f}" + (f" (ood {other[b]['kl']:.4f})" if other else "") for b in rungs),
                flush=True)
            shutil.rmtree(out)
        if args.gptqmodel_python:
            calib_ids = load_samples(args.dataset, tok, split="calib", seq_len=args.calib_seq_len,
                                     max_samples=args.calib_samples)
            calib_file = Path(work) / "calib.json"
            calib_file.write_text(json.dumps(calib_ids.tolist()))
            variants = [(int(b), a) for b in args.gptqmodel_bits.split(",") for a in args.gptqmodel_act_order.split(",")]
            for bits, act in variants:
                out = Path(work) / f"gptqmodel-{bits}-act-order-{act}"
                start = time.perf_counter()
                subprocess.run([args.gptqmodel_python, str(HERE / "gptqmodel_baseline.py"), "--model", str(folder),
                                "--calib", str(calib_file), "--bits", str(bits), "--group-size", str(args.group_size),
                                "--desc-act" if act == "on" else "--no-desc-act", "--out", str(out)],
                               check=True, cwd=work, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})  # it writes logs/ into cwd
                timings[out.name] = round(time.perf_counter() - start, 1)
                model, _, _ = sources.load(args.model)
                with torch.no_grad():
                    for name, weight in gptq_format.read(out).items():
                        model.get_submodule(name).weight.copy_(weight)
                result = fqcompile.evaluate(model, samples, reference=ref, progress=False)[None]
                other = fqcompile.evaluate(model, ood, reference=ref, progress=False)[None] if ood is not None else None
                rows.append(row(f"GPTQModel direct (act-order {act})", bits, bits + (16 + bits) / args.group_size,
                                result, other))
                print(f"{out.name} ({timings[out.name]} s): ppl {result['perplexity']:.3f}", flush=True)
    write(rows, run_info(args, samples, ood, ladders, calib, timings), Path(args.out))


def run_info(args, samples, ood, ladders, calib, timings) -> dict:
    return {
        "model": args.model, "dataset": args.dataset, "split": "eval", "samples": len(samples),
        "tokens": int(samples[:, 1:].numel()), "seq_len": args.seq_len, "group_size": args.group_size,
        "ladders": [list(lad) for lad in ladders], "calibration": calib, "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "export_seconds": timings, "ood_tokens": int(ood[:, 1:].numel()) if ood is not None else 0,
    }


def merge(files, out: Path):
    runs = [json.loads(f.read_text()) for f in files]
    info = dict(runs[0]["info"], runs=len(runs), export_seconds={})
    rows = [runs[0]["rows"][0]]  # full precision, the same in every run
    for run in runs:
        keys = ("model", "dataset", "samples", "seq_len", "group_size", "ood_tokens")
        if any(run["info"].get(k) != info.get(k) for k in keys):
            raise SystemExit(f"runs differ in {keys}: cannot merge")
        info["export_seconds"].update(run["info"]["export_seconds"])
        info["ladders"] = sorted({tuple(x) for x in info["ladders"] + run["info"]["ladders"]})
        rows += run["rows"][1:]
    write(rows, info, out)


def row(method, precision, bits, result, ood=None):
    out = {"method": method, "bits": bits, "perplexity": result["perplexity"], "kl": result["kl"]}
    if precision is not None:
        out["precision"] = precision
    if ood is not None:
        out.update(ood_perplexity=ood["perplexity"], ood_kl=ood["kl"])
    return out


def docstrings(folder: Path) -> Path:
    """Out-of-domain text: the docstrings (over 200 characters) of torch.nn and torch.optim, in file order."""
    root = Path(torch.__file__).parent
    docs = []
    for path in sorted((root / "nn").rglob("*.py")) + sorted((root / "optim").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "torch-docstrings.txt").write_text("\n\n".join(docs))
    return folder


def direct_row(rows, r):
    """The direct (one-rung) row of the same method and rotation at r's width, for a nested row."""
    if " nested " not in r["method"]:
        return None
    method, rotated = r["method"].split()[0], r["method"].endswith("rotated")
    name = f"{method} direct" + (" rotated" if rotated else "")
    return next((x for x in rows if x["method"] == name and x.get("precision") == r["precision"]), None)


def gap_closed(rows, fp_ppl):
    """Per (ladder, precision): the share of nested RTN's perplexity gap that nested GPTQ closes."""
    out = {}
    for r in rows:
        if r["method"].startswith("gptq nested"):
            rtn = next((x for x in rows if x["method"] == r["method"].replace("gptq", "rtn", 1)
                        and x["precision"] == r["precision"]), None)
            if rtn and rtn["perplexity"] > fp_ppl:
                key = f"{r['method'].removeprefix('gptq nested ')} {r['precision']}-bit"
                out[key] = (rtn["perplexity"] - r["perplexity"]) / (rtn["perplexity"] - fp_ppl)
    return out


def write(rows, info, out: Path, quiet: bool = False):
    fp_ppl = rows[0]["perplexity"]
    info["gap_closed"] = gap_closed(rows, fp_ppl)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    cal = info["calibration"]
    lines = [
        f"Model `{info['model']}`, {info['tokens']} held-out tokens of `{Path(info['dataset']).name}` "
        f"(eval split, {info['samples']} x {info['seq_len']}), group size {info['group_size']}; GPTQ calibrated on "
        f"{cal['samples']} x {cal['seq_len']} tokens of the calib split; {info['date']}, {info['threads']} threads.",
        "",
        "Out of domain: the eval split of torch.nn/torch.optim docstrings (`docstrings()`), "
        f"{info.get('ood_tokens', 0)} tokens. KL / direct: this slice's KL over the direct model's at the same "
        "width, method and rotation.",
        "",
        "| method | precision | bits read / weight | perplexity | vs full precision | KL vs full precision "
        "| KL / direct | out-of-domain ppl vs fp | out-of-domain KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp_ood = rows[0].get("ood_perplexity")
    for r in rows:
        direct = direct_row(rows, r)
        ratio = f"{r['kl'] / direct['kl']:.2f}x" if direct and direct["kl"] > 0 else "-"
        ood = (f"{(r['ood_perplexity'] / fp_ood - 1) * 100:+.2f}% | {r['ood_kl']:.4f}" if "ood_kl" in r else "- | -")
        lines.append(
            f"| {r['method']} | {r.get('precision', '-')} | {r['bits']:.3f} | {r['perplexity']:.3f} | "
            f"{(r['perplexity'] / fp_ppl - 1) * 100:+.2f}% | {r['kl']:.4f} | "
            f"{ratio} | {ood} |"
        )
    if info["gap_closed"]:
        lines += ["", "Share of nested RTN's perplexity gap (slice − full precision) that nested GPTQ closes:", ""]
        lines += [f"- {k}: {v * 100:.0f}%" for k, v in info["gap_closed"].items()]
    baselines = [r for r in rows if r["method"].startswith("GPTQModel")]
    ours = [r for r in rows if r["method"].startswith("gptq ")]
    if baselines:
        lines += ["", "Perplexity of our GPTQ slices / GPTQModel's direct model at the same precision:", ""]
        lines += [f"- {o['method']} {o['precision']}-bit / {b['method']}: {o['perplexity'] / b['perplexity']:.3f}"
                  for b in baselines for o in ours if o["precision"] == b["precision"]]
    lines += ["", "Export seconds: " + ", ".join(f"{k} {v}" for k, v in info["export_seconds"].items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, fp_ppl, out.with_suffix(".png"))
    if not quiet:
        print("\n".join(lines))


def plot(rows, fp_ppl, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows if "precision" in r))
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["bits"])
        style = ("s-" if "nested" in m else "o--") if not m.startswith("GPTQModel") else ("k*" if "on" in m else "kx")
        ax.plot([r["bits"] for r in pts], [r["perplexity"] for r in pts], style, label=m, ms=8 if "*" in style else 5)
    ax.axhline(fp_ppl, color="gray", lw=1, label="full precision")
    ax.set_xlabel("bits read per weight (codes + scales/zeros)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
