"""The custom ops fqcompile::nested_linear, ::rms_norm, ::attend, ::gated and ::entropy, and which
implementation serves each device.

nested_linear is every quantized linear; rms_norm, attend and gated are the rest of a
decode step that costs more in dispatch than in arithmetic (fqcompile/slim.py); entropy is
the precision controller's signal, over the whole vocabulary at every step. Each is one op,
so torch.compile traces around it (fake kernels) and the dispatcher picks the
implementation by the device: the C++ kernels on CPU, Triton on CUDA (nested_linear),
the torch reference everywhere else and whenever the fast one cannot be had (no
compiler, no Triton): then a one-line warning says so, once. The references define
what each op computes; the tests hold the fast ones to them.
"""

import os
import sys

import torch

from fqcompile.kernels.reference import (attend_reference, entropy_reference, nested_linear_reference,
                                         gated_reference, rms_norm_reference)

SCHEMA = ("nested_linear(Tensor x, Tensor[] planes, int[] widths, Tensor scale, Tensor zero, "
          "int low, float offset, int group_size, bool int8_activations=False) -> Tensor")
LIB = torch.library.Library("fqcompile", "DEF")
LIB.define(SCHEMA)
LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
LIB.define("attend(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
           "int heads, Tensor? mask=None, Tensor? q_norm=None, Tensor? k_norm=None, float eps=1e-6, "
           "float scale=0.0, int window=0) -> Tensor")
LIB.define("entropy(Tensor logits) -> Tensor")
LIB.define("gated(Tensor gate_up, bool gelu=False) -> Tensor")


