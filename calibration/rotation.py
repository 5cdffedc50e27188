"""Offline rotations (incoherence processing): the same function, weights that quantize better.

An orthogonal Q (QᵀQ = I) applied to the residual stream changes no output: RMSNorm
commutes with it once its weight is folded into the next linears (‖xQ‖ = ‖x‖), and every
linear that reads the stream takes W Q, every linear that writes it Qᵀ W. The embeddings
(rows E Q) and the head (W Q) carry it in and out; the head and embeddings are untied
because the final norm is folded into the head only. Each attention head's value/output
pair is rotated the same way with a head_dim-sized rotation. Outlier channels are then
spread over every group of 128 inputs, so the groups' ranges shrink and every rung, the
lowest most, loses less (QuaRot / SpinQuant without online rotations: the runtime is
unchanged).

Q = (H_2^k ⊗ R) D: a normalized Walsh-Hadamard matrix for the largest power-of-two factor
of the width, a random orthogonal R for the rest (576 = 64 x 9), and random signs D,
all drawn from `seed`, so the same model and seed give the same checkpoint.
"""

import torch
from torch import nn

from fqcompile.errors import FqError
from fqcompile.sources import LLAMA_LIKE


def hadamard(n: int) -> torch.Tensor:
    """Normalized Walsh-Hadamard matrix, n a power of two (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / h.shape[0] ** 0.5


def rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random Hadamard-based orthogonal [n, n] matrix (float64), see module doc."""
    power = n & -n  # largest power-of-two factor
    rest = n // power
    r = torch.linalg.qr(torch.randn(rest, rest, dtype=torch.float64, generator=gen))[0].contiguous()
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return torch.kron(hadamard(power), r) * signs


def check_rotatable(model) -> None:
    name = type(model).__name__
    if name not in LLAMA_LIKE:
        raise FqError(f"`rotate` supports {', '.join(LLAMA_LIKE)}, not {name}")


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype).contiguous()


def _reads(linear: nn.Linear, q: torch.Tensor, norm: torch.Tensor | None = None) -> None:
    """The linear reads the rotated stream (after the RMSNorm whose weight is folded in): W diag(g) Q."""
    w = linear.weight.double()
    _set(linear, (w * norm.double() if norm is not None else w) @ q)


def _writes(linear: nn.Linear, q: torch.Tensor) -> None:
    """The linear writes the rotated stream: Qᵀ W (and its bias b Q)."""
    _set(linear, q.T @ linear.weight.double(), linear.bias.double() @ q if linear.bias is not None else None)


@torch.no_grad()
def rotate(model, seed: int = 0) -> dict:
    """Rotate a Llama-like HF model in place (module doc); returns the record for the manifest."""
    check_rotatable(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    q = rotation(cfg.hidden_size, gen)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qv = rotation(head_dim, gen)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = model.model.norm
    head_weight = head.weight.double() * final_norm.weight.double()
    embed.weight.data = (embed.weight.double() @ q).to(embed.weight.dtype)
    head.weight = nn.Parameter((head_weight @ q).to(head.weight.dtype), requires_grad=False)
    cfg.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    final_norm.weight.data.fill_(1.0)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
            _reads(linear, q, layer.input_layernorm.weight)
        for linear in (mlp.gate_proj, mlp.up_proj):
            _reads(linear, q, layer.post_attention_layernorm.weight)
        layer.input_layernorm.weight.data.fill_(1.0)
        layer.post_attention_layernorm.weight.data.fill_(1.0)
        _writes(attn.o_proj, q)
        _writes(mlp.down_proj, q)
        # values per head: v' = v Qv, so o_proj reads each head's slice as Qvᵀ ... = W_o blockdiag(Qv)
        heads_kv = attn.v_proj.out_features // head_dim
        blocks_kv = torch.block_diag(*[qv] * heads_kv)
        v = attn.v_proj
        _set(v, blocks_kv.T @ v.weight.double(), v.bias.double() @ blocks_kv if v.bias is not None else None)
        heads = attn.o_proj.in_features // head_dim
        _set(attn.o_proj, attn.o_proj.weight.double() @ torch.block_diag(*[qv] * heads))
    return {"kind": "hadamard", "seed": seed, "hidden": cfg.hidden_size, "head_dim": head_dim}
