"""Load a GPTQ checkpoint with GPTQModel or with transformers' GPTQ integration, on CPU:
perplexity on given token ids, and a greedy generation.

Runs in GPTQModel's own venv (docs/gptq.md says how to make it; transformers' integration
also needs optimum there); `scripts/gptq_interop.py` calls it:

    /work/gptqmodel-venv/bin/python scripts/gptqmodel_eval.py --model DIR --tokens eval.json \
        --loader gptqmodel --out result.json

--tokens is a JSON list of token-id lists; perplexity is exp(mean NLL) over positions
1..T-1 of every sample, as `fqcompile eval` scores them. Compute dtype --dtype (GPTQModel's
CPU kernel takes float16 or bfloat16; float16 keeps more mantissa, bfloat16 is faster here).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only, even where a GPU exists
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # GPTQModel's torch kernel recompiles per shape otherwise


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="GPTQ checkpoint folder")
    p.add_argument("--tokens", required=True, help="JSON file: list of token-id lists")
    p.add_argument("--loader", choices=("gptqmodel", "transformers"), default="gptqmodel")
    p.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args()

    import torch

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if args.loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        wrapper = GPTQModel.load(args.model, backend=BACKEND.TORCH, device="cpu", dtype=dtype)
        model, tokenizer = wrapper.model, wrapper.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

        # the same kernel as above: transformers' automatic choice takes an int4 CPU kernel that
        # refuses in_features not divisible by the group size (576 with 128)
        bits = json.loads((Path(args.model) / "config.json").read_text())["quantization_config"]["bits"]
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map="cpu", dtype=dtype,
                                                     quantization_config=GPTQConfig(bits=bits, backend="torch"))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    loaded = time.perf_counter()
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})

    samples = json.loads(Path(args.tokens).read_text())
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for sample in samples:
            ids = torch.tensor([sample])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            nll -= lp.gather(-1, ids[0, 1:, None]).double().sum().item()
            tokens += len(sample) - 1
        scored = time.perf_counter()
        prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
        out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    generated = time.perf_counter()
    record = {
        "loader": args.loader, "model": str(args.model), "kernels": kernels, "dtype": args.dtype,
        "perplexity": math.exp(nll / tokens), "tokens": tokens,
        "prompt": args.prompt, "generation": tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True),
        "load_s": round(loaded - start, 1), "eval_s": round(scored - loaded, 1),
        "generate_s": round(generated - scored, 1),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
