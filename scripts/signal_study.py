"""What choosing each layer's precision per token, from its own error, gains over static mixed precision.

    python scripts/signal_study.py [--samples 8] [--calib-samples 4] [--sketch-rows 64] [--sensitivity]

Issue "a switching signal that beats static mixed precision" asks dynamic plans for a KL at
most 0.80x static mixed's at equal bits, from DP-LLM-style per-layer error estimates. Before
building estimators into every engine, this measures offline, on the built-in model (RTN
[4, 8] slices, group 128, teacher forcing on Austen text), what that choice gives:

- static: each layer at 8 or 4 bits for every token; layers ranked by value per weight read
  and raised to 8 bits until the budget is spent;
- dynamic: layer l runs token t at 8 bits when its value per weight read exceeds one global
  threshold, set on the calibration windows for the budget. The token's error is the true
  ||(W8 - W4) x_t||^2 (oracle), a k-row random sketch ||S (W8 - W4) x_t||^2, or a per-layer
  fit c_l ||x_t||^2 (DP-LLM's two estimators).

A layer's value is its error energy (weighting "energy"), or with --sensitivity that energy
times the layer's measured KL cost per unit of energy (each layer alone at 4 bits on the
calibration windows: weighting "sensitivity", whose static plan is the usual sensitivity
ranking). Static and dynamic rank by the same value, so the dynamic rows show what choosing
per token adds. Thresholds, fits and costs come from the `calib` split, KL and bits from the
`eval` split (every decision made in the quantized forward itself, on the inputs earlier
decisions produced). Writes OUT.md and OUT.json (docs/signal-study by default).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fqcompile import sources
from fqcompile.calibration.data import load_samples
from fqcompile.calibration.divergence import kl_per_token, log_probs
from fqcompile.calibration.sensitivity import rtn_slices

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "austen"


class Switch:
    """Replaces each linear's forward: both slices on the current input, then per token the one a rule picks."""

    def __init__(self, model, group_size, sketch_rows, seed=0):
        self.layers = sources.quantizable(model)
        slice_of = rtn_slices(model, group_size, (4, 8))
        gen = torch.Generator().manual_seed(seed)
        self.w = {}
        for name, lin in self.layers:
            lo, hi = slice_of(name, 4), slice_of(name, 8)
            sketch = torch.randn(sketch_rows, lin.out_features, generator=gen) / sketch_rows ** 0.5
            self.w[name] = (lo, hi, sketch @ (hi - lo), lin.bias, lin.in_features * lin.out_features)
            lin.forward = self._forward(name)
        self.total = sum(v[4] for v in self.w.values())
        self.rule, self.scores, self.count = None, None, {}

    def _forward(self, name):
        def forward(x):
            lo, hi, sk, bias, n = self.w[name]
            y_lo, y_hi = F.linear(x, lo, bias), F.linear(x, hi, bias)
            if self.rule is None:  # recording: all at 8 bits, every score kept
                err = (y_hi - y_lo).pow(2).sum(-1)
                self.scores.setdefault(name, []).append((err.flatten() / n, (x @ sk.T).pow(2).sum(-1).flatten() / n,
                                                         x.pow(2).sum(-1).flatten() / n))
                return y_hi
            high = self.rule(name, x, y_hi - y_lo, n)  # [..., tokens] bool
            self.count[name] = self.count.get(name, 0) + int(high.sum())
            return torch.where(high[..., None], y_hi, y_lo)

        return forward

    def bits(self, tokens):
        return 4 + 4 * sum(self.count.get(name, 0) * v[4] for name, v in self.w.items()) / (tokens * self.total)


