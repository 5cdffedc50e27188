"""Export to GPTQ: one static plan of a nested checkpoint as a standard GPTQ checkpoint folder.

A plan (static:B, or static-mixed:BITS from the checkpoint's policy) gives every quantized
linear a width; each layer's slice is written as GPTQ tensors (formats/gptq_format.py) at
that width, the unquantized tensors as they are, and the config with `quantization_config`
(a `dynamic` override for every layer that differs from the most common width), so
GPTQModel, transformers and vLLM load it. Asymmetric static groups in column order
(desc_act false, g_idx trivial), the checkpoint's group size.

A slice is exact in GPTQ when its zero points are integers: every rung of the zero-exact
grid (format 2) and the lowest rung of the lowest-rung grid (format 1, whose upper rungs'
zeros are half-integers: refused). Widths GPTQ does not pack whole (3, 5, 6, 7) are
stored at the next of 4 or 8 bits with the same values (codes and zeros times 2^k, scale
over 2^k). Parts that vLLM fuses into one layer (q/k/v, gate/up) take their group's
highest width. Scales are fp16 as in the source; a rung's scale s / 2^k below fp16's
normal range (6.1e-5) loses bits: counted and reported, not hidden.
"""

import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from . import __version__
from .calibration.data import load_samples
from .controller import resolve
from .errors import FqError
from .evaluation import FULL, evaluate
from .exporter import GPTQ_LOG
from .files import atomic_dir, check_writable
from .formats import checkpoint as ckpt
from .formats import gptq_format
from .formats.nested import dequantize, slice_params, unpack_codes
from .loader import load, read_policy
from .sources import LLAMA_LIKE, assign_state

