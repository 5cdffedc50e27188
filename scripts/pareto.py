"""Accuracy vs average bits, as served, on GPTQ slices: static, static mixed, and dynamic by the
previous token's entropy, by each unit's error estimate, and by both, at the same budgets.

For each ladder: a nested GPTQ export of the built-in model (Austen `calib` text), then
`calibrate --checkpoint` on its own slices (one measurement, fitted three times: --signal
entropy, estimate and both), then every policy evaluated as served on held-out text (the
`eval` split) by evaluation.evaluate_policies (entropy plans step by step through the KV cache,
the others in teacher-forced passes that give the same numbers). Static mixed comes from the same
measurement. Also greedy samples of one prompt under several policies. Work folders are
kept (--work): a rerun resumes from the export, the measurement and each signal's rows.

    python scripts/pareto.py [--ladders 4,8 4,6,8:estimate] [--unit projection] [--out docs/pareto]

A ladder may name its own signals after a colon (4,6,8:estimate); the others take --signals.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import fqcompile
from fqcompile import sources
from fqcompile.calibrator import calibrate
from fqcompile.calibration.data import load_samples
from fqcompile.controller import Controller, resolve
from fqcompile.evaluation import evaluate_policies
from fqcompile.files import atomic_file

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "austen"
PROMPT = "Write a short story about a lighthouse keeper."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ladders", nargs="+", default=["4,8"], help="ladders, e.g. 4,8 4,6,8:estimate")
    ap.add_argument("--unit", default="projection", help="calibrate's --unit")
    ap.add_argument("--calib-samples", type=int, default=4, help="calibrate's --samples (256 tokens each)")
    ap.add_argument("--samples", type=int, default=32, help="held-out samples")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="5,5.5,6,6.5,7,7.5", help="average-bits budgets")
    ap.add_argument("--signals", default="entropy,estimate,both",
                    help="dynamic signals to evaluate (entropy ones run step by step: slower)")
    ap.add_argument("--work", default=str(HERE.parent / "out" / "pareto"), help="kept work folders")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "pareto"), help="output prefix (.md/.json/.png)")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    bits = [float(b) for b in args.bits.split(",")]
    ref, tok, _ = sources.load(sources.BUILTIN_NAME)
    data = load_samples(str(DATA), tok, split="eval", seq_len=args.seq_len, max_samples=args.samples)
    fp = fqcompile.evaluate(ref, data, progress=False)[None]["perplexity"]
    results = {}
    for spec in args.ladders:
        ladder_text, _, own = spec.partition(":")
        ladder = tuple(int(b) for b in ladder_text.split(","))
        work = Path(args.work) / f"{args.unit}-{'-'.join(map(str, ladder))}"
        results[ladder_text] = frontier(ladder, work, args, (own or args.signals).split(","), bits, ref, data)
        print(f"ladder {ladder_text}: {(time.perf_counter() - start) / 60:.1f} min so far", flush=True)
        write(Path(args.out), results, fp, data, bits, args, time.perf_counter() - start)  # after each ladder


def frontier(ladder, work, args, signals, bits, ref, data) -> dict:
    clock = {}
    mark = time.perf_counter()
    ckpt = work / "ckpt"
    if not (ckpt / "fqcompile.json").is_file():  # the manifest: an export that finished
        fqcompile.export(sources.BUILTIN_NAME, ckpt, ladder=ladder, dataset=str(DATA), force=True, progress=False)
    clock["export"] = time.perf_counter() - mark
    policies = {}
    for signal in signals:  # one measurement folder: the later fits reuse it
        mark = time.perf_counter()
        policies[signal] = calibrate(None, work / "calibration", checkpoint=ckpt, dataset=str(DATA), signal=signal,
                                     samples=args.calib_samples, eval_samples=8, unit=args.unit, progress=False)
        clock[f"calibrate {signal}"] = time.perf_counter() - mark
    loaded = fqcompile.load(ckpt)
    # Rows are kept in the work folder after each signal's evaluation (an entropy signal's
    # takes a quarter of an hour): a rerun with the same settings evaluates only what is missing.
    saved_file, setup = work / "rows.json", {"samples": args.samples, "seq_len": args.seq_len, "unit": args.unit,
                                              "calib_samples": args.calib_samples}
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    rows = saved["rows"] if saved.get("setup") == setup else {}
    mark = time.perf_counter()
    specs = [f"static:{b}" for b in ladder] + [f"static-mixed:{b:g}" for b in bits]
    for signal in signals:
        loaded.policy = policies[signal]
        label = {spec: spec if not spec.startswith("dynamic") else f"{signal} {spec}"
                 for spec in specs + [f"dynamic:{b:g}" for b in bits]}
        missing = [spec for spec, name in label.items() if name not in rows]
        if missing:
            found = evaluate_policies(loaded, data, missing, reference=ref, batch_size=8, progress=False)
            rows.update({label[k]: row for k, row in found.items()})
            with atomic_file(saved_file) as tmp:
                tmp.write_text(json.dumps({"setup": setup, "rows": rows}))
        specs = []  # static plans once
    clock["evaluate (this run)"] = time.perf_counter() - mark
    samples = {}
    first = signals[0]
    for signal, spec in ((first, f"static:{ladder[-1]}"), *((s, "dynamic:6") for s in signals),
                         (first, f"static:{ladder[0]}")):
        loaded.policy = policies[signal]
        controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, spec))
        r = fqcompile.generate(loaded, PROMPT, max_new_tokens=60, chat=True, controller=controller)
        controller.close()
        samples[spec if spec.startswith("static") else f"{signal} {spec}"] = {"text": r["text"], **r["controller"]}
    return {"rows": rows, "samples": samples, "seconds": clock}


def interpolate(points, x):
    """Piecewise-linear y at x through (x, y) points (clamped at the ends)."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def write(out: Path, results, fp, data, bits, args, seconds):
    tokens = int(data.shape[0] * (data.shape[1] - 1))
    lines = [
        f"SmolLM2-135M, nested GPTQ (Austen `calib` text), group 128; policies fitted by `calibrate --checkpoint` on "
        f"the checkpoint's own slices ({args.calib_samples} x 256 calibration tokens, unit `{args.unit}`); "
        f"{tokens} held-out tokens (`eval` split, {data.shape[0]} x {data.shape[1]}), evaluated as served. "
        f"Full-precision perplexity {fp:.3f}. {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min for the whole "
        f"script. Command: `python scripts/pareto.py --ladders {' '.join(args.ladders)} --unit {args.unit} "
        f"--calib-samples {args.calib_samples} --bits {args.bits} --signals {args.signals}`.",
        "",
    ]
    for ladder, res in results.items():
        rows = res["rows"]
        top = rows[f"static:{ladder.split(',')[-1]}"]
        mixed = [(r["avg_bits_read"], r["kl"]) for k, r in rows.items() if k.startswith("static-mixed")]
        lines += [f"## Ladder [{ladder}]", "",
                  "Stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()) + ".", "",
                  "| policy | bits read / weight | perplexity | vs static top | KL | KL / static mixed at equal bits |",
                  "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            ratio = r["kl"] / interpolate(mixed, r["avg_bits_read"]) if not name.startswith("static") else None
            lines.append(f"| {name} | {r['avg_bits_read']:.3f} | {r['perplexity']:.3f} | "
                         f"{(r['perplexity'] / top['perplexity'] - 1) * 100:+.2f}% | {r['kl']:.4f} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}'} |")
        lines += ["", "Greedy samples (chat prompt: \"" + PROMPT + "\"):", ""]
        for spec, s in res["samples"].items():
            lines += [f"**{spec}** ({s['avg_bits_read']:.2f} bits read per weight):", "",
                      "> " + s["text"].strip().replace("\n", " "), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"results": results, "fp_perplexity": fp}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (ladder, res) in zip(axes[0], results.items()):
        rows = res["rows"]
        for prefix, style, name in (("static-mixed:", "s--", "static mixed"), ("entropy dynamic:", "o-", "entropy"),
                                    ("estimate dynamic:", "^-", "error estimate"), ("both dynamic:", "d-", "both")):
            pts = sorted((r["avg_bits_read"], r["kl"]) for k, r in rows.items() if k.startswith(prefix))
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        for k, r in rows.items():
            if k.startswith("static:"):
                ax.plot(r["avg_bits_read"], r["kl"], "k^")
                ax.annotate(k, (r["avg_bits_read"], r["kl"]), textcoords="offset points", xytext=(5, 5))
        ax.set_yscale("log")
        ax.set_title(f"ladder [{ladder}], GPTQ slices")
        ax.set_xlabel("average bits read per weight (as served)")
        ax.set_ylabel("mean KL vs full precision (held-out)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
