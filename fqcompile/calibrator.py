"""`fqcompile calibrate`: measure sensitivity, fit the switching policy, validate, report.

The folder is resumable: calibration.json (the settings that define the measurement) is
written first, per-unit results as they finish. A rerun with the same settings skips
what is measured; the fit settings (target, signal, buckets, smoothing) may change between
runs, so a new target or signal is a quick refit. Different measurement settings are refused.

The slices measured are RTN's on the grid the export will write, or, with `checkpoint`,
the slices an existing checkpoint serves (GPTQ's, rotated or not): the policy is then
fitted to the weights that run, and goes into that checkpoint.
"""

import json
import math
import time
from pathlib import Path

import torch

from . import sources
from .calibration import estimate
from .calibration import sensitivity as m
from .calibration import policy as pol
from .calibration.data import load_samples
from .calibration.report import write_report
from .calibration.rotation import rotate
from .calibration.validate import run_plans
from .errors import FqError
from .files import write_json
from .formats import checkpoint as ckpt
from .formats.checkpoint import sha256
from .sources import quantizable
from .formats.nested import CELL_CENTRE, check_grid, check_ladder

SETTINGS = "calibration.json"
POLICY = "policy.json"
UNIT_KINDS = ("block", "projection", "linear")
SIGNALS = {"entropy": "previous-token-entropy", "estimate": "error-estimate",
           "both": "previous-token-entropy+error-estimate"}


def fingerprint(folder: Path) -> str:
    """Identity of a model: the SHA-256 of its config.json."""
    return sha256(Path(folder) / "config.json")


def _check_folder(out: Path, settings: dict) -> None:
    """Refuse a folder that holds anything but a calibration with these settings."""
    if out.exists() and not out.is_dir():
        raise FqError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        path = out / SETTINGS
        if not path.is_file():
            raise FqError(f"{out} is not empty and holds no {SETTINGS}: refusing to write into it")
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            raise FqError(f"{path} is corrupted") from None
        diff = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
        if diff:
            raise FqError(f"{out} holds a calibration with other settings ({', '.join(diff)}): "
                          f"use another folder or delete it")


