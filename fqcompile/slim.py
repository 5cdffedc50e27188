"""A compact decoder over fqcompile checkpoints (in the gpt-fast manner): Llama, Mistral, Qwen2/3,
Gemma 3 and Phi-3.

It shares the loaded checkpoint's modules and tensors (no copies): the FlexLinear layers,
embeddings, norms, head and Hugging Face's rotary embedding (so every RoPE scaling variant
means what it means there). What it drops is the framework around them: per layer a decode
step is RMSNorm, one fused q/k/v call, one `attend` (qk-norm, RoPE, the KV-cache write and
attention over the preallocated cache), the o call, RMSNorm, one fused gate/up call, `gated`
(SwiGLU or GeGLU) and the down call: each one op (kernels/ops.py). The families differ from
Llama only in what a layer's description says (`Decoder.__init__`): qk-norm (Qwen3, Gemma 3),
norms after attention and MLP and (1 + w) norm weights (Gemma 3), a per-layer sliding window
and RoPE table (Gemma 3's local and global layers), a query scale (Gemma 3), projections
fused in the checkpoint (Phi-3). A sliding-window layer's cache is a ring of window + chunk - 1
slots (chunk: the most tokens one call feeds, the prompt in `decoding.generate`), so
generation goes on past the window in bounded memory.
On the CPU in float32 the whole stack of layers is one call instead (fqcompile.Stack,
kernels/cpu_stack.cpp: the same kernels without ~300 dispatches a step, about a third of a
small model's step); its plan, each projection's precision, is read from the layers again
whenever a layer's settings changed since the last step (flex_linear.changes), so the
controller works unchanged. Under an error-estimate policy the stack also gets the gated
slots' rules and runs them itself for one row (Rule; the controller counts its choices);
per-linear gates on a fused slot, and batches, run in the per-op loop.
Fusion concatenates the layers' planes once and turns the separate layers' planes into row
views of the fused ones, so memory does not grow and the controller still switches every
layer by name; a fused call is used whenever its parts run at the same precision.

Forward takes `input_ids` like a Hugging Face model and returns an object with `.logits`,
so the precision controller's hooks work on it unchanged. (torch.compile of the step is
not used: docs/kernels.md says why.)
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .errors import FqError
from . import flex_linear
from .flex_linear import FlexLinear, fuse
from .kernels.ops import attend, backend, gated, rms_norm

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
             "Phi3ForCausalLM")
UNIT_OFFSET_NORMS = ("Gemma3ForCausalLM",)  # RMSNorm scales by (1 + w)
ACTIVATIONS = {"silu": False, "swish": False, "gelu_pytorch_tanh": True, "gelu_new": True}  # name -> GeGLU
SLOTS = ("qkv", "o", "gate_up", "down")  # the projections of a layer, in kernels/cpu_stack.cpp's order


def windows(cfg) -> list[int | None]:
    """Each layer's sliding attention window in tokens (None: it attends to everything)."""
    size = getattr(cfg, "sliding_window", None) or None
    if getattr(cfg, "use_sliding_window", True) is False:  # Qwen2 keeps a window size it does not use
        size = None
    types = getattr(cfg, "layer_types", None)
    if types:  # interleaved local and global layers (Gemma 3, Qwen2/3 with max_window_layers)
        return [size if kind == "sliding_attention" else None for kind in types]
    return [size] * cfg.num_hidden_layers


def activation(cfg) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def rope_types(model) -> dict:
    """RoPE table kind (a layer type, or None for one table) -> Hugging Face's rope type."""
    kinds = model.model.rotary_emb.rope_type
    return kinds if isinstance(kinds, dict) else {None: kinds}


def projections(block) -> tuple[list, nn.Module, list, nn.Module]:
    """A block's (q/k/v layers, o, gate/up layers, down): one layer each where the checkpoint fuses them (Phi-3)."""
    att, mlp = block.self_attn, block.mlp
    qkv = [att.qkv_proj] if hasattr(att, "qkv_proj") else [att.q_proj, att.k_proj, att.v_proj]
    gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
    return qkv, att.o_proj, gate_up, mlp.down_proj


