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
    """RMSNorm as Hugging Face's Llama computes it (in float32, weight applied in x's dtype); a
    float32 weight on lower-precision x is applied in float32 before the cast (Gemma's order:
    fqcompile/slim.py keeps its 1 + w weights in float32)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype is torch.float32 and x.dtype is not torch.float32:
        return (weight * normed).to(x.dtype)
    return weight * normed.to(x.dtype)


def rope_reference(x, cos, sin):
    """RoPE on the first R = cos.shape[-1] dims of each head of x [B, T, heads, D] (the rest pass
    through: partial rotary); cos, sin [B, T, R], sin with its first half negated (attend_reference)."""
    r = cos.shape[-1]
    rot = x[..., :r]
    out = torch.addcmul(rot * cos[:, :, None], rot.roll(r // 2, -1), sin[:, :, None])
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


def attend_reference(qkv, cos, sin, k_cache, v_cache, start, heads, mask=None, q_norm=None, k_norm=None, eps=1e-6,
                     scale=0.0, window=0):
    """One attention step over a KV cache, in place for the cache.

    qkv [B, T, (H + 2 KV) * D] (a fused q/k/v projection); cos, sin [B, T, R] RoPE tables
    for the T positions over the first R <= D dims of a head, sin with its first half negated
    (so rotate_half(x) * sin_hf == roll(x, R/2) * sin); k_cache, v_cache [B, KV, C, D].
    q_norm, k_norm: RMSNorm weights [D] applied to each head of q and k before RoPE (qk-norm).
    The T new tokens are sequence slots start .. start + T - 1, stored at slot % C: the
    cache is a ring once the sequence outgrows it, which only a sliding window allows
    (C >= window + T - 1, so every key a query sees is still there). Every query head
    attends to the slots j < start + T that mask [B, 1, T, start + T] (bool, over sequence
    slots) allows (all if None) and, with a window W, to j > its own slot - W (Hugging
    Face's sliding window); every query must be allowed at least one slot. Scores are
    scaled by `scale` (0: 1/sqrt(D)). Returns [B, T, H * D].
    """
    b, t, _ = qkv.shape
    kv, cap, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[-1]
    length = start + t
    lo = max(0, length - cap)  # the oldest slot still held
    if lo and not (window and cap >= window + t - 1):
        raise RuntimeError(f"attend: slots {start}..{length} outside the cache of {cap} (window {window})")
    q, k, v = qkv.reshape(b, t, heads + 2 * kv, d).split([heads, kv, kv], dim=2)
    if q_norm is not None:
        q = rms_norm_reference(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm_reference(k, k_norm, eps)
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    slots = torch.arange(start, length, device=qkv.device) % cap
    k_cache.index_copy_(2, slots, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.transpose(1, 2).to(v_cache.dtype))
    keys = torch.arange(lo, length, device=qkv.device)
    allowed = None if mask is None else mask[..., lo:length]
    if window:
        near = keys > torch.arange(start, length, device=qkv.device)[:, None] - window  # [T, keys]
        if allowed is None or allowed.dtype is torch.bool:
            allowed = near if allowed is None else allowed & near
        else:  # an additive float mask
            allowed = allowed.masked_fill(~near, float("-inf"))
    if lo:  # wrapped: gather the held slots in sequence order
        k_seen, v_seen = k_cache[:, :, keys % cap], v_cache[:, :, keys % cap]
    else:
        k_seen, v_seen = k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length)
    att = F.scaled_dot_product_attention(q.transpose(1, 2), k_seen, v_seen, attn_mask=allowed, scale=scale or None,
                                         enable_gqa=kv != heads)
    return att.transpose(1, 2).reshape(b, t, heads * d)


def entropy_reference(logits):
    """Entropy in nats of softmax(logits) over the last dimension."""
    # float64 stays float64 (tests compare against it); other types compute and answer in float32
    # (a bfloat16 entropy would blur bucket edges ~1e-3 apart)
    lp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, 0.0).sum(-1)


def gated_reference(gate_up, gelu=False):
    """act(gate) * up for a fused gate/up projection's output [..., 2I] (gate first): act is
    SiLU (SwiGLU), or GELU's tanh approximation with `gelu` (GeGLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