def calibrate(
    model: str | None,
    out,
    dataset: str = "self",
    ladder=(4, 8),
    unit: str = "projection",
    target_bits: float | None = None,
    max_ppl_increase: float | None = None,
    samples: int = 4,
    eval_samples: int = 8,
    seq_len: int = 256,
    group_size: int = 128,
    buckets: int = 8,
    smoothing: float = 0.0,
    signal: str = "estimate",
    batch_size: int = 4,
    seed: int = 0,
    grid: str = CELL_CENTRE,
    checkpoint=None,
    progress: bool = True,
) -> dict:
    """Calibrate `model` into folder `out`; returns the fitted policy (also in out/policy.json).

    The slices measured are RTN's on `grid`, the nested grid the export will write. With
    `checkpoint` (a checkpoint folder), they are that checkpoint's own slices: its ladder,
    group size and grid are used, `model` defaults to its source, and the fitted policy is
    also written into the checkpoint.
    """
    served = None
    if checkpoint is not None:
        served = ckpt.read_manifest(checkpoint)
        ladder, group_size, grid = served["ladder"], served["group_size"], served["grid"]
        model = model or served["source"]["model"]
    if model is None:
        raise FqError("calibration needs a `model` or a `checkpoint`")
    start = time.perf_counter()
    ladder, out = check_ladder(ladder), Path(out)
    if len(ladder) < 2:
        raise FqError("calibration needs a ladder with at least two precisions")
    if unit not in UNIT_KINDS:
        raise FqError(f"unit must be one of {', '.join(UNIT_KINDS)}, got '{unit}'")
    if signal not in SIGNALS:
        raise FqError(f"signal must be one of {', '.join(SIGNALS)}, got '{signal}'")
    if target_bits is not None and max_ppl_increase is not None:
        raise FqError("give either a target in average bits or an allowed perplexity increase, not both")
    if max_ppl_increase is None and target_bits is None:
        target_bits = (ladder[0] + ladder[-1]) / 2
    if target_bits is not None and not ladder[0] <= target_bits:
        raise FqError(f"target of {target_bits} average bits is below the lowest precision {ladder[0]}")
    if max_ppl_increase is not None and not max_ppl_increase > 0:
        raise FqError(f"the allowed perplexity increase must be positive, got {max_ppl_increase}")
    if buckets < 1 or not 0 <= smoothing < 1 or samples < 2 or eval_samples < 1:
        raise FqError("need buckets >= 1, 0 <= smoothing < 1, samples >= 2, eval samples >= 1")

    folder = sources.resolve(model)
    # local data by absolute path, so a rerun from another folder is recognised as the same
    dataset_id = str(Path(dataset).resolve()) if Path(dataset).exists() else dataset
    settings = {
        "model": model, "fingerprint": fingerprint(folder), "dataset": dataset_id, "ladder": list(ladder),
        "unit": unit, "group_size": group_size, "samples": samples, "eval_samples": eval_samples,
        "seq_len": seq_len, "seed": seed, "grid": check_grid(grid),
        **({"checkpoint": str(Path(checkpoint).resolve()), "slices": ckpt.slices_fingerprint(served)} if served else {}),
    }
    _check_folder(out, settings)  # before minutes of sampling and measuring
    fp_model, tok, _ = sources.load(model)
    if served is not None:
        shapes = {n: [lin.out_features, lin.in_features] for n, lin in quantizable(fp_model)}
        if shapes != {n: info["shape"] for n, info in served["modules"].items()}:
            raise FqError(f"`model` {model} does not have the quantized layers of checkpoint {checkpoint}")
        if served.get("rotation"):  # the checkpoint's weights live in the rotated basis
            rotate(fp_model, served["rotation"]["seed"])
    slice_of = ckpt.slice_reader(checkpoint) if served else m.rtn_slices(fp_model, group_size, ladder, grid)
    calib = load_samples(dataset, tok, split="calib", seq_len=seq_len, max_samples=samples, model=fp_model, seed=seed)
    held_out = load_samples(dataset, tok, split="eval", seq_len=seq_len, max_samples=eval_samples, model=fp_model,
                            seed=seed)
    if not (out / SETTINGS).is_file():  # only now: bad data must not leave a folder behind
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SETTINGS, settings)
    units = m.units_of(fp_model, [n for n, _ in quantizable(fp_model)], unit)
    measure_start = time.perf_counter()
    results = m.measure(fp_model, calib, units, ladder, slice_of, out, batch_size, progress)
    batches = [calib[i : i + batch_size] for i in range(0, len(calib), batch_size)]
    inputs = estimate.record(fp_model, batches, units, ladder, slice_of, out) if signal != "entropy" else None
    measure_seconds = time.perf_counter() - measure_start
    expected_shape = (len(calib), seq_len - 1)
    for r in [results["baseline"], *[v for u in results["units"] for v in u.values()]]:
        if tuple(r.shape) != expected_shape:
            raise FqError(f"calibration results in {out} do not match these samples: delete its units/ to remeasure")

    weights = torch.tensor([sum(fp_model.get_submodule(n).weight.numel() for n in u.modules) for u in units],
                           dtype=torch.float64)
    shares = weights / weights.sum()
    edges = pol.bucket_edges(pol.signal(results["reference"]["entropy"], smoothing),
                             1 if signal == "estimate" else buckets)
    dkl, base, token_share = pol.table(results, ladder, edges, smoothing)
    est = None if signal == "entropy" else estimate.fit(inputs, results, ladder, edges, smoothing)

    def fitted(share):
        """The dynamic fit's (dKL, base, token share): per bucket, or per (bucket, input quantile)."""
        return (dkl, base, share) if est is None else estimate.table(est, base, share)

    def run_plan(lam):
        """What the engines run at price lam: bucket plans, or the estimate rules."""
        return pol.plans(dkl, shares, ladder, lam) if est is None else estimate.rules(est, lam, shares, ladder)

    def expect(lam, share):
        table_ = fitted(share)
        return pol.expected(*table_, shares, ladder, pol.plans(table_[0], shares, ladder, lam))

    # validation on held-out text: predicted vs measured KL at several budgets, dynamic and static-mixed
    budgets = [ladder[0] + (ladder[-1] - ladder[0]) * f for f in (0.125, 0.3125, 0.5, 0.6875, 0.875)]
    lams = [pol.fit(*fitted(token_share), shares, ladder, target_bits=b) for b in budgets]
    static = [pol.static_mixed(dkl, base, token_share, shares, ladder, b).expand(len(edges) + 1, -1) for b in budgets]
    validate_start = time.perf_counter()
    measured, measured_bits, eval_share = run_plans(fp_model, held_out, units, ladder, slice_of, edges, smoothing,
                                                    [run_plan(lam) for lam in lams] + static, shares.tolist(),
                                                    batch_size)
    validate_seconds = time.perf_counter() - validate_start
    rows = []
    for i, b in enumerate(budgets):
        bits, predicted = expect(lams[i], eval_share)
        s_bits, s_pred = pol.expected(dkl, base, eval_share, shares, ladder, static[i])
        rows.append({"target_bits": b, "avg_bits": bits, "measured_bits": measured_bits[i], "predicted_kl": predicted,
                     "measured_kl": measured[i], "ratio": measured[i] / predicted if predicted > 0 else None,
                     "static_avg_bits": s_bits, "static_predicted_kl": s_pred,
                     "static_measured_kl": measured[len(budgets) + i]})
    pred = torch.tensor([r["predicted_kl"] for r in rows])
    meas = torch.tensor([r["measured_kl"] for r in rows])
    correction = float((pred * meas).sum() / (pred * pred).sum()) if (pred > 0).any() else 1.0

    # mean KL ~ mean NLL increase to first order, so ppl x (1 + p) <=> mean KL <= log(1 + p)
    max_kl = None if max_ppl_increase is None else math.log1p(max_ppl_increase)
    lam = pol.fit(*fitted(token_share), shares, ladder, target_bits=target_bits, max_kl=max_kl, correction=correction)
    avg_bits, kl = expect(lam, token_share)
    static_plan = pol.static_mixed(dkl, base, token_share, shares, ladder, avg_bits)
    s_bits, s_kl = pol.expected(dkl, base, token_share, shares, ladder, static_plan.expand(len(edges) + 1, -1))
    ladder_t = torch.tensor(ladder)
    sensitivity = dkl[:, 0].double() @ token_share  # mean KL at the lowest precision
    half = len(calib) // 2
    halves = [pol.table(results, ladder, edges, smoothing, rows=r)[0][:, 0].mean(-1)
              for r in (slice(0, half), slice(half, None))]
    chosen = run_plan(lam)
    policy = {
        "kind": "dynamic",
        "version": 1 if est is None else 2,  # 2: rules instead of plans
        "ladder": list(ladder),
        "unit": unit,
        "units": [{"name": u.name, "modules": list(u.modules), "weight_share": float(s)} for u, s in zip(units, shares)],
        "signal": {"kind": SIGNALS[signal], "unit": "nats", "smoothing": smoothing,
                   **({"estimator": "input-mean-square"} if est else {})},
        "bucket_edges": edges,
        **({"plans": ladder_t[chosen].tolist()} if est is None else {"rules": chosen}),
        "prefill_precision": ladder[-1],
        "lam": lam,
        "target": {"avg_bits": target_bits} if max_ppl_increase is None else {"max_ppl_increase": max_ppl_increase},
        "expected": {"avg_bits": avg_bits, "kl": kl * correction, "bucket_share": token_share.tolist()},
        "kl_correction": correction,
        "static_mixed": {"avg_bits": s_bits, "expected_kl": s_kl * correction, "bits": ladder_t[static_plan].tolist()},
        "calibration": {"model": model, "fingerprint": settings["fingerprint"], "group_size": group_size,
                        "dataset": dataset, "tokens": int(calib[:, 1:].numel()), "grid": grid,
                        "slices": settings.get("slices", "rtn")},
        # the requirement model itself, so the runtime can refit other targets without the raw data
        "table": {"dkl": dkl.tolist(), "base": base.tolist(), "bucket_share": token_share.tolist()},
        **({"estimate": est} if est else {}),
    }
    summary = {
        "settings": settings,
        "units": [u.name for u in units],
        "bucket_edges": edges,
        "bucket_share": token_share.tolist(),
        "bucket_tokens": [round(float(s) * int((~torch.isnan(pol.signal(results["reference"]["entropy"]))).sum()))
                          for s in token_share],
        "base_kl": base.tolist(),
        "mean_kl": {str(b): dkl[:, j].tolist() for j, b in enumerate(ladder[:-1])},
        "sensitivity": sensitivity.tolist(),
        "split_half_spearman": pol.spearman(*halves),
        "validation": rows,
        "kl_correction": correction,
        "seconds": {"measure": measure_seconds, "validate": validate_seconds,
                    "total": time.perf_counter() - start},
    }
    write_json(out / "table.json", summary)
    write_json(out / POLICY, policy)
    write_report(out, summary, policy, dkl, shares, base, token_share, ladder, fitted(token_share), inputs)
    if served is not None:
        ckpt.install_policy(checkpoint, policy)
    return policy


