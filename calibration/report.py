"""report.md and PNG plots of a calibration folder."""

import torch

from fqcompile.calibration import policy as pol


def write_report(out, summary, policy, dkl, shares, base, token_share, ladder, dynamic, inputs) -> None:
    """`dynamic`: the dynamic fit's (dKL, base, token share); `inputs`: estimate.record's tensors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units, edges, c = summary["units"], summary["bucket_edges"], summary["kl_correction"]
    labels = _bucket_labels(edges)

    fig, axes = plt.subplots(1, len(ladder) - 1, figsize=(4 + 3 * (len(ladder) - 1), 0.18 * len(units) + 2),
                             squeeze=False)
    for j, ax in enumerate(axes[0]):
        im = ax.imshow(torch.log10(dkl[:, j].clamp_min(1e-6)).numpy(), aspect="auto", cmap="viridis")
        ax.set_title(f"{ladder[j]}-bit: log10 mean KL")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_yticks(range(len(units)), [u.split(".")[-1] if "." in u else u for u in units], fontsize=6)
        ax.set_xlabel("entropy of previous token (nats)")
        fig.colorbar(im, ax=ax)
    axes[0][0].set_ylabel("unit")
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=110)
    plt.close(fig)

    rows = summary["validation"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter([r["predicted_kl"] for r in rows], [r["measured_kl"] for r in rows], label="dynamic")
    ax.scatter([r["static_predicted_kl"] for r in rows], [r["static_measured_kl"] for r in rows], marker="s",
               label="static mixed")
    top = max(max(r["measured_kl"], r["predicted_kl"], r["static_measured_kl"]) for r in rows) * 1.1
    ax.plot([0, top], [0, top], "k-", lw=1, label="measured = predicted")
    ax.fill_between([0, top], [0, top / 1.5], [0, top * 1.5], color="gray", alpha=0.15, label="within 1.5x")
    ax.set_xlabel("predicted mean KL (additive model)")
    ax.set_ylabel("measured mean KL (held-out, plan run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_measured.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    dyn, sta = [], []
    for lam in torch.logspace(-7, 2, 60).tolist():
        dyn.append(pol.expected(*dynamic, shares, ladder, pol.plans(dynamic[0], shares, ladder, lam)))
    for bits in torch.linspace(ladder[0], ladder[-1], 25).tolist():
        plan = pol.static_mixed(dkl, base, token_share, shares, ladder, bits).expand(len(edges) + 1, -1)
        sta.append(pol.expected(dkl, base, token_share, shares, ladder, plan))
    for points, style, name in ((dyn, "-", "dynamic (predicted)"), (sta, "--", "static mixed (predicted)")):
        points = sorted(points)
        ax.plot([p[0] for p in points], [c * p[1] for p in points], style, label=name)
    ax.plot([r["measured_bits"] for r in rows], [r["measured_kl"] for r in rows], "o", label="dynamic (measured)")
    ax.plot([r["static_avg_bits"] for r in rows], [r["static_measured_kl"] for r in rows], "s",
            label="static mixed (measured)")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per weight (codes)")
    ax.set_ylabel("mean KL vs full precision")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bits.png", dpi=110)
    plt.close(fig)

    s = summary["settings"]
    order = sorted(range(len(units)), key=lambda u: -summary["sensitivity"][u])
    lines = [
        f"# Calibration of `{s['model']}`",
        "",
        f"Ladder {s['ladder']}, unit `{s['unit']}` ({len(units)} units), group size {s['group_size']}, "
        f"dataset `{s['dataset']}`: {s['samples']} calibration and {s['eval_samples']} held-out samples of "
        f"{s['seq_len']} tokens. Measurement {summary['seconds']['measure']:.0f} s, validation "
        f"{summary['seconds']['validate']:.0f} s, total {summary['seconds']['total']:.0f} s.",
        "",
        "## Policy",
        "",
        f"Target {policy['target']}: price lam = {policy['lam']:.3g}; expected {policy['expected']['avg_bits']:.2f} "
        f"average bits, mean KL {policy['expected']['kl']:.4f} (corrected). Static mixed at the same bits: "
        f"{policy['static_mixed']['avg_bits']:.2f} bits, mean KL {policy['static_mixed']['expected_kl']:.4f}.",
        "",
        f"Signal: {policy['signal']['kind']}.",
        "",
    ]
    if "plans" in policy:
        lines += ["| entropy bucket (nats) | share of tokens | average bits | units below top |", "|---|---|---|---|"]
        for k, plan in enumerate(policy["plans"]):
            bits = sum(b * sh for b, sh in zip(plan, (u["weight_share"] for u in policy["units"])))
            lines.append(f"| {labels[k]} | {token_share[k]:.3f} | {bits:.2f} | "
                         f"{sum(b < ladder[-1] for b in plan)} / {len(plan)} |")
    else:
        lines += ["| entropy bucket (nats) | share of tokens | units switching on their input | always top | always lower |",
                  "|---|---|---|---|---|"]
        for k, (edges_k, bits_k) in enumerate(zip(policy["rules"]["edges"], policy["rules"]["bits"])):
            lines.append(f"| {labels[k]} | {token_share[k]:.3f} | {sum(bool(e) for e in edges_k)} | "
                         f"{sum(b == [ladder[-1]] for b in bits_k)} | {sum(b[-1] < ladder[-1] for b in bits_k)} |")
        lines += ["", _estimate_plot(out, policy, inputs, units, ladder)]
    lines += [
        "",
        "## Sensitivity",
        "",
        f"Split-half Spearman rank correlation of per-unit sensitivity (mean KL at {ladder[0]} bits, "
        f"calibration samples 1..n/2 vs n/2..n): **{summary['split_half_spearman']:.3f}**.",
        "",
        "Most sensitive units: " + ", ".join(f"`{units[u]}` ({summary['sensitivity'][u]:.4f})" for u in order[:8]),
        "",
        "![sensitivity](sensitivity.png)",
        "",
        "## Predicted vs measured KL (held-out text)",
        "",
        "Each plan is run token by token (position t uses the bucket of the reference entropy at t-1). "
        f"Least-squares correction factor (measured / predicted): {summary['kl_correction']:.3f}.",
        "",
        "| target bits | avg bits (predicted / measured) | predicted KL | measured KL | ratio | static-mixed bits | static predicted | static measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['target_bits']:.2f} | {r['avg_bits']:.2f} / {r['measured_bits']:.2f} | {r['predicted_kl']:.4f} | "
                     f"{r['measured_kl']:.4f} | {ratio} | {r['static_avg_bits']:.2f} | "
                     f"{r['static_predicted_kl']:.4f} | {r['static_measured_kl']:.4f} |")
    lines += ["", "![predicted vs measured](predicted_vs_measured.png)", "",
              "![accuracy vs bits](accuracy_vs_bits.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _estimate_plot(out, policy, inputs, units, ladder) -> str:
    """estimate.png (estimated vs true error energy; R^2 per unit) and its paragraph."""
    import matplotlib.pyplot as plt

    est = policy["estimate"]
    r2 = torch.tensor(est["r2"])[:, 0]
    a, c = torch.tensor(est["a"])[:, 0], torch.tensor(est["c"])[:, 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    picks = sorted(set(torch.linspace(0, len(units) - 1, 4).round().long().tolist()))
    for u in picks:
        x, e = inputs["ms"][u][:, 1:].flatten(), inputs["energy"][u, 0][:, 1:].flatten()  # as fitted
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:2000]
        left.scatter(e[keep], a[u] + c[u] * x[keep], s=3, alpha=0.4, label=f"{units[u]} (R² {float(r2[u]):.2f})")
    top = float(inputs["energy"][picks, 0][..., 1:].max())
    left.plot([0, top], [0, top], "k-", lw=1)
    left.set_xlabel(f"true ||(W{ladder[-1]} - W{ladder[0]}) x||² per weight")
    left.set_ylabel("estimate a + c ms(x)")
    left.legend(fontsize=7)
    right.bar(range(len(units)), r2.clamp_min(-0.5).numpy())
    right.set_xlabel("unit (model order)")
    right.set_ylabel(f"R² of the estimate ({ladder[0]}-bit error)")
    right.set_ylim(-0.5, 1)
    fig.tight_layout()
    fig.savefig(out / "estimate.png", dpi=110)
    plt.close(fig)
    q = torch.quantile(r2.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return (f"Error estimate a + c ms(x) of each unit's {ladder[0]}-bit error energy on its calibration inputs: "
            f"R² quartiles over {len(units)} units {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}.\n\n![estimate](estimate.png)")


def _bucket_labels(edges) -> list[str]:
    if not edges:
        return ["all"]
    middle = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges, edges[1:])]
    return [f"<{edges[0]:.2f}", *middle, f">={edges[-1]:.2f}"]
