"""Where a zero-exact rung's level sits in its cell, and what that costs: the study behind
docs/results.md#format-2 (the zero-exact grid and ladders with a middle rung).

On the zero-exact grid the b-bit level of a cell sits at offset c mod 2^(B-b) of the 2^(B-b)
master codes under it; a centred level needs about 2^(B-b-1) at every rung at once. For
each c, prints the mean signed error of every rung (in units of its own step) and its
mean squared error over direct RTN at that width, with the codes chosen as export does
(choose_codes), on the weights of --model (default: Gaussian weights); the cell-centre
grid (format 1) is the first row.

    python scripts/grid_offset_study.py --ladder 4,6,8 [--model smollm2-135m]
"""

import argparse

import torch

from fqcompile import sources
from fqcompile.formats.nested import CELL_CENTRE, ZERO_EXACT, Layout, decode_codes, quantize_rtn

G = 128


def rung_errors(w: torch.Tensor, ladder, grid, c) -> list[tuple[float, float]]:
    """Per rung: (mean signed error in steps, MSE / direct RTN's MSE at that width)."""
    layout = Layout(*w.shape, G, ladder, grid, c)
    codes, scale, zero = quantize_rtn(w, G, ladder, grid, c)
    out = []
    for b in ladder:
        err = decode_codes(codes, scale, zero, layout, b) - w
        step = (scale.float() / 2 ** (b - ladder[0])).repeat_interleave(G, 1)[:, :w.shape[1]]
        direct = quantize_rtn(w, G, (b,))
        ref = decode_codes(*direct, Layout(*w.shape, G, (b,)), b) - w
        out.append(((err / step).mean().item(), err.pow(2).mean().item() / ref.pow(2).mean().item()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ladder", default="4,6,8")
    ap.add_argument("--model", help="take the weights of this model's linears (default: Gaussian weights)")
    ap.add_argument("--layers", type=int, default=14, help="how many of the model's linears")
    args = ap.parse_args()
    ladder = tuple(int(b) for b in args.ladder.split(","))
    if args.model:
        model = sources.load(args.model)[0]
        ws = [m.weight.detach() for _, m in sources.quantizable(model)][: args.layers]
    else:
        ws = [torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))]
    print("| grid | c | " + " | ".join(f"{b}-bit bias / MSE ratio" for b in ladder) + " |")
    print("|---|---|" + "---|" * len(ladder))
    for grid, c in [(CELL_CENTRE, 0)] + [(ZERO_EXACT, c) for c in range(2 ** (ladder[-1] - ladder[0]))]:
        rows = [rung_errors(w.float(), ladder, grid, c) for w in ws]
        mean = [(sum(r[i][0] for r in rows) / len(rows), sum(r[i][1] for r in rows) / len(rows))
                for i in range(len(ladder))]
        print(f"| {grid} | {c if grid == ZERO_EXACT else '-'} | "
              + " | ".join(f"{bias:+.2f} / {ratio:.2f}" for bias, ratio in mean) + " |")


if __name__ == "__main__":
    main()
