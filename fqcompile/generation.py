"""Generate: text from a loaded checkpoint, on the slim decoder (fqcompile.slim) or Hugging Face `generate`."""

import time

import torch

from . import decoding, slim
from .errors import FqError
from .loader import Loaded
from .sources import encode


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
    (fqcompile.slim: Llama, Mistral, Qwen2/3, Gemma 3 and Phi-3 models), "hf" (Hugging
    Face `generate`, any model and stop strings), or "auto": slim where it applies.
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
    if engine not in ("auto", "slim", "hf"):
        raise FqError(f"unknown engine '{engine}' (auto, slim or hf)")
    if engine == "hf":
        return "hf", "asked for"
    why = slim.unsupported(loaded.model, length) or ("stop strings" if stop_strings else None)
    if why is None:
        return "slim", "supported architecture"
    if engine == "slim":
        raise FqError(f"the slim engine does not support {why}; use `engine='hf'`")
    return "hf", f"the slim engine does not support {why}"


def decoder(loaded: Loaded):
    """The slim decoder over `loaded` (built once: fusing the projections re-points their planes)."""
    if getattr(loaded.model, "_fq_decoder", None) is None:
        # object.__setattr__: not a submodule of the HF model (no duplicate parameters)
        object.__setattr__(loaded.model, "_fq_decoder", slim.Decoder(loaded.model))
    return loaded.model._fq_decoder


def _generate_slim(loaded, prompt, rows, max_new_tokens, temperature, top_p, top_k, seed, streamer, controller):
    tok = loaded.tokenizer
    dec = decoder(loaded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    extra = getattr(loaded.model.generation_config, "eos_token_id", None)
    stops = {tok.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])}
    if controller is not None:
        controller.attach(dec)
        controller.reset()
    start = time.perf_counter()
    new = decoding.generate(dec, rows, max_new_tokens, stops - {None}, pad, temperature, top_k, top_p, seed, streamer)
    seconds = time.perf_counter() - start
    texts = [tok.decode(n, skip_special_tokens=True) for n in new]
    count = sum(map(len, new))
    return _result(prompt, texts, count, seconds, "slim", "supported architecture", controller)


def _prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return encode(tok, prompt)
    if not tok.chat_template:
        raise FqError("this model's tokenizer has no chat template (leave `chat` off)")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