# Serves every device that has no kernel of its own.
LIB.impl("nested_linear", nested_linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fqcompile::nested_linear")
def _fake(x, planes, widths, scale, zero, low, offset, group_size, int8_activations=False):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


LIB.impl("rms_norm", rms_norm_reference, "CompositeExplicitAutograd")
LIB.impl("gated", gated_reference, "CompositeExplicitAutograd")
LIB.impl("entropy", entropy_reference, "CompositeExplicitAutograd")
LIB.impl("attend", attend_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fqcompile::rms_norm")
def _fake_rms(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("fqcompile::gated")
def _fake_gated(gate_up, gelu=False):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.register_fake("fqcompile::entropy")
def _fake_entropy(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("fqcompile::attend")
def _fake_attend(qkv, cos, sin, k_cache, v_cache, start, heads, mask=None, q_norm=None, k_norm=None, eps=1e-6,
                 scale=0.0, window=0):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], heads * k_cache.shape[-1])


_ready: dict[str, str] = {}  # device type -> name of the implementation serving it


def _say(message: str) -> None:
    print(f"fqcompile: {message}", file=sys.stderr)


def _fast(device_type: str) -> str:
    """Install the fast implementation for a device type; return its name."""
    if device_type == "cpu":
        from fqcompile.kernels import cpu

        cpu.load()
        return "cpu-cpp"
    if device_type == "cuda":
        from fqcompile.kernels import triton_nested

        LIB.impl("nested_linear", triton_nested.nested_linear, "CUDA")
        return "triton"
    raise RuntimeError(f"no fast kernel for {device_type} devices")


def backend(device: torch.device) -> str:
    """The implementation serving `device` ("cpu-cpp", "triton" or "reference"), set up on first use.

    FQCOMPILE_KERNELS=reference forces the reference path (for comparisons and debugging).
    """
    kind = device.type
    if kind not in _ready:
        if os.environ.get("FQCOMPILE_KERNELS", "") == "reference":
            _ready[kind] = "reference"
        else:
            try:
                _ready[kind] = _fast(kind)
            except Exception as exc:  # any failure to build or import: the reference still works
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                _say(f"fast {kind} kernels unavailable ({reason[:160]}); using the slower torch reference")
                _ready[kind] = "reference"
    return _ready[kind]


_OP = torch.ops.fqcompile.nested_linear.default  # resolved once: a decode step makes ~200 calls
_PACKED = None  # torch.ops.fqcompile.packed_linear, once the C++ kernels define it (pack_rows ran)


def _impl(x) -> str:
    # x.is_cpu is a cheap flag; x.device builds an object (~0.3 us, x ~300 calls a decode step)
    return _ready.get("cpu") or backend(x.device) if x.is_cpu else _ready.get(x.device.type) or backend(x.device)


def nested_linear(x, planes, widths, scale, zero, low: int, offset: float, group_size: int,
                  int8_activations: bool = False) -> torch.Tensor:
    if _impl(x) == "reference":
        return nested_linear_reference(x, planes, widths, scale, zero, low, offset, group_size, int8_activations)
    return _OP(x, planes, widths, scale, zero, low, offset, group_size, int8_activations)


MAX_PACKED_BATCH = 8  # kernels/cpu_ops.h kMaxPackedBatch


def pack_rows(planes, widths, scale, zero, in_features: int, group_size: int) -> list:
    """A slice's planes packed 8 rows at a time for the CPU int8-activation decode kernel:
    [codes, scale, zero] for one plane of 4 or 8 bits, [top, bottom, scale, zero] for two of 4;
    [] where that kernel does not apply (other widths, not the C++ CPU kernels, or a build
    whose int8 kernels read the nested planes directly: see docs/kernels.md). The same bytes
    as the planes, ordered for the kernel; unpack_rows gives a plane back."""
    if list(widths) not in ([4], [8], [4, 4]) or not planes[0].is_cpu or backend(planes[0].device) != "cpu-cpp":
        return []
    packs = [torch.ops.fqcompile.pack_rows(plane, scale, zero, in_features, group_size) for plane in planes]
    if not packs[0]:
        return []
    return [p[0] for p in packs] + packs[0][1:]


def unpack_rows(codes: torch.Tensor, out_features: int) -> torch.Tensor:
    """The nested plane one of pack_rows' code tensors was made from (bit for bit)."""
    return torch.ops.fqcompile.unpack_rows(codes, out_features)


def packs_rows() -> bool:
    """Whether this machine's C++ kernels have the packed int8 decode kernel (pack_rows gives something)."""
    probe = torch.zeros(8, 8, dtype=torch.uint8)  # 8 rows of 16 columns, one group
    return bool(pack_rows([probe], [4], torch.ones(8, 1, dtype=torch.half), torch.zeros(8, 1, dtype=torch.uint8), 16, 16))


def packed_linear(x, packed, out_features: int, low: int, offset: float, group_size: int) -> torch.Tensor:
    """W x^ (int8 activations) over pack_rows' tensors: what nested_linear computes in that mode
    (its kernel up to MAX_PACKED_BATCH rows of x; dequantized tiles and a matmul beyond)."""
    global _PACKED
    if _PACKED is None:
        _PACKED = torch.ops.fqcompile.packed_linear.default
    return _PACKED(x, packed, out_features, low, offset, group_size)


_RMS, _ATTEND, _ENTROPY, _GATED = (torch.ops.fqcompile.rms_norm.default, torch.ops.fqcompile.attend.default,
                                   torch.ops.fqcompile.entropy.default, torch.ops.fqcompile.gated.default)


def _fast_float(x) -> bool:
    """The C++ glue kernels serve float32 on CPU; everything else takes the reference."""
    return x.dtype is torch.float32 and _impl(x) == "cpu-cpp"


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    if _fast_float(x) and weight.dtype is torch.float32:
        return _RMS(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def attend(qkv, cos, sin, k_cache, v_cache, start: int, heads: int, mask=None, q_norm=None, k_norm=None,
           eps: float = 1e-6, scale: float = 0.0, window: int = 0) -> torch.Tensor:
    """See attend_reference; the C++ kernel takes float32 throughout, contiguous caches and a bool mask."""
    norms = [n for n in (q_norm, k_norm) if n is not None]
    if (_fast_float(qkv) and all(t.dtype is torch.float32 for t in (cos, sin, k_cache, v_cache, *norms))
            and k_cache.is_contiguous() and v_cache.is_contiguous() and (mask is None or mask.dtype is torch.bool)):
        return _ATTEND(qkv, cos, sin, k_cache, v_cache, start, heads, mask, q_norm, k_norm, eps, scale, window)
    return attend_reference(qkv, cos, sin, k_cache, v_cache, start, heads, mask, q_norm, k_norm, eps, scale, window)


def gated(gate_up, gelu: bool = False) -> torch.Tensor:
    """act(gate) * up (see gated_reference)."""
    return _GATED(gate_up, gelu) if _fast_float(gate_up) else gated_reference(gate_up, gelu)


def entropy(logits) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dimension."""
    return _ENTROPY(logits) if _fast_float(logits) else entropy_reference(logits)