def check_for_export(calib_dir, model_folder: Path, ladder, group_size, quantized: list[str], grid: str) -> dict:
    """The calibration's policy, if it belongs to this model, ladder, group size and grid."""
    calib_dir = Path(calib_dir)
    try:
        settings = json.loads((calib_dir / SETTINGS).read_text())
        policy = json.loads((calib_dir / POLICY).read_text())
    except FileNotFoundError as exc:
        raise FqError(f"{calib_dir} is not a finished calibration (missing {Path(exc.filename).name})") from None
    except ValueError:
        raise FqError(f"{calib_dir} holds a corrupted {SETTINGS} or {POLICY}") from None
    if settings.get("checkpoint"):
        raise FqError(f"calibration {calib_dir} measured the slices of checkpoint {settings['checkpoint']}; its "
                      f"policy is already in that checkpoint and fits no other export")
    if settings.get("fingerprint") != fingerprint(model_folder):
        raise FqError(f"calibration {calib_dir} was made for another model ({settings.get('model')})")
    if list(settings.get("ladder", [])) != list(ladder) or policy.get("ladder") != list(ladder):
        raise FqError(f"calibration {calib_dir} is for ladder {settings.get('ladder')}, not {list(ladder)}")
    if settings.get("group_size") != group_size:
        raise FqError(f"calibration {calib_dir} used group size {settings.get('group_size')}, not {group_size}")
    measured = settings.get("grid", CELL_CENTRE)  # calibrations before format 2 measured the lowest-rung grid
    if measured != grid:
        raise FqError(f"calibration {calib_dir} measured slices on the {measured} grid, not the `grid` {grid} "
                      f"of this export")
    missing = {mod for u in policy["units"] for mod in u["modules"]} - set(quantized)
    if missing:
        raise FqError(f"calibration {calib_dir} names layers this export does not quantize: {sorted(missing)[:3]}")
    return policy
