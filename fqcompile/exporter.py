"""Export: a Hugging Face model -> a nested-bit checkpoint folder.

Two quantizers write the same format: "rtn" (round to nearest; needs no data) and
"gptq" (error compensation for every rung, from calibration text; calibration/gptq.py),
the default whenever calibration text is given (--dataset, or the dataset of --calib).
GPTQ runs block by block (calibration/gptq_blocks.py) and leaves its per-layer log in the
checkpoint folder as gptq-log.json. Either writes the grid `grid` (formats/nested.py:
lowest-rung, format 1, by default; zero-exact, format 2, is opt-in until its rungs'
bias is fixed: docs/results.md). With `rotate` the model is first rotated
(calibration/rotation.py) into a scratch folder in float32, which is then the source; the
unquantized tensors are stored in the source model's dtype, as without rotation.
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import Progress

from . import sources
from .calibration import gptq_blocks
from .calibration.data import SELF, load_samples
from .calibrator import SETTINGS, check_for_export
from .files import atomic_dir, check_writable
from .errors import FqError
from .formats import checkpoint as ckpt
from .calibration.gptq import GPTQConfig
from .calibration.rotation import check_rotatable, rotate
from .formats.nested import CELL_CENTRE, ZERO_EXACT, Layout, check_grid, check_ladder, pack_planes, plane_widths, quantize_rtn

METHODS = ("rtn", "gptq")
GPTQ_LOG = "gptq-log.json"


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


@dataclass(frozen=True)
class ExportConfig:
    """Every export setting: the API's keywords and the CLI's options are these fields."""

    ladder: tuple[int, ...] = (4, 8)  # precisions the checkpoint serves, increasing, each 2..8
    group_size: int = 128  # quantization group along the input dimension
    method: str | None = None  # rtn | gptq (default: gptq when calibration text is given, else rtn)
    dataset: str | None = None  # GPTQ calibration text (a data spec, see calibration/data.py)
    samples: int = 64  # GPTQ calibration windows ...
    seq_len: int = 512  # ... of this many tokens
    seed: int = 0  # for 'self' calibration text, and the rotation's random signs
    grid: str = CELL_CENTRE  # the nested grid (formats/nested.py): lowest-rung (format 1) or zero-exact (format 2)
    rotate: bool = False  # rotate the residual stream and each head's values first (calibration/rotation.py)
    gptq: GPTQConfig = GPTQConfig()


def export(model: str, out: Path, config: ExportConfig | None = None, *, force: bool = False, progress: bool = True,
           calib=None, **settings) -> Path:
    """Quantize `model` to nested-bit codes and write the checkpoint folder `out`.

    `config` (or keywords naming its fields, e.g. ladder=(4, 8)) holds the settings; GPTQ
    reads `samples` windows of `seq_len` tokens from the calibration split of `dataset`
    ('self': text sampled from the model with `seed`). `calib`: a calibration folder whose
    fitted policy goes into the checkpoint (its dataset is the default `dataset`).
    `force` replaces an existing checkpoint folder.
    """
    config = replace(config or ExportConfig(), **settings)
    ladder, group_size, out = check_ladder(config.ladder), check_group_size(config.group_size), Path(out)
    grid = check_grid(config.grid)
    check_writable(out, force, ckpt.MANIFEST)  # before minutes of work, not after
    folder = sources.resolve(model)
    dataset = config.dataset if config.dataset is not None or calib is None else _calibration_dataset(calib)
    method = config.method or ("gptq" if dataset is not None else "rtn")
    gptq = config.gptq
    if method not in METHODS:
        raise FqError(f"unknown method '{method}' (use one of {', '.join(METHODS)})")
    if method == "gptq":
        if dataset is None:
            raise FqError("`method='gptq'` needs calibration text: pass `dataset` (files, a hub dataset, or 'self')")
        if config.samples < 1 or config.seq_len < 2:
            raise FqError(f"need at least 1 calibration sample of at least 2 tokens, got "
                          f"{config.samples} x {config.seq_len}")
        if gptq.propagate is not None and gptq.propagate not in ladder:
            raise FqError(f"propagate precision {gptq.propagate} is not in the ladder {list(ladder)}")
        if gptq.damp <= 0 or gptq.block_size < 1 or gptq.upper_budget <= 0 or set(gptq.rung_weights) - set(ladder) \
                or any(v <= 0 for v in gptq.rung_weights.values()):
            raise FqError("GPTQ needs damping > 0, block size >= 1, upper budget > 0 and positive weights "
                          "for rungs of the ladder")
        if calib is not None and progress:
            print(f"note: the policy was measured on RTN slices; calibrating with `checkpoint` {out} refits it on "
                  f"the GPTQ slices the checkpoint serves", file=sys.stderr)
    elif dataset is not None and calib is None:
        print("note: `dataset` is only used by `method='gptq'`; quantizing with RTN", file=sys.stderr)

    start = time.perf_counter()
    config = replace(config, ladder=ladder, grid=grid, dataset=dataset)
    policy = {"kind": "static", "precision": ladder[-1]}
    if calib is not None:
        names = [n for n, _ in sources.quantizable(sources.meta_model(folder)[0])]
        policy = check_for_export(calib, folder, ladder, group_size, names, grid)
    with tempfile.TemporaryDirectory(prefix="fqcompile-rotated-") as scratch:
        rotation = None
        if config.rotate:  # the rotated model is the source from here on (float32: exactly rotated)
            folder, rotation = _rotated(folder, Path(scratch), config.seed)
        return _export(model, folder, out, config, method, policy, rotation, start, force, progress)


def _rotated(folder: Path, scratch: Path, seed: int) -> tuple[Path, dict]:
    check_rotatable(sources.meta_model(folder)[0])  # before reading any weight
    stored = sources.check_causal_lm(folder).dtype or torch.float32  # the dtype of the stored weights
    hf_model, tokenizer, _ = sources.load(str(folder), dtype=torch.float32)
    record = dict(rotate(hf_model, seed), source_dtype=str(stored).removeprefix("torch."))
    hf_model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return scratch, record


def _export(model: str, folder: Path, out: Path, config: ExportConfig, method: str, policy: dict, rotation, start,
            force: bool, progress: bool) -> Path:
    ladder, group_size, grid, gptq, dataset = config.ladder, config.group_size, config.grid, config.gptq, config.dataset
    if method == "rtn":
        hf_model, tokenizer, _ = sources.load(str(folder), dtype="auto")
    else:
        hf_model, tokenizer = sources.meta_model(folder)
    targets = sources.quantizable(hf_model)
    if not targets:
        raise FqError(f"{model} has no linear layers to quantize")
    ragged = sorted({m.in_features for _, m in targets if m.in_features % group_size})
    if ragged and progress:
        print(f"note: group size {group_size} does not divide in_features {ragged}; "
              f"the last group of those rows is shorter", file=sys.stderr)
    if method == "rtn":
        quantized = {name: quantize_rtn(_finite(name, m.weight), group_size, ladder, grid)
                     for name, m in _progress(targets, "quantizing (RTN)", progress)}
        dense = dense_state(hf_model, {f"{n}.weight" for n, _ in targets})
        source_dtype, log, orders, info = hf_model.dtype, None, {}, {"method": "rtn"}
    else:
        quantized, orders, dense, source_dtype, log = _gptq(
            hf_model, folder, tokenizer, [n for n, _ in targets], config, progress)
        info = {"method": "gptq", "dataset": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset,
                "samples": config.samples, "seq_len": config.seq_len, "seed": config.seed, "damp": gptq.damp,
                "block_size": gptq.block_size, "act_order": gptq.act_order, "true_sequential": gptq.true_sequential,
                "rung_weights": ({str(b): gptq.rung_weights.get(b, 1.0) for b in ladder} if gptq.rung_weights
                                 else f"searched per layer (upper budget {gptq.upper_budget:g} x RTN)"),
                "propagate": gptq.propagate or ladder[0], "log": GPTQ_LOG}

    widths = plane_widths(ladder)
    planes: list[dict[str, torch.Tensor]] = [{} for _ in widths]
    meta: dict[str, torch.Tensor] = dict(orders)
    modules = {}
    for name, linear in targets:
        codes, scale, zero = quantized[name]
        layout = Layout(linear.out_features, linear.in_features, group_size, ladder, grid)
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
        "grid": grid,
        **({"zero_offset": layout.zero_offset} if grid == ZERO_EXACT else {}),
        "rotation": rotation,
        "quantizer": {**info, "scale_dtype": "float16", "zero_dtype": "uint8"},
        "source": {
            # local paths absolute, so `eval` finds the reference from any folder
            "model": str(Path(model).resolve()) if Path(model).exists() else model,
            "architecture": type(hf_model).__name__,
            "dtype": rotation["source_dtype"] if rotation else str(source_dtype).removeprefix("torch."),
        },
        "modules": modules,
        "unquantized": "every tensor in " + ckpt.DENSE,
    }
    if rotation:  # the rotated source is float32; store what the source stored
        dense = {k: v.to(getattr(torch, rotation["source_dtype"])) if v.is_floating_point() else v
                 for k, v in dense.items()}
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
    try:
        return json.loads((Path(calib) / SETTINGS).read_text()).get("dataset")
    except (OSError, ValueError):
        return None  # check_for_export says what is wrong with the folder


def _gptq(meta_model, folder, tokenizer, targets, config: ExportConfig, progress):
    """Block-by-block GPTQ from the model's safetensors files (calibration/gptq_blocks.py)."""
    files = gptq_blocks.weight_files(folder)
    sampler = sources.load(str(folder))[0] if config.dataset == SELF else None  # sampling needs the whole model
    data = load_samples(config.dataset, tokenizer, split="calib", seq_len=config.seq_len,
                        max_samples=config.samples, model=sampler, seed=config.seed)
    del sampler
    results, log = gptq_blocks.quantize_model(meta_model, files, targets, data, config.ladder, config.group_size,
                                              config.grid, config.gptq, progress=progress)
    quantized = {n: (q.codes, q.scale, q.zero) for n, q in results.items()}
    # The act-order visiting order, for the record (codes are stored in column order).
    orders = {f"{n}.order": q.order for n, q in results.items()} if config.gptq.act_order else {}
    skip = {f"{n}.weight" for n in targets}
    dense = gptq_blocks.read_tensors(files, [n for n in files if n not in skip])
    source_dtype = next((v.dtype for v in dense.values() if v.is_floating_point()), torch.float32)
    log.update(samples=len(data), tokens=int(data.numel()))
    return quantized, orders, dense, source_dtype, log
