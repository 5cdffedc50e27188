"""Checks of the slim decoder shared by its test files: its logits against Hugging Face's."""

import torch

import fqcompile
from fqcompile import decoding, slim

PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome,", "The"]


def hf_logits(model, rows, new, pad):
    """Teacher-forced Hugging Face logits for each row's prompt + generated tokens, left-padded."""
    seqs = [list(r) + n for r, n in zip(rows, new)]
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, width


def check_agreement(loaded, bits, steps, prompts=PROMPTS, dec=None):
    """The worst relative difference of the slim decoder's logits from Hugging Face's over `steps` greedy steps."""
    fqcompile.set_precision(loaded.model, bits)
    tok = loaded.tokenizer
    rows = [tok(p)["input_ids"] for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dec = dec or slim.Decoder(loaded.model)
    seen = []
    new = decoding.generate(dec, rows, steps, stop_ids=[], pad=pad, on_logits=lambda s, lg: seen.append(lg.clone()))
    assert all(len(n) == steps for n in new)
    ref, width = hf_logits(loaded.model, rows, new, pad)
    worst = 0.0
    for step, logits in enumerate(seen):
        # ours at step s predicts token s; HF's prediction for it sits one position earlier
        want = ref[:, width - steps - 1 + step]
        for r in range(len(rows)):
            worst = max(worst, float((logits[r] - want[r]).norm() / want[r].norm()))
    return worst


def greedy_logits(dec, rows, steps, pad):
    seen = []
    decoding.generate(dec, rows, steps, stop_ids=[], pad=pad, on_logits=lambda s, lg: seen.append(lg.clone()))
    return torch.stack(seen)


def stack_and_loop(loaded, prompts, steps, int8_in):
    """Layer 0 at 4 bits, int8 activations on its layers named from `int8_in`: greedy logits
    from the C++ stack and from the per-op loop, with whether the stack served and its plan."""
    for name, layer in loaded.model.model.layers[0].named_modules():
        if hasattr(layer, "set_precision"):
            layer.set_precision(4)
            layer.int8_activations = name.startswith(int8_in)
    tok = loaded.tokenizer
    rows = [tok(p)["input_ids"] for p in prompts]
    dec = slim.Decoder(loaded.model)
    fast = greedy_logits(dec, rows, steps, tok.eos_token_id)
    served, plan = dec.stack is not None, dec.stack_plan()
    dec.use_stack = False
    return fast, greedy_logits(dec, rows, steps, tok.eos_token_id), served, plan
