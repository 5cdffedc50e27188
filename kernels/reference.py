"""The pure-torch references of every fqcompile op: what each op computes, the oracle every faster
kernel is tested against, and the implementation wherever no fast one can be had."""

import math

import torch
import torch.nn.functional as F

from fqcompile.formats.nested import dequantize_planes


ACT_BLOCK = 16  # columns per activation scale (docs/kernels.md: why 16)


def quantize_activations(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """x^ of the int8-activation mode: per row and block of `block` input columns,
    s = max|x| / 127 and x^ = s * round(x / s), rounding half to even, in fp32.
    """
    k = x.shape[-1]
    blocks = math.ceil(k / block)
    xf = F.pad(x.float(), (0, blocks * block - k)).unflatten(-1, (blocks, block))
    s = xf.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    xhat = torch.round(xf / s).clamp(-127, 127) * s
    return xhat.flatten(-2)[..., :k].to(x.dtype)


def nested_linear_reference(x, planes, widths, scale, zero, low, offset, group_size, int8_activations=False):
    """Dequantize the slice held by `planes`, then F.linear: the oracle for every kernel.

    int8_activations: the activations are first quantized in blocks (quantize_activations).
    """
    if int8_activations:
        x = quantize_activations(x)
    weight = dequantize_planes(planes, widths, scale, zero, low, offset, group_size, x.shape[-1], dtype=x.dtype)
    return F.linear(x, weight)


def rms_norm_reference(x, weight, eps):
    """RMSNorm as Hugging Face's Llama computes it (in float32, weight applied in x's dtype)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attend_reference(qkv, cos, sin, k_cache, v_cache, start, heads, mask=None):
    """One attention step over a KV cache, in place for the cache.

    qkv [B, T, (H + 2 KV) * D] (a fused q/k/v projection); cos, sin [B, T, D] RoPE tables
    for the T positions, sin with its first half negated (so rotate_half(x) * sin_hf ==
    roll(x, D/2) * sin); k_cache, v_cache [B, KV, L, D]. RoPE goes on q and k, k and v
    into cache slots start .. start + T - 1, and every query head attends to slots
    [0, start + T) where mask [B, 1, T, start + T] (bool) allows (all of them if None;
    every query must be allowed at least one slot). Returns [B, T, H * D].
    """
    b, t, _ = qkv.shape
    kv, d = k_cache.shape[1], k_cache.shape[-1]
    qkv = qkv.reshape(b, t, heads + 2 * kv, d)
    qk = qkv[:, :, :heads + kv]
    qk = torch.addcmul(qk * cos[:, :, None], qk.roll(d // 2, -1), sin[:, :, None])
    k_cache.narrow(2, start, t).copy_(qk[:, :, heads:].transpose(1, 2))
    v_cache.narrow(2, start, t).copy_(qkv[:, :, heads + kv:].transpose(1, 2))
    att = F.scaled_dot_product_attention(qk[:, :, :heads].transpose(1, 2), k_cache.narrow(2, 0, start + t),
                                         v_cache.narrow(2, 0, start + t), attn_mask=mask, enable_gqa=kv != heads)
    return att.transpose(1, 2).reshape(b, t, heads * d)


def entropy_reference(logits):
    """Entropy in nats of softmax(logits) over the last dimension."""
    # float64 stays float64 (tests compare against it); other types compute and answer in float32
    # (a bfloat16 entropy would blur bucket edges ~1e-3 apart)
    lp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, 0.0).sum(-1)


def silu_mul_reference(gate_up):
    """silu(gate) * up for a fused gate/up projection's output [..., 2I] (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
