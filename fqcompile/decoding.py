"""Generation with the slim decoder: a batch of left-padded prompts decoded step by step
(greedy or sampled), with Hugging Face's positions for left padding."""

import torch

from .slim import Decoder


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: greedy at temperature 0."""
    if temperature <= 0:
        if logits.dtype is torch.float32 and logits.device.type == "cpu":  # numpy's argmax: ~8 us, torch's ~80
            return torch.from_numpy(logits.numpy().argmax(-1))
        return logits.max(-1).indices  # the first maximum, as argmax, at a third of its cost
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@torch.inference_mode()
def generate(dec: Decoder, rows: list[list[int]], max_new_tokens: int, stop_ids, pad: int, temperature=0.0,
             top_k=0, top_p=1.0, seed=0, streamer=None, on_logits=None) -> list[list[int]]:
    """Decode every prompt (token lists; left-padded into one batch); returns the new tokens.

    A row stops at a token in `stop_ids` (kept) or after max_new_tokens. positions follow
    Hugging Face's convention for left padding (each row's first real token is position 0),
    so the logits agree with its `generate`. on_logits(step, logits [B, V]) sees every step.
    """
    b, width = len(rows), max(map(len, rows))
    total = width + max_new_tokens
    dec.setup_cache(b, total, chunk=width)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    keys = torch.zeros(b, total, dtype=torch.bool)
    keys[:, :width] = real
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding queries attend to themselves only, so no row of the mask is empty (no NaN).
    mask = (causal & keys[:, None, :width]) | torch.eye(width, dtype=torch.bool)
    logits = dec(ids, positions, 0, mask[:, None]).logits[:, -1]
    gen = torch.Generator().manual_seed(seed)
    stop = set(stop_ids)
    done = [False] * b  # per-step bookkeeping in plain Python: a dozen tiny tensor ops would cost more
    out = [[] for _ in range(b)]
    last = positions[:, -1:].tolist()
    padded = not bool(real.all())  # without padding, every decode query sees every cache slot: no mask
    if streamer is not None:
        streamer.put(ids[:1])  # Hugging Face streamers expect (and may skip) the prompt first
    for step in range(max_new_tokens):
        if on_logits is not None:
            on_logits(step, logits)
        token = [pad if d else t for d, t in zip(done, pick(logits, temperature, top_k, top_p, gen).tolist())]
        for r in range(b):
            if not done[r]:
                out[r].append(token[r])
                done[r] = token[r] in stop
        if streamer is not None:
            streamer.put(torch.tensor(token[:1]))
        if all(done) or step == max_new_tokens - 1:
            break
        slot = width + step
        mask = None
        if padded:
            keys[:, slot] = True
            mask = keys[:, None, None, :slot + 1]
        logits = dec(torch.tensor(token)[:, None], torch.tensor(last) + (step + 1), slot, mask).logits[:, -1]
    if streamer is not None:
        streamer.end()
    return out
