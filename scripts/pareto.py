"""Accuracy vs average bits, as served, for static, static-mixed and dynamic policies: one run.

Calibrates the built-in model on the Austen `calib` split (resumable folder, reused when
present), exports it with the fitted policy, and evaluates every policy on held-out text
(the `eval` split) "as served": each position under the plan chosen from the previous
position's distribution, KV cache built the same way. Writes a markdown table, a JSON
file and a PNG plot.

    python scripts/pareto.py --out docs/pareto
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import fqcompile
from fqcompile import sources
from fqcompile.calibrator import calibrate
from fqcompile.calibration.data import load_samples
from fqcompile.evaluation import evaluate_policies

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "austen"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", default=str(HERE.parent / "out" / "calib-austen"), help="calibration folder")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="5,5.5,6,6.5,7,7.5", help="average-bits points for dynamic and static-mixed")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "pareto"), help="output prefix (.md/.json/.png)")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    calibrate(sources.BUILTIN_NAME, args.calib, dataset=str(DATA), progress=False)
    with tempfile.TemporaryDirectory() as work:
        ckpt = fqcompile.export(sources.BUILTIN_NAME, Path(work) / "ckpt", calib=args.calib, progress=False)
        loaded = fqcompile.load(ckpt)
        ref = sources.load(sources.BUILTIN_NAME)[0]
        data = load_samples(str(DATA), loaded.tokenizer, split="eval", seq_len=args.seq_len, max_samples=args.samples)
        bits = [float(b) for b in args.bits.split(",")]
        specs = ["static:8", "static:4"] + [f"static-mixed:{b:g}" for b in bits] + [f"dynamic:{b:g}" for b in bits]
        rows = evaluate_policies(loaded, data, specs, reference=ref, batch_size=args.samples, progress=False)
        samples = {}
        prompt = "Write a short story about a lighthouse keeper."
        for spec in ("static:8", "dynamic:6", "static:4"):
            from fqcompile.controller import Controller, resolve

            controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, spec))
            r = fqcompile.generate(loaded, prompt, max_new_tokens=60, chat=True, controller=controller)
            controller.close()
            samples[spec] = {"text": r["text"], **r["controller"]}
    fp = fqcompile.evaluate(ref, data, progress=False)[None]["perplexity"]
    write(Path(args.out), rows, fp, samples, data, bits, time.perf_counter() - start)


def write(out: Path, rows, fp, samples, data, bits, seconds):
    tokens = int(data.shape[0] * (data.shape[1] - 1))
    lines = [
        f"SmolLM2-135M, nested RTN [4, 8], group 128, calibrated on the Austen `calib` split; {tokens} held-out "
        f"tokens (`eval` split, {data.shape[0]} x {data.shape[1]}), evaluated as served. Full-precision perplexity "
        f"{fp:.3f}. {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min for the whole script.",
        "",
        "| policy | bits read / weight | perplexity | vs full precision | KL | tokens at 4 / 8 bits | controller overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        overhead = r.get("controller_seconds", 0) / r["seconds"] if r.get("seconds") else 0.0
        lines.append(f"| {r['policy']} | {r['avg_bits_read']:.3f} | {r['perplexity']:.3f} | "
                     f"{(r['perplexity'] / fp - 1) * 100:+.2f}% | {r['kl']:.4f} | "
                     f"{r['share']['4']:.0%} / {r['share']['8']:.0%} | {overhead:.2%} |")
    lines += ["", "Dynamic vs static mixed at each target (perplexity, as served):", ""]
    for b in bits:
        d, s = rows[f"dynamic:{b:g}"], rows[f"static-mixed:{b:g}"]
        verdict = "dynamic better" if d["perplexity"] <= s["perplexity"] else "STATIC MIXED BETTER"
        lines.append(f"- {b:g} bits: dynamic {d['perplexity']:.3f} at {d['avg_bits_read']:.2f} bits read, static mixed "
                     f"{s['perplexity']:.3f} at {s['avg_bits_read']:.2f}: {verdict}")
    lines += ["", "Greedy samples (chat prompt: \"Write a short story about a lighthouse keeper.\"):", ""]
    for spec, s in samples.items():
        lines += [f"**{spec}** ({s['avg_bits_read']:.2f} bits read per weight):", "", "> " + s["text"].strip().replace("\n", " "), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "fp_perplexity": fp, "samples": samples}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, style, name in (("dynamic:", "o-", "dynamic"), ("static-mixed:", "s--", "static mixed")):
        pts = sorted((r["avg_bits_read"], r["perplexity"]) for k, r in rows.items() if k.startswith(prefix))
        ax.plot(*zip(*pts), style, label=name)
    for k in ("static:4", "static:8"):
        ax.plot(rows[k]["avg_bits_read"], rows[k]["perplexity"], "k^")
        ax.annotate(k, (rows[k]["avg_bits_read"], rows[k]["perplexity"]), textcoords="offset points", xytext=(5, 5))
    ax.axhline(fp, color="gray", lw=1, label="full precision")
    ax.set_xlabel("average bits read per weight (as served)")
    ax.set_ylabel("perplexity (held-out)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
