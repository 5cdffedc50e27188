"""Export: a Hugging Face model -> a nested-bit checkpoint folder (RTN quantizer)."""

import json
import sys
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from . import models
from .atomic import atomic_dir, check_writable
from .errors import FqError
from .formats import checkpoint as ckpt
from .formats.nested import Layout, check_ladder, pack_planes, plane_widths, quantize_rtn


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
) -> Path:
    """Quantize `model` to nested-bit codes and write the checkpoint folder `out`."""
    ladder, group_size, out = check_ladder(ladder), check_group_size(group_size), Path(out)
    check_writable(out, force, ckpt.MANIFEST)  # before minutes of work, not after
    # The stored dtype: unquantized tensors stay in it; quantization itself runs in fp32.
    hf_model, tokenizer, folder = models.load(model, dtype="auto")
    targets = quantizable(hf_model)
    if not targets:
        raise FqError(f"{model} has no linear layers to quantize")
    policy = {"kind": "static", "precision": ladder[-1]}
    if calib is not None:
        from .calibrate import check_for_export

        policy = check_for_export(calib, folder, ladder, group_size, [n for n, _ in targets])
    ragged = sorted({m.in_features for _, m in targets if m.in_features % group_size})
    if ragged and progress:
        print(
            f"note: group size {group_size} does not divide in_features {ragged}; "
            f"the last group of those rows is shorter",
            file=sys.stderr,
        )
    widths = plane_widths(ladder)
    planes: list[dict[str, torch.Tensor]] = [{} for _ in widths]
    meta: dict[str, torch.Tensor] = {}
    modules, skip = {}, set()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("quantizing", total=len(targets))
        for name, linear in targets:
            if not torch.isfinite(linear.weight).all():
                raise FqError(f"{name}.weight contains NaN or Inf: refusing to quantize")
            layout = Layout(linear.out_features, linear.in_features, group_size, ladder)
            codes, scale, zero = quantize_rtn(linear.weight, group_size, ladder)
            for i, plane in enumerate(pack_planes(codes, layout)):
                planes[i][name] = plane
            meta[f"{name}.scale"], meta[f"{name}.zero"] = scale, zero
            modules[name] = {"shape": [linear.out_features, linear.in_features], "bias": linear.bias is not None}
            skip.add(f"{name}.weight")
            bar.advance(task)

    manifest = {
        "ladder": list(ladder),
        "master_bits": ladder[-1],
        "group_size": group_size,
        "plane_widths": list(widths),
        "plane_layout": "row-segments",
        "grid": "lowest-rung",
        "quantizer": {"method": "rtn", "scale_dtype": "float16", "zero_dtype": "uint8"},
        "source": {
            # local paths absolute, so `eval` finds the reference from any folder
            "model": str(Path(model).resolve()) if Path(model).exists() else model,
            "architecture": type(hf_model).__name__,
            "dtype": str(hf_model.dtype).removeprefix("torch."),
        },
        "modules": modules,
        "unquantized": "every tensor in " + ckpt.DENSE,
    }
    with atomic_dir(out, force, ckpt.MANIFEST) as tmp:
        hf_model.config.save_pretrained(tmp)
        if hf_model.generation_config is not None:
            hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ckpt.save_tensors(tmp / ckpt.DENSE, dense_state(hf_model, skip))
        ckpt.save_tensors(tmp / ckpt.META, meta)
        for i, plane in enumerate(planes):
            ckpt.save_tensors(tmp / ckpt.plane_file(i), plane, plane=f"{i} width={widths[i]}")
        (tmp / ckpt.POLICY).write_text(json.dumps(policy, indent=1) + "\n")
        ckpt.write_manifest(tmp, manifest)
    return out
