"""Reading GPTQ checkpoints (as GPTQModel writes them) into dense weights.

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
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from fqcompile.errors import FqError

FORMATS = ("gptq", "gptq_v2")


def read_config(folder: Path) -> dict:
    """The quantization config (quantize_config.json, or config.json's quantization_config)."""
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = Path(folder) / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get(key) if key else data
            if data:
                return data
    raise FqError(f"{folder} holds no GPTQ quantization config")


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> codes (int64), unpacking along `dim` (lowest field first)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per) * bits
    fields = (w.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(w.dim() + 1)])) & (2**bits - 1)
    return fields.flatten(dim, dim + 1)


def dequantize(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> torch.Tensor:
    """Dense fp32 weight [N, K] of one GPTQ linear (module doc)."""
    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    if checkpoint_format == "gptq":  # v1: undo the word-wide "minus one per field"
        offset = sum(1 << (bits * i) for i in range(32 // bits))
        qzeros = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + offset) & 0xFFFFFFFF
    codes = unpack(qweight, bits, 0)[: len(g_idx)]  # [K, N]
    zeros = unpack(qzeros, bits, 1)[:, : scales.shape[1]]  # [G, N]
    g = g_idx.long()
    return (scales.float()[g] * (codes - zeros[g]).float()).T.contiguous()


def read(folder) -> dict[str, torch.Tensor]:
    """{linear name: dense fp32 weight} for every quantized linear of a GPTQ checkpoint."""
    folder = Path(folder)
    config = read_config(folder)
    bits = int(config.get("bits", 0))
    fmt = config.get("checkpoint_format", "gptq")
    if bits not in (2, 4, 8):
        raise FqError(f"GPTQ checkpoints of {bits} bits are not supported (2, 4 or 8)")
    if fmt not in FORMATS:
        raise FqError(f"unknown GPTQ checkpoint_format '{fmt}' (expected one of {', '.join(FORMATS)})")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FqError(f"{folder} holds no safetensors files")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name, _, part = key.rpartition(".")
                if part in ("qweight", "qzeros", "scales", "g_idx"):
                    layers.setdefault(name, {})[part] = f.get_tensor(key)
    incomplete = [n for n, t in layers.items() if len(t) != 4]
    if incomplete:
        raise FqError(f"GPTQ layer {incomplete[0]} lacks some of qweight/qzeros/scales/g_idx")
    return {name: dequantize(t, bits, fmt) for name, t in sorted(layers.items())}
