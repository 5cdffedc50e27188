"""Quality of nested slices vs models quantized directly at each precision, in one run.

Exports the nested checkpoint and one direct (single-precision) checkpoint per ladder
width through the product path, evaluates all of them against the full-precision model
on the same held-out samples, and writes a markdown table, a JSON file and a PNG plot.

    python scripts/quality_table.py --ladder 4,8 --out docs/quality
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import fqcompile
from fqcompile import models
from fqcompile.calibration.data import load_samples
from fqcompile.formats.checkpoint import precision_stats
from fqcompile.metrics import FULL

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "austen"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.BUILTIN_NAME)
    ap.add_argument("--dataset", default=str(DEFAULT_DATA))
    ap.add_argument("--ladder", default="4,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=32, help="evaluation samples (of --seq-len tokens)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "quality"), help="output prefix (.md/.json/.png)")
    args = ap.parse_args()
    torch.manual_seed(0)
    ladder = [int(b) for b in args.ladder.split(",")]

    ref, tok, _ = models.load(args.model)
    samples = load_samples(args.dataset, tok, split="eval", seq_len=args.seq_len, max_samples=args.samples)
    rows, timings = [], {}
    with tempfile.TemporaryDirectory() as work:
        runs = [("nested", ladder)] + [("direct", [b]) for b in ladder]
        for method, rungs in runs:
            folder = Path(work) / f"{method}-{'-'.join(map(str, rungs))}"
            start = time.perf_counter()
            fqcompile.export(args.model, folder, ladder=rungs, group_size=args.group_size, progress=False)
            timings[folder.name] = time.perf_counter() - start
            loaded = fqcompile.load(folder)
            result = fqcompile.evaluate(loaded.model, samples, precisions=rungs, reference=ref, progress=False)
            if not rows:
                fp = result[FULL]
                rows.append({"method": "full precision", "bits": 32.0, "perplexity": fp["perplexity"], "kl": 0.0})
            for b in rungs:
                r = result[b]
                rows.append({
                    "method": f"{method} {rungs}",
                    "precision": b,
                    "bits": precision_stats(loaded.manifest)[b]["bits_per_weight"],
                    "perplexity": r["perplexity"],
                    "kl": r["kl"],
                })
            print(f"{method} {rungs}: " + ", ".join(f"{b}-bit ppl {result[b]['perplexity']:.3f}" for b in rungs))
    fp_ppl = rows[0]["perplexity"]
    info = {
        "model": args.model, "dataset": args.dataset, "split": "eval", "samples": len(samples),
        "tokens": int(samples[:, 1:].numel()), "seq_len": args.seq_len, "group_size": args.group_size,
        "ladder": ladder, "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "export_seconds": timings,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Model `{args.model}`, {info['tokens']} held-out tokens of `{Path(args.dataset).name}` "
        f"(eval split, {len(samples)} x {args.seq_len}), group size {args.group_size}, {info['date']}.",
        "",
        "| method | precision | bits read / weight | perplexity | vs full precision | KL vs full precision |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('precision', '-')} | {r['bits']:.3f} | {r['perplexity']:.3f} | "
            f"{(r['perplexity'] / fp_ppl - 1) * 100:+.2f}% | {r['kl']:.4f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, fp_ppl, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows, fp_ppl, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows if "precision" in r}, key=lambda m: (not m.startswith("nested"), m))
    direct = [r for r in rows if r["method"].startswith("direct")]
    ax.plot([r["bits"] for r in direct], [r["perplexity"] for r in direct], "o--", label="direct RTN (one model per precision)")
    for m in methods:
        if m.startswith("nested"):
            pts = [r for r in rows if r["method"] == m]
            ax.plot([r["bits"] for r in pts], [r["perplexity"] for r in pts], "s-", label=f"{m} (one checkpoint)")
    ax.axhline(fp_ppl, color="gray", lw=1, label="full precision")
    ax.set_xlabel("bits read per weight (codes + scales/zeros)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