def unsupported(model, length: int = 0) -> str | None:
    """Why `model` cannot run on this decoder for sequences of `length` tokens (None if it can)."""
    cfg = model.config
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"architecture {name} (supported: {', '.join(SUPPORTED)})"
    kinds = set(rope_types(model).values())
    if "dynamic" in kinds:
        return "dynamic RoPE scaling (its frequencies depend on the sequence length)"
    if "longrope" in kinds:
        original = cfg.rope_parameters.get("original_max_position_embeddings") or cfg.original_max_position_embeddings
        if length > original:  # Hugging Face switches to the long factors there and recomputes the whole cache
            return f"long RoPE beyond its original length ({length} tokens, original {original})"
    if activation(cfg) not in ACTIVATIONS:
        return f"activation {activation(cfg)}"
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_bidirectional_attention", False):
        return "attention logit soft-capping or bidirectional attention"
    for blk in model.model.layers:
        qkv, o, _, _ = projections(blk)
        if not all(isinstance(p, FlexLinear) for p in [*qkv, o]):
            return "attention projections that are not quantized"
    return None


class Projections(nn.Module):
    """Several FlexLinears on one input, outputs side by side: one fused call when they agree on precision."""

    def __init__(self, parts: list[FlexLinear]):
        super().__init__()
        self.parts = parts  # plain list: the modules stay registered (and named) in the HF model
        self.fused = fuse(parts)

    def forward(self, x):
        for p in self.parts:  # the parts' decisions first (they share the input)
            if p.gate is not None:
                p.gate(x)
        first = self.parts[0]
        bits = first.precision
        if type(bits) is int and all(type(b) is int and b == bits for b in [p.precision for p in self.parts]):
            return self.fused.run(x, bits, first.int8_activations)
        return torch.cat([p.compute(x) for p in self.parts], dim=-1)


class Rule(NamedTuple):
    """A stack slot whose precision a gate decides: itself (follow -1) or as slot `follow` of its layer."""

    layer: int
    slot: int
    follow: int
    gate: object  # the controller's Gate
    row: int  # the slot's row in the stack's `chosen`


@dataclass
class Output:
    logits: torch.Tensor  # [batch, positions returned, vocab]


