"""Export: a Hugging Face model -> a nested-bit checkpoint folder.

Two quantizers write the same format: "rtn" (round to nearest; needs no data) and
"gptq" (error compensation for every rung, from calibration text; formats/gptq.py),
the default whenever calibration text is given (--dataset, or the dataset of --calib).
GPTQ runs block by block (fqcompile/sequential.py) and leaves its per-layer log in the
checkpoint folder as gptq-log.json.
"""

import json
import sys
import time
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from . import models
from .atomic import atomic_dir, check_writable
from .errors import FqError
from .formats import checkpoint as ckpt
from .formats.gptq import GPTQConfig
from .formats.nested import Layout, check_ladder, pack_planes, plane_widths, quantize_rtn

METHODS = ("rtn", "gptq")
GPTQ_LOG = "gptq-log.json"


def quantizable(model) -> list[tuple[str, nn.Linear]]:
    """Linear layers to quantize: every nn.Linear except the output head (lm_head)."""
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def dense_state(model, skip: set[str]) -> dict[str, torch.Tensor]:
    """Unquantized tensors, each stored once (tied weights such as lm_head are re-tied on load)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
        if name in skip or (tensor.numel() and key in seen):
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def check_group_size(group_size: int) -> int:
    if group_size < 1:
        raise FqError(f"group size must be a positive integer, got {group_size}")
    return group_size


def export(
    model: str,
    out: Path,
    ladder=(4, 8),
    group_size: int = 128,
    force: bool = False,
    progress: bool = True,
    calib=None,
    method: str | None = None,
    dataset: str | None = None,
    samples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    gptq: GPTQConfig = GPTQConfig(),
    propagate: int | None = None,
    true_sequential: bool = True,
) -> Path:
    """Quantize `model` to nested-bit codes and write the checkpoint folder `out`.

    GPTQ reads `samples` windows of `seq_len` tokens from the calibration split of
    `dataset` ('self': text sampled from the model with `seed`).
    """
    ladder, group_size, out = check_ladder(ladder), check_group_size(group_size), Path(out)
    check_writable(out, force, ckpt.MANIFEST)  # before minutes of work, not after
    folder = models.resolve(model)
    if dataset is None and calib is not None:
        dataset = _calibration_dataset(calib)
    method = method or ("gptq" if dataset is not None else "rtn")
    if method not in METHODS:
        raise FqError(f"unknown method '{method}' (use one of {', '.join(METHODS)})")
    if method == "gptq":
        if dataset is None:
            raise FqError("--method gptq needs calibration text: pass --dataset (files, a hub dataset, or 'self')")
        if samples < 1 or seq_len < 2:
            raise FqError(f"need at least 1 calibration sample of at least 2 tokens, got {samples} x {seq_len}")
        if propagate is not None and propagate not in ladder:
            raise FqError(f"propagate precision {propagate} is not in the ladder {list(ladder)}")
        if gptq.damp <= 0 or gptq.block_size < 1 or gptq.upper_budget <= 0 or set(gptq.rung_weights) - set(ladder) \
                or any(v <= 0 for v in gptq.rung_weights.values()):
            raise FqError("GPTQ needs damping > 0, block size >= 1, upper budget > 0 and positive weights "
                          "for rungs of the ladder")
    elif dataset is not None and calib is None:
        print("note: --dataset is only used by --method gptq; quantizing with RTN", file=sys.stderr)

    start = time.perf_counter()
    if method == "rtn":
        hf_model, tokenizer, _ = models.load(str(folder), dtype="auto")
    else:
        hf_model, tokenizer = _meta_model(folder)
    targets = quantizable(hf_model)
    if not targets:
        raise FqError(f"{model} has no linear layers to quantize")
    policy = {"kind": "static", "precision": ladder[-1]}
    if calib is not None:
        from .calibrate import check_for_export

        policy = check_for_export(calib, folder, ladder, group_size, [n for n, _ in targets])
    ragged = sorted({m.in_features for _, m in targets if m.in_features % group_size})
    if ragged and progress:
        print(f"note: group size {group_size} does not divide in_features {ragged}; "
              f"the last group of those rows is shorter", file=sys.stderr)
    if method == "rtn":
        quantized = {name: quantize_rtn(_finite(name, m.weight), group_size, ladder)
                     for name, m in _progress(targets, "quantizing (RTN)", progress)}
        dense = dense_state(hf_model, {f"{n}.weight" for n, _ in targets})
        source_dtype, log, orders, info = hf_model.dtype, None, {}, {"method": "rtn"}
    else:
        quantized, orders, dense, source_dtype, log = _gptq(
            hf_model, folder, tokenizer, [n for n, _ in targets], ladder, group_size, dataset, samples, seq_len,
            seed, gptq, propagate, true_sequential, progress)
        info = {"method": "gptq", "dataset": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset,
                "samples": samples, "seq_len": seq_len, "seed": seed, "damp": gptq.damp,
                "block_size": gptq.block_size, "act_order": gptq.act_order, "true_sequential": true_sequential,
                "rung_weights": ({str(b): gptq.rung_weights.get(b, 1.0) for b in ladder} if gptq.rung_weights
                                 else f"searched per layer (upper budget {gptq.upper_budget:g} x RTN)"),
                "propagate": propagate or ladder[0], "log": GPTQ_LOG}

    widths = plane_widths(ladder)
    planes: list[dict[str, torch.Tensor]] = [{} for _ in widths]
    meta: dict[str, torch.Tensor] = dict(orders)
    modules = {}
    for name, linear in targets:
        codes, scale, zero = quantized[name]
        layout = Layout(linear.out_features, linear.in_features, group_size, ladder)
        for i, plane in enumerate(pack_planes(codes, layout)):
            planes[i][name] = plane
        meta[f"{name}.scale"], meta[f"{name}.zero"] = scale, zero
        modules[name] = {"shape": [linear.out_features, linear.in_features], "bias": linear.bias is not None}

    manifest = {
        "ladder": list(ladder),
        "master_bits": ladder[-1],
        "group_size": group_size,
        "plane_widths": list(widths),
        "plane_layout": "row-segments",
        "grid": "lowest-rung",
        "quantizer": {**info, "scale_dtype": "float16", "zero_dtype": "uint8"},
        "source": {
            # local paths absolute, so `eval` finds the reference from any folder
            "model": str(Path(model).resolve()) if Path(model).exists() else model,
            "architecture": type(hf_model).__name__,
            "dtype": str(source_dtype).removeprefix("torch."),
        },
        "modules": modules,
        "unquantized": "every tensor in " + ckpt.DENSE,
    }
    with atomic_dir(out, force, ckpt.MANIFEST) as tmp:
        hf_model.config.save_pretrained(tmp)
        if hf_model.generation_config is not None:
            hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ckpt.save_tensors(tmp / ckpt.DENSE, dense)
        ckpt.save_tensors(tmp / ckpt.META, meta)
        for i, plane in enumerate(planes):
            ckpt.save_tensors(tmp / ckpt.plane_file(i), plane, plane=f"{i} width={widths[i]}")
        (tmp / ckpt.POLICY).write_text(json.dumps(policy, indent=1) + "\n")
        if log is not None:
            log["seconds"] = round(time.perf_counter() - start, 1)
            (tmp / GPTQ_LOG).write_text(json.dumps(log, indent=1) + "\n")
        ckpt.write_manifest(tmp, manifest)
    return out


def _finite(name: str, weight: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(weight).all():
        raise FqError(f"{name}.weight contains NaN or Inf: refusing to quantize")
    return weight


def _progress(items, label: str, progress: bool):
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def _calibration_dataset(calib) -> str | None:
    from .calibrate import SETTINGS

    try:
        return json.loads((Path(calib) / SETTINGS).read_text()).get("dataset")
    except (OSError, ValueError):
        return None  # check_for_export says what is wrong with the folder


def _meta_model(folder):
    """The model's modules without weights (meta device) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = models.check_causal_lm(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _gptq(meta_model, folder, tokenizer, targets, ladder, group_size, dataset, samples, seq_len, seed, config,
          propagate, true_sequential, progress):
    """Block-by-block GPTQ from the model's safetensors files (fqcompile/sequential.py)."""
    from . import sequential
    from .calibration.data import SELF, load_samples

    files = sequential.weight_files(folder)
    sampler = models.load(str(folder))[0] if dataset == SELF else None  # sampling needs the whole model
    data = load_samples(dataset, tokenizer, split="calib", seq_len=seq_len, max_samples=samples, model=sampler,
                        seed=seed)
    del sampler
    results, log = sequential.quantize_model(meta_model, files, targets, data, ladder, group_size, config,
                                             propagate=propagate, true_sequential=true_sequential,
                                             progress=progress)
    quantized = {n: (q.codes, q.scale, q.zero) for n, q in results.items()}
    # The act-order visiting order, for the record (codes are stored in column order).
    orders = {f"{n}.order": q.order for n, q in results.items()} if config.act_order else {}
    skip = {f"{n}.weight" for n in targets}
    dense = sequential.read_tensors(files, [n for n in files if n not in skip])
    source_dtype = next((v.dtype for v in dense.values() if v.is_floating_point()), torch.float32)
    log.update(samples=len(data), tokens=int(data.numel()))
    return quantized, orders, dense, source_dtype, log