def threshold(values, weights, share):
    """The score above which `share` of all the weight lies."""
    order = values.argsort(descending=True)
    cum = weights[order].cumsum(0) / weights.sum()
    return float(values[order][min(int((cum < share).sum()), len(order) - 1)])


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8, help="eval windows of --seq-len tokens")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sketch-rows", type=int, default=16)
    ap.add_argument("--bits", default="5,6,7")
    ap.add_argument("--sensitivity", action="store_true",
                    help="also weight each layer's error energy by its measured KL cost (210 more passes)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "signal-study"))
    args = ap.parse_args()
    start = time.perf_counter()
    model, tok, _ = sources.load(sources.BUILTIN_NAME)
    calib = load_samples(str(DATA), tok, "calib", args.seq_len, args.calib_samples)
    data = load_samples(str(DATA), tok, "eval", args.seq_len, args.samples)
    ref = [log_probs(model(batch[None]).logits) for batch in data]
    ref_calib = [log_probs(model(batch[None]).logits) for batch in calib]
    switch = Switch(model, 128, args.sketch_rows)
    switch.scores = {}
    for batch in calib:  # record the scores at 8 bits
        model(batch[None])
    names = [name for name, _ in switch.layers]
    per = {name: [torch.cat(t) for t in zip(*switch.scores[name])] for name in names}  # err, sketch, norm
    fits = {name: float((e * s).sum() / (s * s).sum()) for name, (e, _, s) in per.items()}  # err ~ c ||x||^2
    r2 = {kind: [] for kind in ("sketch", "norm")}
    for name, (e, sk, s) in per.items():
        for kind, guess in (("sketch", sk), ("norm", fits[name] * s)):
            r2[kind].append(float(1 - (e - guess).pow(2).sum() / (e - e.mean()).pow(2).sum()))
    n = {name: switch.w[name][4] for name in names}
    tokens = per[names[0]][0].numel()
    gains = {"energy": dict.fromkeys(names, 1.0)}
    if args.sensitivity:  # each layer alone at 4 bits: its KL cost, per unit of its mean error energy
        base = served_kl(model, switch, lambda name, x, d, w: torch.ones(x.shape[:-1], dtype=torch.bool), calib,
                         ref_calib)
        gains["sensitivity"] = {}
        for name in names:
            cost = served_kl(model, switch, lambda nm, x, d, w, t=name: torch.full(x.shape[:-1], nm != t), calib,
                             ref_calib) - base
            gains["sensitivity"][name] = max(cost, 0.0) / (float(per[name][0].mean()) * n[name])
    rows = []
    for mode, gain in gains.items():
        for b in [float(x) for x in args.bits.split(",")]:
            rules = budget_rules(switch, names, per, fits, gain, n, tokens, (b - 4) / 4)
            for kind, rule in rules.items():
                kl = served_kl(model, switch, rule, data, ref)
                rows.append({"target_bits": b, "weighting": mode, "rule": kind, "bits": switch.bits(data.numel()),
                             "kl": kl})
                print(rows[-1], flush=True)
    write(Path(args.out), rows, r2, args, data, time.perf_counter() - start)


def served_kl(model, switch, rule, batches, refs) -> float:
    """Mean KL per predicted token of the model run under `rule` (each window alone)."""
    switch.rule, switch.count = rule, {}
    kl = sum(float(kl_per_token(r, log_probs(model(batch[None]).logits)).sum()) for r, batch in zip(refs, batches))
    switch.rule = None
    return kl / (batches.numel() - len(batches))


def budget_rules(switch, names, per, fits, gain, n, tokens, share) -> dict:
    """static and the three per-token rules for one budget: `share` of the weights read at 8 bits.

    Every score is a layer's error energy per weight read, times the layer's `gain`."""
    static_value = sorted(names, key=lambda name: -gain[name] * float(per[name][0].mean()))
    high, spent, total = set(), 0.0, sum(n.values())
    for name in static_value:
        if spent >= share * total:
            break
        high.add(name)
        spent += n[name]
    rules = {"static": lambda name, x, d, w: torch.full(x.shape[:-1], name in high)}
    weights = torch.tensor([n[name] for name in names], dtype=torch.float64).repeat_interleave(tokens)
    for kind, col in (("oracle", 0), ("sketch", 1), ("norm", 2)):
        vals = torch.cat([per[name][col] * gain[name] * (fits[name] if kind == "norm" else 1) for name in names])
        tau = threshold(vals.double(), weights, share)
        if kind == "oracle":
            rules[kind] = lambda name, x, d, w, t=tau: gain[name] * d.pow(2).sum(-1) / w > t
        elif kind == "sketch":
            rules[kind] = lambda name, x, d, w, t=tau: gain[name] * (x @ switch.w[name][2].T).pow(2).sum(-1) / w > t
        else:
            rules[kind] = lambda name, x, d, w, t=tau: gain[name] * fits[name] * x.pow(2).sum(-1) / w > t
    return rules


def write(out, rows, r2, args, data, seconds):
    def q(v):
        v = sorted(v)
        return f"{v[len(v) // 4]:.2f} / {v[len(v) // 2]:.2f} / {v[3 * len(v) // 4]:.2f}"

    lines = ["# Per-token precision from each layer's own error vs static mixed precision (offline study)", "",
             f"Built-in SmolLM2-135M, RTN [4, 8] slices, group 128; thresholds and fits on {args.calib_samples} x "
             f"{args.seq_len} `calib` tokens, KL against full precision on {data.shape[0]} x {data.shape[1]} `eval` "
             f"tokens of ../shared/data/austen, teacher forced. {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min. "
             f"Command: `python scripts/signal_study.py {' '.join(sys.argv[1:])}`.",
             "", "| weighting | target bits | rule | bits read | KL | KL / static |", "|---|---|---|---|---|---|"]
    static = {(r["weighting"], r["target_bits"]): r["kl"] for r in rows if r["rule"] == "static"}
    for r in rows:
        lines.append(f"| {r['weighting']} | {r['target_bits']:g} | {r['rule']} | {r['bits']:.2f} | {r['kl']:.4f} | "
                     f"{r['kl'] / static[r['weighting'], r['target_bits']]:.2f} |")
    lines += ["", f"Per-layer R² of the estimates of ||(W8 - W4) x||² on the calibration tokens (quartiles over "
              f"{len(r2['norm'])} layers): {args.sketch_rows}-row sketch {q(r2['sketch'])}; c·||x||² {q(r2['norm'])}.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".md").write_text("\n".join(lines))
    out.with_name(out.name + ".json").write_text(json.dumps({"rows": rows, "r2": r2}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