class Decoder(nn.Module):
    """Decoder over a loaded checkpoint's model (see `unsupported`)."""

    def __init__(self, model):
        super().__init__()
        why = unsupported(model)
        if why:
            raise FqError(f"the slim decoder does not support {why}")
        cfg = model.config
        self.hf = [model]  # not a submodule: its parameters are not this module's
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        pre_scale = getattr(cfg, "query_pre_attn_scalar", None)  # Gemma scales scores by it, not by head_dim
        self.scale = float(pre_scale) ** -0.5 if pre_scale else self.head_dim ** -0.5
        self.gelu = ACTIVATIONS[activation(cfg)]
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.unit_offset = type(model).__name__ in UNIT_OFFSET_NORMS
        inner = model.model
        self.embed = inner.embed_tokens  # Gemma's scales by sqrt(hidden) itself
        self.rotary = inner.rotary_emb
        self.kinds = list(rope_types(model))  # RoPE tables, one per layer type where they differ (Gemma 3)
        types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
        self.final_norm = inner.norm
        self.head = model.get_output_embeddings()
        self.blocks = []
        for blk, window, kind in zip(inner.layers, windows(cfg), types):
            qkv, o, gate_up, down = projections(blk)
            after = hasattr(blk, "pre_feedforward_layernorm")  # Gemma: norms before and after each sublayer
            att = blk.self_attn
            self.blocks.append({
                "norms": {"attn_in": blk.input_layernorm, "attn_out": blk.post_attention_layernorm if after else None,
                          "mlp_in": blk.pre_feedforward_layernorm if after else blk.post_attention_layernorm,
                          "mlp_out": blk.post_feedforward_layernorm if after else None,
                          "q_norm": getattr(att, "q_norm", None), "k_norm": getattr(att, "k_norm", None)},
                "window": window or 0, "rope": self.kinds.index(kind if kind in self.kinds else None),
                "qkv": Projections(qkv) if len(qkv) > 1 else qkv[0], "o": o,
                "gate_up": Projections(gate_up) if len(gate_up) > 1 else gate_up[0], "down": down,
            })
        # Per stack slot (qkv, o, gate_up, down): the FlexLinear the kernel runs and the layers
        # whose precision it follows (the parts of a fused one).
        self.slots = [[(blk[name].fused, blk[name].parts) if isinstance(blk[name], Projections) else (blk[name], [blk[name]])
                       for name in SLOTS] for blk in self.blocks]
        self.caches = self.stack = None
        self.use_stack = True  # False: always the per-op loop (what the stack must agree with)
        self._planned = (None, None)  # (flex_linear.changes, plan) when the plan was last read
        self._synced = {}  # (layer, slot) -> the int8 flag the stack's tensors for it were last set for
        self._ruled = None  # the gates whose rules the stack holds (_install_rules)
        self._chosen = torch.zeros(len(self.blocks) * len(SLOTS), 2, dtype=torch.float64)  # the stack's decisions

    def _weight(self, norm):
        """A norm's weight as the kernels apply it (a plain tensor: not a parameter of this module)."""
        if norm is None:
            return None
        w = norm.weight.detach()
        return w.float() + 1 if self.unit_offset else w  # float32, as Gemma's norm adds it

    def setup_cache(self, batch: int, length: int, chunk: int | None = None) -> None:
        """Preallocate the KV caches (and the RoPE tables) for `batch` rows of up to `length` tokens,
        fed at most `chunk` tokens a call (default: all at once). A sliding-window layer holds
        window + chunk - 1 slots (a ring), enough for any such call."""
        why = unsupported(self.hf[0], length)
        if why:  # e.g. long RoPE past its original length: Hugging Face would recompute the cache there
            raise FqError(f"the slim decoder does not support {why}; use `engine='hf'`")
        chunk = length if chunk is None else chunk
        dtype, device = self.final_norm.weight.dtype, self.final_norm.weight.device
        self.caches = []
        for blk in self.blocks:
            slots = min(length, blk["window"] + chunk - 1) if blk["window"] else length
            shape = (batch, self.kv_heads, slots, self.head_dim)
            self.caches.append((torch.zeros(shape, dtype=dtype, device=device),
                                torch.zeros(shape, dtype=dtype, device=device)))
        # The norms' weights as the kernels take them (Gemma's 1 + w), read again at every setup.
        self.norms = [{k: self._weight(m) for k, m in blk["norms"].items()} for blk in self.blocks]
        self.final = self._weight(self.final_norm)
        probe = torch.zeros(1, 1, self.head_dim, dtype=dtype, device=device)
        positions = torch.arange(length, device=device)[None]
        self.tables = []
        for kind in self.kinds:
            cos, sin = self.rotary(probe, positions) if kind is None else self.rotary(probe, positions, kind)
            half = cos.shape[-1] // 2  # of the rotated dims (partial rotary: fewer than head_dim)
            # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated), bit for bit
            self.tables.append((cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)))  # [length, R]
        self.stack = self._build_stack() if self.use_stack else None
        # The new stack has no projections yet: the next plan read gives it each slot's tensors.
        self._synced, self._planned, self._ruled = {}, (None, None), None

    def _apply(self, fn, *args, **kwargs):  # .to() / .float(): the stack holds the old tensors until the next setup
        self.stack = None
        return super()._apply(fn, *args, **kwargs)

    def _build_stack(self):
        """The C++ stack (kernels/cpu_stack.cpp) over these tensors, or None where the per-op loop must run.

        Built with every cache setup, so it never outlives a repoint or a .to(). Its
        projections' tensors are set by _read_plan: packed rows for a slot in int8 mode
        where they apply (the layer then holds nothing else), else the nested planes.
        """
        ref = self.final
        if ref.dtype is not torch.float32 or not ref.is_cpu or backend(ref.device) != "cpu-cpp":
            return None
        stack = torch.classes.fqcompile.Stack(len(self.blocks), self.eps, self.heads, self.scale, self.gelu)
        for i, (blk, norms, (k, v)) in enumerate(zip(self.blocks, self.norms, self.caches)):
            stack.set_layer(i, norms["attn_in"], norms["attn_out"], norms["mlp_in"], norms["mlp_out"], norms["q_norm"],
                            norms["k_norm"], blk["window"], blk["rope"])
            stack.set_cache(i, k, v)
        return stack

    def stack_plan(self):
        """Every stack slot's (precision, int8 flag) as two lists, and the gated slots (each slot
        whose rule decides it, with the controller's Gate); None if some slot needs the per-op loop.

        Read again only after some layer's settings changed (the controller changes them
        only when a step's plan differs from the last one).
        """
        changes, plan = self._planned
        if changes != flex_linear.changes:
            plan = self._read_plan()
            self._planned = (flex_linear.changes, plan)
        return plan

    def _read_plan(self):
        bits, int8, changed = [], [], []
        owner = {}  # id(layer) -> the gate deciding its unit
        for slots in self.slots:
            for _, parts in slots:
                for p in parts:
                    if p.gate is not None:
                        owner.update((id(layer), p.gate) for layer in p.gate.layers)
        rules, leader = [], {}  # (layer, slot, follow, gate); gate -> (layer, slot) it decides in
        for i, slots in enumerate(self.slots):
            for s, (run, parts) in enumerate(slots):
                first = parts[0]
                b, q = first.precision, first.int8_activations
                if type(b) is not int or first.dense:
                    return None
                for p in parts[1:]:
                    if type(p.precision) is not int or p.precision != b or p.int8_activations != q or p.dense:
                        return None
                gate = owner.get(id(first))
                if any(owner.get(id(p)) is not gate for p in parts):
                    return None  # parts decided apart (per-linear units of a fused slot): the per-op loop
                if gate is not None:
                    if gate.layers[0] in parts:
                        leader[gate] = (i, s)
                        rules.append(Rule(i, s, -1, gate, i * len(SLOTS) + s))
                    elif leader.get(gate, (None,))[0] == i:  # a block unit's later projection
                        rules.append(Rule(i, s, leader[gate][1], gate, i * len(SLOTS) + s))
                    else:
                        return None
                bits.append(b)
                int8.append(int(q))
                if self.stack is not None and self._synced.get((i, s)) != q:
                    changed.append((i, s, run, q))
        for i, s, run, q in changed:  # int8: the packed rows where they apply; float: the nested planes
            if q:
                run.pack()
            else:
                run.unpack()
            for b in run.precisions:
                _set_linear(self.stack, i, s, run, b)
            self._synced[i, s] = q
        self._install_rules(rules)
        return bits, int8, rules

    def _install_rules(self, rules) -> None:
        """Give the stack the rules of these gated slots (only when they differ from what it holds)."""
        if self.stack is None or rules == self._ruled:  # the gates themselves compared, not their id()
            return
        self.stack.clear_rules()
        for r in rules:
            for k, (edges, bits) in enumerate(r.gate.rules):
                self.stack.set_rule(r.layer, r.slot, k, r.follow, [float(e) for e in edges] if r.follow < 0 else [],
                                    list(bits) if r.follow < 0 else [])
        self._ruled = rules

    @torch.inference_mode()
    def forward(self, input_ids, positions, start: int, mask=None, all_logits: bool = False) -> Output:
        """One step for every row: the T new tokens are sequence slots start .. start + T - 1.

        input_ids, positions (RoPE positions): [B, T]; mask: [B, 1, T, L] bool over the
        first L = start + T sequence slots (True = attend), or None when every row attends to
        all of them (one query per row, no padding). Sliding windows apply on top.
        """
        x = self.embed(input_ids)
        tables = [(cos[positions], sin[positions]) for cos, sin in self.tables]  # each [B, T, R]
        plan = self.stack_plan() if self.stack is not None and x.dtype is torch.float32 else None
        bucket, controller = -1, None
        if plan is not None and plan[2]:  # gated slots: the stack decides them for one row in a decode step
            controller = plan[2][0].gate.controller
            if controller.buckets is not None:
                bucket = controller.buckets[0] if len(controller.buckets) == 1 else None
        if plan is not None and bucket is not None and (mask is None or mask.dtype is torch.bool):
            x = self.stack.forward(x, [c for c, _ in tables], [s for _, s in tables], start, *plan[:2], mask, bucket,
                                   self._chosen)
            if bucket >= 0:
                controller.count_stack(plan[2], self._chosen)
        else:
            x = self._layers(x, tables, start, mask)
        logits = self.head(rms_norm(x if all_logits else x[:, -1:], self.final, self.eps))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return Output(logits)

    def _layers(self, x, tables, start: int, mask):
        """The per-op loop: what the C++ stack computes, for any dtype, device and precision mix."""
        for blk, norms, (k_cache, v_cache) in zip(self.blocks, self.norms, self.caches):
            qkv = blk["qkv"].forward(rms_norm(x, norms["attn_in"], self.eps))
            att = attend(qkv, *tables[blk["rope"]], k_cache, v_cache, start, self.heads, mask, norms["q_norm"],
                         norms["k_norm"], self.eps, self.scale, blk["window"])
            x = x + self._normed(blk["o"].forward(att), norms["attn_out"])
            gate_up = blk["gate_up"].forward(rms_norm(x, norms["mlp_in"], self.eps))
            x = x + self._normed(blk["down"].forward(gated(gate_up, self.gelu)), norms["mlp_out"])
        return x

    def _normed(self, y, weight):
        return y if weight is None else rms_norm(y, weight, self.eps)


def _set_linear(stack, i: int, slot: int, run, bits: int) -> None:
    """Give the C++ stack slot `slot` of layer i the tensors `run` holds for `bits` (packed or nested)."""
    packed = run.packed(bits)
    args = ([], [], run.scale, run.zero, *run.layout.slice_args(bits)) if packed else run.call_args(bits)
    stack.set_linear(i, slot, bits, *args, run.bias.data if run.bias is not None else None, packed)
