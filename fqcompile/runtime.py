"""Runtime: load a checkpoint without the original model and generate at a chosen precision."""

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .calibration.data import encode
from .errors import FqError
from .flex_linear import FlexLinear
from .formats import checkpoint as ckpt
from .kernels import backend
from .models import check_causal_lm


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

    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise FqError(f"checkpoint tensors not in the model: {', '.join(result.unexpected_keys[:3])}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FqError(f"checkpoint lacks tensors for: {', '.join(missing[:3])}")
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


def materialize_buffers(model) -> None:
    """Recompute non-persistent buffers (e.g. RoPE inverse frequencies) left on meta.

    transformers' own initializer knows how to compute them, but it also re-initializes
    the module's loaded tensors: those are saved and put back. A buffer it does not
    compute stays NaN and is refused.
    """
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        for name in metas:
            buf = getattr(module, name)
            setattr(module, name, torch.full(buf.shape, float("nan"), dtype=buf.dtype, device="cpu"))
        loaded = {n: t.detach().clone() for n, t in [*module.named_parameters(recurse=False),
                                                     *module.named_buffers(recurse=False)] if n not in metas}
        model._init_weights(module)
        with torch.no_grad():
            for name, value in loaded.items():
                getattr(module, name).copy_(value)
        for name in metas:
            buf = getattr(module, name)
            if buf.is_floating_point() and torch.isnan(buf).any():
                raise FqError(f"cannot rebuild buffer {type(module).__name__}.{name} for this architecture")


def quantize_head(model, group_size: int) -> None:
    """Replace the output head by a round-to-nearest 8-bit copy (group-wise, nested format).

    Checkpoints keep the head in float (DESIGN: the checkpoint says which tensors are
    quantized); on a small model it is the largest single read of a decode step (the
    built-in model's fp32 head is 113 MB, its 4-bit body 53 MB). 8 bits cost the built-in
    model +0.03% perplexity, 4 bits +18% (docs/bench-generate.md), so 8 it is. A tied
    embedding keeps the float weight. Both engines use the same head; the controller leaves it alone.
    The codes are RTN at 8 bits either way; as one plane they are not nested under 4-bit ones
    (the head never runs at 4), which if anything makes them a little closer to the weights.
    """
    bits = 8
    from .formats.nested import Layout, pack_planes, quantize_rtn
    from .kernels import packs_rows

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
    from .formats.nested import dequantize

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


def set_int8_activations(model, on: bool = True) -> None:
    """Quantize every quantized layer's inputs to int8 in blocks of 16 (faster decode on CPUs
    with AVX-512 VNNI or AVX2, where decode reads a repacked copy of the 4-bit slices: see
    FlexLinear.packed; its perplexity cost is measured in docs/kernels.md)."""
    for layer in model.modules():  # a head quantized at load (quantize_head) too
        if isinstance(layer, FlexLinear):
            layer.int8_activations = on


@torch.inference_mode()
def generate(
    loaded: Loaded,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chat: bool = False,
    streamer=None,
    controller=None,
    stop_strings=None,
    engine: str = "auto",
) -> dict:
    """Generate text; returns it with speed, the engine used (and the controller's stats).

    `prompt` may be a list: the prompts are left-padded into one batch. engine: "slim"
    (fqcompile.llama, Llama-family models), "hf" (Hugging Face `generate`, any model and
    stop strings), or "auto": slim where it applies.
    """
    tok = loaded.tokenizer
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = [_prompt_ids(tok, p, chat) for p in prompts]
    name, why = choose_engine(loaded, engine, stop_strings, max(map(len, rows)) + max_new_tokens)
    if name == "slim":
        return _generate_slim(loaded, prompt, rows, max_new_tokens, temperature, top_p, top_k, seed, streamer,
                              controller)
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    if controller is not None:
        controller.reset()
    torch.manual_seed(seed)
    sample = temperature > 0
    start = time.perf_counter()
    out = loaded.model.generate(
        input_ids,
        attention_mask=attention,
        stop_strings=stop_strings,
        tokenizer=tok if stop_strings else None,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=top_k if sample else None,
        pad_token_id=pad,
        streamer=streamer,
    )
    seconds = time.perf_counter() - start
    new = out[:, input_ids.shape[1] :]
    texts = [tok.decode(row, skip_special_tokens=True) for row in new]
    count = int((new != pad).sum()) if len(rows) > 1 else int(new.numel())
    return _result(prompt, texts, count, seconds, "hf", why, controller)


def _result(prompt, texts, count, seconds, engine, why, controller) -> dict:
    result = {
        "text": texts[0] if isinstance(prompt, str) else texts,
        "new_tokens": count,
        "seconds": seconds,
        "tokens_per_s": count / seconds if seconds > 0 else None,
        "engine": engine,
        "engine_reason": why,
    }
    if controller is not None:
        result["controller"] = controller.stats()
    return result


def choose_engine(loaded: Loaded, engine: str = "auto", stop_strings=None, length: int = 0) -> tuple[str, str]:
    """("slim" or "hf", why) for generating sequences of up to `length` tokens from `loaded`."""
    from . import llama

    if engine not in ("auto", "slim", "hf"):
        raise FqError(f"unknown engine '{engine}' (auto, slim or hf)")
    if engine == "hf":
        return "hf", "asked for"
    why = llama.unsupported(loaded.model, length) or ("stop strings" if stop_strings else None)
    if why is None:
        return "slim", "Llama-family model"
    if engine == "slim":
        raise FqError(f"the slim engine does not support {why}; use --engine hf")
    return "hf", f"the slim engine does not support {why}"


def decoder(loaded: Loaded):
    """The slim decoder over `loaded` (built once: fusing the projections re-points their planes)."""
    from . import llama

    if getattr(loaded.model, "_fq_decoder", None) is None:
        # object.__setattr__: not a submodule of the HF model (no duplicate parameters)
        object.__setattr__(loaded.model, "_fq_decoder", llama.Llama(loaded.model))
    return loaded.model._fq_decoder


def _generate_slim(loaded, prompt, rows, max_new_tokens, temperature, top_p, top_k, seed, streamer, controller):
    from . import llama

    tok = loaded.tokenizer
    dec = decoder(loaded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    extra = getattr(loaded.model.generation_config, "eos_token_id", None)
    stops = {tok.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])}
    if controller is not None:
        controller.attach(dec)
        controller.reset()
    start = time.perf_counter()
    new = llama.generate(dec, rows, max_new_tokens, stops - {None}, pad, temperature, top_k, top_p, seed, streamer)
    seconds = time.perf_counter() - start
    texts = [tok.decode(n, skip_special_tokens=True) for n in new]
    count = sum(map(len, new))
    return _result(prompt, texts, count, seconds, "slim", "Llama-family model", controller)


def _prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return encode(tok, prompt)
    if not tok.chat_template:
        raise FqError("this model's tokenizer has no chat template (drop --chat)")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
