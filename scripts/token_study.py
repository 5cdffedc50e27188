"""Where a per-token switching signal could still gain, on a checkpoint's own slices (offline study).

    python scripts/token_study.py CHECKPOINT [--samples 8] [--out docs/token-study]

Issue "a switching signal that beats static mixed precision" asks dynamic plans for a KL at
most 0.80x static mixed's at equal bits. Two questions, on a nested [4, 8] checkpoint (the
default GPTQ export of the built-in model), teacher forced on held-out Austen text:

- Whole tokens: how concentrated is the all-4-bit model's KL over tokens, and what does
  running the top share of tokens at 8 bits (every layer) give, when the tokens are chosen
  by their true 4-bit KL (an oracle no runtime has), by the 4-bit output's own entropy (a
  second pass), by the previous token's entropy (the shipped entropy signal), or by the
  residual stream's size at one layer (causal, mid-forward).
- Units: how well each projection unit's 4-bit error ||(W8 - W4) x||^2 is predicted by a fit
  a + c * mean(x^2) (the shipped estimator) against a + c * mean(w * x^2), w the column
  energy of W8 - W4 (GPTQ moves error into columns with small inputs, which a plain mean
  square cannot see). Fitted on `calib` windows, R^2 on `eval` windows, position 0 excluded.

Writes OUT.md and OUT.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fqcompile
from fqcompile import sources
from fqcompile.calibration.data import load_samples
from fqcompile.calibration.divergence import entropy, kl_per_token, log_probs
from fqcompile.calibration.sensitivity import units_of
from fqcompile.flex_linear import set_precisions
from fqcompile.formats.checkpoint import precision_stats
from fqcompile.loader import dense_weights, flex_layers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "austen"


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a nested [4, 8] checkpoint folder")
    ap.add_argument("--samples", type=int, default=8, help="eval windows of 512 tokens")
    ap.add_argument("--out", default=str(ROOT / "docs" / "token-study"))
    args = ap.parse_args()
    start = time.perf_counter()
    ref, tok, _ = sources.load(sources.BUILTIN_NAME)
    data = load_samples(str(DATA), tok, split="eval", seq_len=512, max_samples=args.samples)
    refs = torch.cat([log_probs(ref(b[None]).logits) for b in data])  # [B, T-1, V]
    loaded = fqcompile.load(args.checkpoint)
    model, layers = loaded.model, flex_layers(loaded.model)
    bits_read = {b: s["bits_per_weight"] for b, s in precision_stats(loaded.manifest).items()}
    with dense_weights(model):
        def run(bits, hidden=False):  # bits: one precision, or [B, T] per position
            lps, states = [], []
            for i, b in enumerate(data):
                set_precisions(layers, bits if isinstance(bits, int) else bits[i : i + 1])
                out = model(b[None], output_hidden_states=hidden)
                lps.append(log_probs(out.logits))
                if hidden:
                    states.append(torch.stack([h[0, :-1] for h in out.hidden_states]))  # [L+1, T-1, D]
            return torch.cat(lps), torch.stack(states) if hidden else None

        lp8, hidden = run(8, hidden=True)
        lp4, _ = run(4)
        kl4 = kl_per_token(refs, lp4)[:, 1:]  # position 0 runs at the prefill precision
        sorted_kl = kl4.flatten().sort(descending=True).values
        cum = sorted_kl.cumsum(0) / sorted_kl.sum()
        concentration = {s: float(cum[int(s * len(cum)) - 1]) for s in (0.1, 0.25, 0.5)}
        ent8, ent4 = entropy(lp8), entropy(lp4)
        features = {"true 4-bit KL (oracle)": kl4, "own 4-bit entropy (second pass)": ent4[:, 1:],
                    "previous token's entropy": ent8[:, :-1]}
        for layer in range(1, hidden.shape[1], 4):
            features[f"residual rms, layer {layer}"] = hidden[:, layer, 1:].pow(2).mean(-1).sqrt()
        rho = {name: spearman(f.flatten(), kl4.flatten()) for name, f in features.items()}
        best = max((n for n in features if n.startswith("residual")), key=lambda n: abs(rho[n]))
        rows = []
        for share in (0.25, 0.5, 0.75):
            for name in ["true 4-bit KL (oracle)", "own 4-bit entropy (second pass)", "previous token's entropy", best]:
                f = features[name] * (1 if rho[name] >= 0 else -1)
                bits = torch.full(data.shape, 4, dtype=torch.long)
                bits[:, 0] = 8
                bits[:, 1 : kl4.shape[1] + 1][f >= f.flatten().quantile(1 - share)] = 8
                lp, _ = run(bits)
                rows.append({"share_8": share, "bits_read": bits_read[4] + share * (bits_read[8] - bits_read[4]),
                             "chosen_by": name, "kl": float(kl_per_token(refs, lp)[:, 1:].mean())})
                print(rows[-1], flush=True)
        r2 = unit_r2(model, tok)
    result = {"kl4": float(kl4.mean()), "kl8": float(kl_per_token(refs, lp8)[:, 1:].mean()),
              "concentration": concentration, "spearman": rho, "rows": rows, "r2": r2}
    write(Path(args.out), result, args, data, time.perf_counter() - start)


def spearman(a, b) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def unit_r2(model, tok) -> dict:
    """R^2 on eval windows of the two fits of each projection unit's 4-bit error energy."""
    names = [n for n, mod in model.named_modules() if mod in set(flex_layers(model)) and ".layers." in n]
    units = units_of(model, names, "projection")
    inputs = {}
    hooks = [model.get_submodule(u.modules[0]).register_forward_pre_hook(
        lambda _m, a, i=i: inputs.setdefault(i, []).append(a[0][0, 1:].double())) for i, u in enumerate(units)]
    split_inputs = {}
    try:
        for split in ("calib", "eval"):
            inputs.clear()
            for b in load_samples(str(DATA), tok, split=split, seq_len=256, max_samples=4):
                model(b[None])
            split_inputs[split] = {i: torch.cat(v) for i, v in inputs.items()}
    finally:
        for h in hooks:
            h.remove()
    r2 = {"mean square": [], "column-weighted mean square": []}
    for i, u in enumerate(units):
        delta = [(model.get_submodule(n).dense[8] - model.get_submodule(n).dense[4]).double() for n in u.modules]
        w = sum(d.pow(2).sum(0) for d in delta)
        w = w / w.mean()
        fits = {"mean square": lambda x: x.pow(2).mean(-1),
                "column-weighted mean square": lambda x: (x.pow(2) * w).mean(-1)}
        fit_x, test_x = split_inputs["calib"][i], split_inputs["eval"][i]
        fit_e, test_e = (sum((x @ d.T).pow(2).sum(-1) for d in delta) for x in (fit_x, test_x))
        for kind, feature in fits.items():
            f = feature(fit_x)
            a, c = torch.linalg.lstsq(torch.stack([torch.ones_like(f), f], 1), fit_e[:, None]).solution[:, 0]
            guess = a + c * feature(test_x)
            r2[kind].append(float(1 - (test_e - guess).pow(2).sum() / (test_e - test_e.mean()).pow(2).sum()))
    return r2