RECORD = "fqcompile-gptq.json"  # written last: marks a complete export of ours (and --force may replace it)
MODEL_FILE = "model.safetensors"
# Whose layer names GPTQModel and vLLM load as they are (Phi-3's q/k/v and gate/up are one layer each already).
ARCHITECTURES = (*LLAMA_LIKE, "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # run as one layer by vLLM
OURS = {ckpt.MANIFEST, ckpt.POLICY, ckpt.DENSE, ckpt.META, GPTQ_LOG, "config.json"}  # not copied


def plan_widths(folder: Path, manifest: dict, spec: str) -> tuple[str, dict[str, int], list[str]]:
    """(plan label, {module: width}, modules raised to their fused group's width) for a static plan."""
    plan = resolve(read_policy(folder), manifest, spec)
    if plan.edges or plan.rules or plan.bits.shape[0] != 1:
        raise FqError(f"policy '{spec}' switches per token; a GPTQ checkpoint holds one static plan "
                      f"(use static:B or static-mixed:BITS)")
    bits = {name: int(b) for names, b in zip(plan.units, plan.bits[0].tolist()) for name in names}
    raised = []
    for name in bits:
        parent, _, attr = name.rpartition(".")
        group = next((g for g in FUSED if attr in g), ())
        top = max(bits.get(f"{parent}.{part}", 0) for part in group) if group else bits[name]
        if top > bits[name]:
            raised.append(name)
            bits[name] = top
    return plan.label, bits, raised


def stored_width(bits: int) -> int:
    return next(w for w in gptq_format.WIDTHS if w >= bits)


def slice_tensors(planes, scale, zero, layout, bits: int):
    """(codes [N, K], zeros [N, G], float32 scales [N, G]) of the b-bit slice at its stored width."""
    n = layout.planes_for(bits)
    codes = unpack_codes(planes[:n], layout.widths[:n])[:, :layout.in_features].long()
    s_b, z_b = slice_params(scale, zero, layout.ladder[0], bits, layout.offset(bits))
    if not torch.equal(z_b, z_b.round()):
        raise FqError(f"the {bits}-bit slice of a {layout.grid} checkpoint has half-integer zero points, which "
                      f"GPTQ cannot store (only its {layout.ladder[0]}-bit rung can be exported); re-export the model "
                      f"with `grid='zero-exact'`")
    widen = 2 ** (stored_width(bits) - bits)
    return codes * widen, z_b.long() * widen, s_b / widen


def dynamic_rules(bits: dict[str, int], base: int) -> dict[str, dict]:
    """`dynamic` overrides (stored widths): one rule per decoder block whose layers share a width
    other than `base`, else one per layer, each also matching the fused name vLLM gives the layer."""
    by_parent: dict[str, dict[str, int]] = {}
    for name, b in ((n, stored_width(b)) for n, b in bits.items()):
        prefix, _, rest = name.partition(".layers.")
        index, _, tail = rest.partition(".")
        key = f"{prefix}.layers.{index}." if rest else name
        by_parent.setdefault(key, {})[tail if rest else ""] = b
    rules = {}
    for key, members in by_parent.items():
        widths = set(members.values())
        if widths == {base}:
            continue
        if len(widths) == 1 and key.endswith("."):
            rules["+:^" + _escape(key)] = {"bits": widths.pop()}
            continue
        for tail, b in members.items():
            if b == base:
                continue
            names = [tail] + [_fused_name(tail)] if _fused_name(tail) else [tail]
            rules["+:^" + _escape(key) + "(" + "|".join(_escape(t) for t in names) + ")$"] = {"bits": b}
    return rules


def _fused_name(tail: str) -> str | None:
    parent, _, attr = tail.rpartition(".")
    for group, fused in zip(FUSED, ("qkv_proj", "gate_up_proj")):
        if attr in group:
            return f"{parent}.{fused}" if parent else fused
    return None


def _escape(text: str) -> str:
    return text.replace(".", r"\.")


def export_gptq(folder, out, spec: str, checkpoint_format: str = "gptq_v2", *, force: bool = False,
                dataset: str | None = None, samples: int = 8, seq_len: int = 512, seed: int = 0,
                progress: bool = True) -> dict:
    """Write the plan `spec` of checkpoint `folder` as a GPTQ checkpoint folder `out`.

    `checkpoint_format`: "gptq_v2" (zero points stored as they are: GPTQModel, transformers
    through it, vLLM since its gptq_v2 support of October 2025) or "gptq" (v1, stored minus
    one: older loaders; GPTQModel refuses asymmetric v1 checkpoints it did not write itself).
    With `dataset`, the export is loaded back as a dense Hugging Face model and its
    perplexity measured beside fqcompile's at the same plan on `samples` windows of
    `seq_len` tokens (the `eval` split). Returns the export record (docs/gptq-export.md).
    """
    folder, out = Path(folder), Path(out)
    check_writable(out, force, RECORD)  # before the work, not after
    if checkpoint_format not in gptq_format.FORMATS:
        raise FqError(f"unknown `checkpoint_format` '{checkpoint_format}' (use {' or '.join(gptq_format.FORMATS)})")
    manifest = ckpt.read_manifest(folder)
    architecture = manifest["source"]["architecture"]
    if architecture not in ARCHITECTURES:
        raise FqError(f"GPTQ export supports {', '.join(ARCHITECTURES)} checkpoints, not {architecture}")
    label, bits, raised = plan_widths(folder, manifest, spec)
    layouts = ckpt.layouts(manifest)
    top = max(bits.values())
    ckpt.verify(folder, manifest, ckpt.files_for(manifest, top))
    n_planes = next(iter(layouts.values())).planes_for(top)
    planes = [ckpt.load_tensors(folder / ckpt.plane_file(i)) for i in range(n_planes)]
    meta = ckpt.load_tensors(folder / ckpt.META)
    dense = ckpt.load_tensors(folder / ckpt.DENSE)

    weights = Counter()
    for name, b in bits.items():
        weights[stored_width(b)] += layouts[name].out_features * layouts[name].in_features
    base = weights.most_common(1)[0][0]
    tensors, stats = {}, {"zero_points_0": 0, "inexact_scales": 0, "max_scale_error": 0.0, "quantized_bytes": 0}
    for name, layout in layouts.items():
        codes, zeros, scales = slice_tensors([p[name] for p in planes], meta[f"{name}.scale"],
                                             meta[f"{name}.zero"], layout, bits[name])
        half = scales.half().float()
        stats["inexact_scales"] += int((half != scales).sum())
        stats["max_scale_error"] = max(stats["max_scale_error"], ((half - scales).abs() / scales).max().item())
        stats["zero_points_0"] += int((zeros == 0).sum())
        layer = gptq_format.layer_tensors(codes, zeros, scales.half(), stored_width(bits[name]), layout.group_size,
                                          checkpoint_format)
        tensors.update({f"{name}.{part}": t for part, t in layer.items()})
        stats["quantized_bytes"] += sum(t.numel() * t.element_size() for part, t in layer.items() if part != "g_idx")
    tensors.update(dense)

    widened = sorted({b for b in bits.values() if stored_width(b) != b})
    n_weights = sum(weights.values())
    quantization = {
        "quant_method": "gptq", "bits": base, "group_size": manifest["group_size"], "desc_act": False, "sym": False,
        "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "lm_head": False,
        **({"dynamic": dynamic_rules(bits, base)} if len(weights) > 1 else {}),  # weights: by stored width
        "meta": {"quantizer": [f"fqcompile:{__version__}"]},
    }
    record = {
        "source": str(folder.resolve()), "source_format_version": manifest["format_version"],
        "grid": manifest["grid"], "rotation": manifest.get("rotation"), "plan": label,
        "checkpoint_format": checkpoint_format, "bits": base,
        "layers_at": {str(b): sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
        "widened": {str(b): stored_width(b) for b in widened}, "raised_to_fused_width": raised,
        "bits_per_weight": 8 * stats["quantized_bytes"] / n_weights, **stats,
    }
    ragged = sorted({lay.in_features for lay in layouts.values() if lay.in_features % lay.group_size})
    notes = _notes(record, checkpoint_format, "dynamic" in quantization, ragged, manifest["group_size"])
    with atomic_dir(out, force, RECORD) as tmp:
        ckpt.save_tensors(tmp / MODEL_FILE, tensors, format="pt")
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quantization
        config["dtype"] = "float16"  # GPTQ kernels compute in float16 (vLLM's take nothing else)
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(quantization, indent=1) + "\n")
        planes_files = {ckpt.plane_file(i) for i in range(len(manifest["plane_widths"]))}
        for name in manifest["files"]:  # the tokenizer and generation config: what else the checkpoint holds
            if name not in OURS | planes_files and not name.startswith("."):
                shutil.copy2(folder / name, tmp / name)
        record["exact"] = _max_difference(tmp, planes, meta, layouts, bits)
        if dataset is not None:
            record["quality"] = _measure(folder, tmp, bits, dataset, samples, seq_len, seed, progress)
        record["notes"] = notes
        (tmp / "README.md").write_text(card(record))
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _notes(record: dict, checkpoint_format: str, dynamic: bool, ragged: list[int], group_size: int) -> list[str]:
    notes = ["asymmetric groups (sym false): vLLM runs them with its gptq kernels; gptq_marlin takes symmetric "
             "4- and 8-bit layers only"]
    for b, w in record["widened"].items():
        notes.append(f"{record['layers_at'][b]} layers at {b} bits are stored as {w}-bit GPTQ layers (same "
                     f"values; GPTQ packs {', '.join(map(str, gptq_format.WIDTHS))} bits whole)")
    if ragged:
        notes.append(f"in_features {ragged} are not multiples of the group size {group_size}: vLLM's GPTQ layers "
                     f"refuse them, and GPTQModel and transformers need their torch backend; export the checkpoint "
                     f"with a group size that divides every layer's inputs to serve it with vLLM")
    if dynamic:
        notes.append("mixed widths are `dynamic` overrides in the config: GPTQModel and vLLM apply them; "
                     "transformers' GPTQ integration (through optimum) does not, and fails to load the folder")
    if record["raised_to_fused_width"]:
        notes.append(f"{len(record['raised_to_fused_width'])} layers run at the highest width of their fused "
                     f"group (vLLM runs q/k/v and gate/up as one layer)")
    if checkpoint_format == "gptq":
        notes.append("GPTQModel refuses asymmetric checkpoints in format gptq unless it wrote them itself; it "
                     "loads format gptq_v2")
    if record["zero_points_0"] and checkpoint_format == "gptq":
        notes.append(f"{record['zero_points_0']} groups have zero point 0, which format gptq stores with a borrow "
                     f"that GPTQModel reads back but per-field readers do not; format gptq_v2 stores it exactly")
    if record["inexact_scales"]:
        notes.append(f"{record['inexact_scales']} group scales fall below fp16's normal range and were rounded "
                     f"(at most {record['max_scale_error']:.1e} relative)")
    return notes


def _max_difference(tmp: Path, planes, meta, layouts, bits) -> dict:
    """Read the export back (formats/gptq_format.py) and compare every layer with its slice, one at a time."""
    worst = 0.0
    for name, weight in gptq_format.read_layers(tmp)[0]:
        layout = layouts[name]
        ref = dequantize([p[name] for p in planes], meta[f"{name}.scale"], meta[f"{name}.zero"], layout, bits[name])
        worst = max(worst, ((weight - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item())
    return {"max_relative_difference": worst, "identical": worst == 0.0}


def dense_model(folder: Path, dtype=torch.float32):
    """A Hugging Face model with the GPTQ checkpoint's weights dequantized (no GPTQ library needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights, other = gptq_format.read_layers(folder)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in other.items()}
    state.update({f"{name}.weight": w.to(dtype) for name, w in weights})
    assign_state(model, state, "GPTQ checkpoint")
    return model.eval()


def _measure(folder: Path, export: Path, bits: dict[str, int], dataset, samples, seq_len, seed, progress) -> dict:
    """Perplexity of the export (dense) and of fqcompile's slices at the same plan, and the KL between them."""
    loaded = load(folder, precision=max(bits.values()))
    for name, b in bits.items():
        loaded.model.get_submodule(name).set_precision(b)
    data = load_samples(dataset, loaded.tokenizer, split="eval", seq_len=seq_len, max_samples=samples,
                        model=loaded.model, seed=seed)
    r = evaluate(dense_model(export), data, reference=loaded.model, progress=progress)
    return {"dataset": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset, "samples": len(data),
            "seq_len": seq_len, "tokens": r[None]["tokens"],
            "perplexity": r[None]["perplexity"], "fqcompile_perplexity": r[FULL]["perplexity"],
            "kl_vs_fqcompile": r[None]["kl"]}


def summary(record: dict) -> list[str]:
    """What `fqcompile export-gptq` prints: the plan, the exactness and the measured quality."""
    widths = ", ".join(f"{n} layers at {b} bits" for b, n in record["layers_at"].items())
    exact = record["exact"]
    lines = [f"{record['plan']} ({widths}), {record['bits_per_weight']:.3f} bits/weight, GPTQ "
             f"{record['checkpoint_format']}",
             "exact: every weight equals the nested slice" if exact["identical"] else
             f"not exact: largest difference {exact['max_relative_difference']:.1e} of a layer's largest weight"]
    q = record.get("quality")
    if q:
        lines.append(f"perplexity {q['perplexity']:.3f} on {q['tokens']} tokens (fqcompile at the same plan: "
                     f"{q['fqcompile_perplexity']:.3f}; KL between them {q['kl_vs_fqcompile']:.2e})")
    return lines


def card(record: dict) -> str:
    """The export's README: source, plan, widths, exactness, quality, and how to load it."""
    widths = ", ".join(f"{n} at {b} bits" for b, n in record["layers_at"].items())
    lines = [
        "# GPTQ export of an fqcompile checkpoint", "",
        f"- Source: `{record['source']}` (fqcompile format {record['source_format_version']}, {record['grid']} grid"
        + (", rotated" if record["rotation"] else "") + ")",
        f"- Plan: `{record['plan']}`: {widths}; {record['bits_per_weight']:.3f} bits per quantized weight "
        f"(codes, fp16 scales and packed zeros)",
        f"- Format: GPTQ `{record['checkpoint_format']}`, asymmetric, group size in config.json, desc_act false",
        f"- Exact: {'yes, every weight equals the nested slice' if record['exact']['identical'] else 'no'} "
        f"(largest difference {record['exact']['max_relative_difference']:.1e} of a layer's largest weight)",
    ]
    quality = record.get("quality")
    if quality:
        lines.append(f"- Measured on {quality['tokens']} tokens of `{quality['dataset']}`: perplexity "
                     f"{quality['perplexity']:.3f} (fqcompile at the same plan: {quality['fqcompile_perplexity']:.3f}; "
                     f"KL between the two {quality['kl_vs_fqcompile']:.2e})")
    else:
        lines.append("- Quality: not measured (pass `--dataset` to `fqcompile export-gptq`)")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]] + [
        "", "## Loading", "",
        "- GPTQModel: `GPTQModel.load(folder)` (on CPU: `backend=BACKEND.TORCH`)",
        "- transformers (static plans; needs gptqmodel and optimum): `AutoModelForCausalLM.from_pretrained(folder, "
        "quantization_config=GPTQConfig(bits=..., backend=\"torch\"))`",
        "- vLLM: `vllm serve folder` (layers whose inputs the group size divides; see the notes)", "",
        f"Written by fqcompile {__version__} (`fqcompile export-gptq`).", ""]
    return "\n".join(lines)
