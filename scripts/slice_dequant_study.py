"""Why the nested grid is anchored at the lowest rung: the study behind docs/results.md.

Compares, for the 4-bit (and 3-bit) model served from 8-bit codes, on held-out text:
  * direct RTN at that precision (one model per precision: the quality target),
  * top-anchored codes (plain 8-bit RTN; the slice is the top bits) dequantized at the
    bucket centre, or with a per-group least-squares refit of scale and offset,
  * lowest-rung anchored codes (what fqcompile stores; its lowest slice equals direct RTN).
Weights are fake-quantized in a copy of the model, so every variant shares one code path.

    python scripts/slice_dequant_study.py [--samples 32]
"""

import argparse
import copy
from pathlib import Path

import torch

from fqcompile import sources
from fqcompile.calibration.data import load_samples
from fqcompile.formats.nested import quantize_rtn
from fqcompile.evaluation import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
G = 128


def values(w, ladder, bits, refit=False):
    """Dequantized b-bit slice of codes quantized for `ladder` (top-anchored when ladder=(8,))."""
    codes, scale, zero = quantize_rtn(w, G, ladder)
    g = torch.arange(w.shape[1]) // G
    top = ladder[-1]
    q = (codes.long() >> (top - bits)).float()
    if refit:  # least squares w ~ a * q + c per group (a >= 0)
        out = torch.empty_like(w)
        for start in range(0, w.shape[1], G):
            x, y = q[:, start : start + G], w[:, start : start + G]
            xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
            a = ((xc * yc).sum(1, keepdim=True) / (xc**2).sum(1, keepdim=True).clamp_min(1e-12)).clamp_min(0)
            out[:, start : start + G] = a * xc + y.mean(1, keepdim=True)
        return out
    # bucket / cell centre, in units of the stored grid (see formats/nested.py)
    cells = 2.0 ** (bits - ladder[0])
    return scale.float()[:, g] * ((q + 0.5) / cells - 0.5 - zero.float()[:, g])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "slice-dequant.md"))
    args = ap.parse_args()
    ref, tok, _ = sources.load(sources.BUILTIN_NAME)
    samples = load_samples(str(DATA), tok, split="eval", seq_len=512, max_samples=args.samples)
    linears = {n: m.weight.detach().clone() for n, m in ref.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not ref.get_output_embeddings()}
    fake = copy.deepcopy(ref)
    fp = evaluate(ref, samples, progress=False)[None]["perplexity"]
    lines = [f"SmolLM2-135M, {samples[:, 1:].numel()} held-out Austen tokens, group size {G}; "
             f"full precision perplexity {fp:.3f}.", "",
             "| bits | variant | perplexity | vs full precision | KL |", "|---|---|---|---|---|"]
    for bits in (4, 3):
        variants = [
            ("direct RTN (separate model)", dict(ladder=(bits,))),
            ("top-anchored 8-bit codes, bucket centre", dict(ladder=(8,))),
            ("top-anchored 8-bit codes, refit scale/offset", dict(ladder=(8,), refit=True)),
            (f"lowest-rung anchored [{bits}, 8] (fqcompile)", dict(ladder=(bits, 8))),
        ]
        for name, kw in variants:
            for n, w in linears.items():
                fake.get_submodule(n).weight.data = values(w, bits=bits, **kw)
            r = evaluate(fake, samples, reference=ref, progress=False)[None]
            lines.append(f"| {bits} | {name} | {r['perplexity']:.3f} | {(r['perplexity'] / fp - 1) * 100:+.1f}% "
                         f"| {r['kl']:.4f} |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
