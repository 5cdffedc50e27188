"""Load: a checkpoint folder -> a Hugging Face model whose quantized linears are FlexLinear layers.

Built from the checkpoint's config and tensors alone (no original model), reading only
the planes the highest wanted precision needs; plus the settings a loaded model is run
with (precision, int8 activations, an 8-bit head).
"""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FqError
from .flex_linear import FlexLinear
from .formats import checkpoint as ckpt
from .formats.nested import Layout, dequantize, pack_planes, quantize_rtn
from .kernels import backend, packs_rows
from .sources import assign_state, check_causal_lm


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    manifest: dict
    folder: Path
    policy: dict


def load(folder, precision: int | None = None, verify: bool = True, dtype: torch.dtype | None = None,
         quantized_head: bool = False) -> Loaded:
    """Build the model from the checkpoint's config and tensors.

    `precision` is the highest precision this process will run: planes below it are
    never read from disk. `verify` checks every file read against its SHA-256.
    `quantized_head`: run the output head at 8 bits (see `quantize_head`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest = ckpt.read_manifest(folder)
    top = precision if precision is not None else manifest["ladder"][-1]
    layouts = ckpt.layouts(manifest)
    n_planes = next(iter(layouts.values())).planes_for(top) if layouts else 0
    ckpt.verify(folder, manifest, ckpt.files_for(manifest, top), hashes=verify)

    config = check_causal_lm(folder)
    dtype = dtype or getattr(torch, manifest["source"]["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)

    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.load_tensors(folder / ckpt.DENSE).items()}
    meta = ckpt.load_tensors(folder / ckpt.META)
    planes = [ckpt.load_tensors(folder / ckpt.plane_file(i)) for i in range(n_planes)]
    for name, layout in layouts.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
        except AttributeError:
            raise FqError(f"checkpoint module {name} does not exist in the model built from config.json") from None
        if (old.out_features, old.in_features) != (layout.out_features, layout.in_features):
            raise FqError(f"{name}: checkpoint shape {layout.out_features}x{layout.in_features} does not match config")
        try:
            tensors = [p[name] for p in planes], meta[f"{name}.scale"], meta[f"{name}.zero"]
        except KeyError as exc:
            raise FqError(f"checkpoint is missing tensor {exc}") from None
        bias = dense.pop(f"{name}.bias", None)
        if (bias is not None) != bool(manifest["modules"][name].get("bias")):
            raise FqError(f"checkpoint bias of {name} does not match its manifest entry")
        setattr(parent, attr, FlexLinear(layout, *tensors, bias=bias))

    assign_state(model, dense, "checkpoint")
    model.eval()
    backend(torch.device("cpu"))  # the kernels' one-time build happens at load, never inside a timed call
    if quantized_head:
        quantize_head(model, manifest["group_size"])
    return Loaded(model, AutoTokenizer.from_pretrained(folder), manifest, folder, read_policy(folder))


def read_policy(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / ckpt.POLICY).read_text())
    except ValueError:
        raise FqError(f"{Path(folder) / ckpt.POLICY} is not valid JSON") from None


def quantize_head(model, group_size: int) -> None:
    """Replace the output head by a round-to-nearest 8-bit copy (group-wise, nested format).

    Checkpoints keep the head in float (DESIGN: the checkpoint says which tensors are
    quantized); on a small model it is the largest single read of a decode step. 8 bits,
    because their cost is within the noise where 4 bits' is not (docs/bench-generate.md). A
    tied embedding keeps the float weight. Both engines use the same head; the controller
    leaves it alone.
    The codes are RTN at 8 bits either way; as one plane they are not nested under 4-bit ones
    (the head never runs at 4), which if anything makes them a little closer to the weights.
    """
    bits = 8
    head = model.get_output_embeddings()
    w = head.weight.detach()
    # One 8-bit plane where the CPU's packed int8 decode kernel reads it (AVX2 builds), else
    # two nibble planes (what the other kernels read fastest, AVX-512 VNNI's included).
    ladder = (bits,) if head.weight.is_cpu and packs_rows() else (4, bits)
    layout = Layout(w.shape[0], w.shape[1], group_size, ladder)
    parts = []
    for block in w.split(4096):  # whole-head temporaries would double a small model's peak memory
        codes, scale, zero = quantize_rtn(block, group_size, layout.ladder)
        parts.append((*pack_planes(codes, Layout(len(block), *w.shape[1:], group_size, layout.ladder)), scale, zero))
    *planes, scale, zero = (torch.cat(t) for t in zip(*parts))
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    quantized = FlexLinear(layout, planes, scale, zero, bias)
    quantized.precision = bits
    model.set_output_embeddings(quantized)


def flex_layers(model) -> list[FlexLinear]:
    """The checkpoint's quantized layers (not a head quantized at load: it keeps its own bits)."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, FlexLinear) and m is not head]


@contextlib.contextmanager
def dense_weights(model, dtype=torch.float32):
    """Keep every slice dequantized while inside (evaluation speed; costs dense memory per precision)."""
    layers = flex_layers(model)
    try:
        for layer in layers:
            layer.dense = {b: dequantize(layer.planes(), layer.scale, layer.zero, layer.layout, b, dtype)
                           for b in layer.precisions}
        yield
    finally:
        for layer in layers:
            layer.dense = None


def set_precision(model, bits: int) -> None:
    """Run every quantized layer at `bits` (a static plan)."""
    for layer in flex_layers(model):
        layer.set_precision(bits)


def options_label(quantized_head: bool, int8_activations: bool) -> str:
    """How the serving options in force are named in reports ("8-bit head, int8 activations")."""
    on = [name for name, flag in (("8-bit head", quantized_head), ("int8 activations", int8_activations)) if flag]
    return ", ".join(on) if on else "float head and activations"


def set_int8_activations(model, on: bool = True) -> None:
    """Quantize every quantized layer's inputs to int8 in blocks of 16 (faster decode on CPUs
    with AVX-512 VNNI or AVX2, where decode reads a repacked copy of the 4-bit slices: see
    FlexLinear.packed; its perplexity cost is measured in docs/kernels.md)."""
    for layer in model.modules():  # a head quantized at load (quantize_head) too
        if isinstance(layer, FlexLinear):
            layer.int8_activations = on
