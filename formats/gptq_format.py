"""GPTQ checkpoints (the layout GPTQModel, transformers and vLLM load): packing, reading, writing.

Per quantized linear `name` (W is [N out, K in], G groups):
    name.qweight  int32 [K·bits/32, N]  codes along K, lowest input row in the lowest bits
    name.qzeros   int32 [G, N·bits/32]  zero points along N, same packing
    name.scales   fp16  [G, N]
    name.g_idx    int32 [K]             group of every input row (act-order permutes it)
    W[n, k] = scales[g, n] · (code[k, n] − zero[g, n]),  g = g_idx[k]
checkpoint_format "gptq" (v1) stores every zero word minus 0x11111111 (4-bit; one 1 per
field in general) as a whole 32-bit subtraction, borrows included, so a zero of 0
borrows from its neighbour; "gptq_v2" stores zeros as they are. Verified against
GPTQModel 7.7.0's own CPU kernel (identical to fp16 rounding).

The config's `bits` is every layer's width unless `dynamic` overrides it: its keys are
regular expressions tried in order against the module name (re.match, first match wins);
"-:" in front means "left unquantized", "+:" or nothing means "use these fields".
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from fqcompile.errors import FqError

FORMATS = ("gptq", "gptq_v2")
WIDTHS = (2, 4, 8)  # the widths packed whole into int32 words (3-bit packing straddles words)
CONFIG_FILES = (("quantize_config.json", None), ("config.json", "quantization_config"))
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def read_config(folder: Path) -> dict:
    """The quantization config (quantize_config.json, or config.json's quantization_config)."""
    for name, key in CONFIG_FILES:
        path = Path(folder) / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get(key) if key else data
            if data:
                return data
    raise FqError(f"{folder} holds no GPTQ quantization config")


def layer_bits(config: dict, name: str) -> int | None:
    """The width of module `name` under the config (None: left unquantized by a "-:" rule)."""
    for pattern, fields in (config.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, name):
            return None if negative else int(fields.get("bits", config["bits"]))
    return int(config["bits"])


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Ints in [0, 2^bits) -> int32 words of 32 // bits fields along `dim`, lowest field
    first (zero-padded to whole words)."""
    per = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    c = torch.nn.functional.pad(c, (0, -c.shape[-1] % per)).unflatten(-1, (-1, per))
    words = (c << (torch.arange(per) * bits)).sum(-1)  # disjoint fields: the sum is their OR
    return to_int32(words).movedim(-1, dim).contiguous()


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) as the int32 tensors GPTQ stores (same bits)."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> codes (int64), unpacking along `dim` (lowest field first)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per) * bits
    fields = (w.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(w.dim() + 1)])) & (2**bits - 1)
    return fields.flatten(dim, dim + 1)


def _ones(bits: int) -> int:
    """The v1 zero offset: a 1 in every field of a word."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def layer_tensors(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The four tensors of one linear: codes [N, K], zeros [N, G] (ints in [0, 2^bits)),
    scales [N, G] fp16; static groups of `group_size` along K, in column order."""
    if bits not in WIDTHS or checkpoint_format not in FORMATS:
        raise FqError(f"cannot write {bits}-bit layers in GPTQ format '{checkpoint_format}'")
    if codes.min() < 0 or codes.max() >= 2**bits or zeros.min() < 0 or zeros.max() >= 2**bits:
        raise FqError(f"codes or zero points outside [0, {2**bits})")
    qzeros = pack(zeros.T, bits, 1).to(torch.int64)
    if checkpoint_format == "gptq":  # v1: the word minus one per field, borrows included
        qzeros = qzeros - _ones(bits)
    k = codes.shape[1]
    return {"qweight": pack(codes.T, bits, 0), "qzeros": to_int32(qzeros), "scales": scales.T.to(torch.float16).contiguous(),
            "g_idx": (torch.arange(k) // group_size).to(torch.int32)}


def dequantize(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> torch.Tensor:
    """Dense fp32 weight [N, K] of one GPTQ linear (module doc)."""
    qweight, qzeros, scales, g_idx = (tensors[k] for k in PARTS)
    if checkpoint_format == "gptq":  # v1: undo the word-wide "minus one per field"
        qzeros = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + _ones(bits)) & 0xFFFFFFFF
    codes = unpack(qweight, bits, 0)[: len(g_idx)]  # [K, N]
    zeros = unpack(qzeros, bits, 1)[:, : scales.shape[1]]  # [G, N]
    g = g_idx.long()
    return (scales.float()[g] * (codes - zeros[g]).float()).T.contiguous()


def read_tensors(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({linear name: its four GPTQ tensors}, {name: every other tensor}) of a checkpoint folder."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FqError(f"{folder} holds no safetensors files")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name, _, part = key.rpartition(".")
                if part in PARTS:
                    layers.setdefault(name, {})[part] = f.get_tensor(key)
                else:
                    other[key] = f.get_tensor(key)
    incomplete = [n for n, t in layers.items() if len(t) != len(PARTS)]
    if incomplete:
        raise FqError(f"GPTQ layer {incomplete[0]} lacks some of {'/'.join(PARTS)}")
    return layers, other


def read_layers(folder) -> tuple[Iterator[tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(every quantized linear as (name, dense fp32 weight), dequantized one at a time as the
    iterator is consumed, each at its own width: `bits` or `dynamic`'s override; {name: every
    other tensor}) of a GPTQ checkpoint, whose files are read once."""
    folder = Path(folder)
    config = read_config(folder)
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise FqError(f"unknown GPTQ checkpoint_format '{fmt}' (expected one of {', '.join(FORMATS)})")
    layers, other = read_tensors(folder)

    def weights():
        for name, tensors in sorted(layers.items()):
            bits = layer_bits(config, name)
            if bits not in WIDTHS:
                raise FqError(f"GPTQ layer {name}: {bits} bits is not supported (2, 4 or 8)")
            if tensors["qweight"].shape[0] * 32 // bits < len(tensors["g_idx"]):
                raise FqError(f"GPTQ layer {name}: qweight holds fewer than {len(tensors['g_idx'])} {bits}-bit "
                              f"codes per column")
            yield name, dequantize(tensors, bits, fmt)

    return weights(), other


def read(folder) -> dict[str, torch.Tensor]:
    """{linear name: dense fp32 weight} for every quantized linear of a GPTQ checkpoint (read_layers)."""
    return dict(read_layers(folder)[0])
