"""Triton kernels of fqcompile::nested_linear, for CUDA devices.

One kernel, two shapes of work:
  - decode (at most GEMV_MAX_BATCH activation rows): a GEMV-style tile that reduces
    with broadcast multiply-adds, each program owning BLOCK_N output features;
  - prefill (more rows): a GEMM tile that dequantizes a [BLOCK_N, BLOCK_K] block of
    weights in registers and feeds tl.dot.
Both read only the planes passed in, i.e. only those that hold the top b bits, and
decode codes with the format's row-segment rule (formats/nested.py): in a w-bit plane,
column k of a row is in byte k % L, bits (k // L) * w, with L = padded_in * w / 8.

Tested on the CPU under TRITON_INTERPRET=1 (set it before importing this module): the
interpreter's bf16 tl.dot is wrong, so there every dot runs in fp32.
"""

import os

import torch
import triton
import triton.language as tl

from fqcompile.kernels.reference import quantize_activations

GEMV_MAX_BATCH = 8
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _nested_linear(x_ptr, y_ptr, planes, scale_ptr, zero_ptr, M, N, K, padded, groups, group_size, cells, offset,
                   WIDTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        q = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for i in tl.static_range(len(WIDTHS)):  # the top planes, most significant first
            seg = padded * WIDTHS[i] // 8  # bytes per row = columns per segment
            byte = tl.load(planes[i] + rn[:, None] * seg + (rk % seg)[None, :], mask=w_ok, other=0).to(tl.int32)
            q = (q << WIDTHS[i]) | ((byte >> ((rk // seg) * WIDTHS[i])[None, :]) & ((1 << WIDTHS[i]) - 1))
        g = rk // group_size
        s = tl.load(scale_ptr + rn[:, None] * groups + g[None, :], mask=w_ok, other=0.0).to(tl.float32) / cells
        z = tl.load(zero_ptr + rn[:, None] * groups + g[None, :], mask=w_ok, other=0).to(tl.float32) * cells + offset
        w = (q.to(tl.float32) - z) * s  # [BLOCK_N, BLOCK_K], zero where masked (s = 0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT:
            if LOW_PRECISION_DOT:  # fp16/bf16 activations on a GPU: tensor cores
                acc += tl.dot(x, tl.trans(w).to(x.dtype))
            else:  # fp32 activations (and the interpreter): exact fp32, not TF32
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch(x2: torch.Tensor, planes, widths, scale, zero, low: int, offset: float, group_size: int,
           y: torch.Tensor) -> None:
    """y[M, N] = x2[M, K] @ W_b^T, writing every element of y."""
    m, k = x2.shape
    n = scale.shape[0]
    padded = (k + 7) // 8 * 8
    cells = float(2 ** (sum(widths) - low))
    if m <= GEMV_MAX_BATCH:
        block_m, block_n, block_k, dot = max(1, triton.next_power_of_2(m)), 64, 128, False
    else:
        block_m, block_n, block_k, dot = 32, 64, 64, True
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _nested_linear[grid](
        x2, y, tuple(planes), scale, zero, m, n, k, padded, scale.shape[1], group_size, cells, float(offset),
        WIDTHS=tuple(int(w) for w in widths), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT=dot, LOW_PRECISION_DOT=dot and x2.dtype != torch.float32 and not INTERPRET,
    )


def nested_linear(x, planes, widths, scale, zero, low: int, offset: float, group_size: int,
                  int8_activations: bool = False) -> torch.Tensor:
    """The op's CUDA implementation (same signature as kernels/reference.py's nested_linear_reference).

    The int8-activation mode only changes the numbers here (the activations are
    quantized, then the same kernel runs): it exists for the CPU's integer dot products.
    """
    if int8_activations:
        x = quantize_activations(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], scale.shape[0], dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        launch(x2, [p.contiguous() for p in planes], widths, scale.contiguous(), zero.contiguous(), low, offset,
               group_size, y)
    return y.view(*x.shape[:-1], scale.shape[0])