def write(out: Path, result, args, data, seconds):
    def q(v):
        v = sorted(v)
        return " / ".join(f"{v[len(v) * k // 4]:.2f}" for k in (1, 2, 3))

    c = result["concentration"]
    lines = ["# Where a per-token switching signal could still gain (offline study)", "",
             f"Built-in SmolLM2-135M, the nested [4, 8] checkpoint `{args.checkpoint}`; {data.shape[0]} x "
             f"{data.shape[1]} held-out `eval` tokens of ../shared/data/austen, teacher forced, position 0 at 8 "
             f"bits. {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min. Command: `python scripts/token_study.py "
             f"{' '.join(sys.argv[1:])}`.", "",
             f"All-4-bit KL {result['kl4']:.4f}, all-8-bit {result['kl8']:.4f}. The top 10% / 25% / 50% of tokens "
             f"carry {c[0.1]:.0%} / {c[0.25]:.0%} / {c[0.5]:.0%} of the 4-bit KL.", "",
             "Whole tokens at 8 bits (every layer), the rest at 4, chosen by:", "",
             "| share at 8 bits | bits read | chosen by | Spearman with the true 4-bit KL | KL |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['share_8']:.2f} | {r['bits_read']:.2f} | {r['chosen_by']} | "
                     f"{result['spearman'][r['chosen_by']]:+.2f} | {r['kl']:.4f} |")
    lines += ["", "Spearman correlation of every feature with the true 4-bit KL per token: " +
              ", ".join(f"{k} {v:+.2f}" for k, v in result["spearman"].items()) + ".", "",
              f"Per projection unit, R² on held-out tokens of the fits of its 4-bit error energy (quartiles over "
              f"{len(result['r2']['mean square'])} units; 4 x 256 `calib` tokens to fit, 4 x 256 `eval` to test): " +
              "; ".join(f"a + c·{k} {q(v)}" for k, v in result["r2"].items()) + ".", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".md").write_text("\n".join(lines))
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
