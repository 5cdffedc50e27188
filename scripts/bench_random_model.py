"""Generation speed on random-weight models of real shapes: docs/bench-random*.{md,json}.

    python scripts/bench_random_model.py [--shape tinyllama|gemma3-270m|qwen3-0.6b] [--signal entropy|estimate|both]
                                         [--new-tokens 128] [--repeats 1]

Speed does not depend on the weights' values, so each model is its family's transformers
class with a real model's shape (SHAPES) and transformers' seeded random initialization
(normal, std 0.02; never zero): TinyLlama-1.1B (Llama), Gemma-3-270M (Gemma 3: a
262,144-token tied head, local and global layers) and Qwen3-0.6B (Qwen3: qk-norm, a
151,936-token tied head). The tokenizer is the built-in one (the real ones are not on this
machine); TinyLlama's row keeps its 49,152 tokens (its own 32,000 would make the head 2/3
the size), the others keep their real vocabulary sizes, whose heads dominate their reads.
In --work, once: the model folder, a dynamic policy calibrated at 6 average bits (small
settings: the policy's quality is meaningless on random weights, only its bit mix
matters), and an RTN nested [4, 8] export with that policy. Then scripts/bench_generate.py's
report on it (three bench runs and the breakdown).
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from fqcompile.processes import python_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (model class, config class, config, what the report says about it)
    "tinyllama": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
        "TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32 query / 4 KV heads, vocabulary 49,152)"),
    "gemma3-270m": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]),
        "Gemma-3-270M's shape (18 layers, 5 local (window 512) to 1 global, hidden 640, MLP 2048 GeGLU, 4 query / "
        "1 KV heads of 256, tied head of 262,144)"),
    "qwen3-0.6b": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True),
        "Qwen3-0.6B's shape (28 layers, hidden 1024, MLP 3072, 16 query / 8 KV heads of 128, qk-norm, tied head of "
        "151,936)"),
}


def build(folder: Path, shape: str, spread_norms: bool = False) -> None:
    import transformers
    from transformers import AutoTokenizer

    from fqcompile import sources

    if (folder / "config.json").is_file():
        return
    model_class, config_class, config, _ = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(sources.resolve(sources.BUILTIN_NAME))
    config = {"vocab_size": len(tok), **config}
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **config))
    if spread_norms:  # at init every norm weight is 1, so a normed input's mean square hardly varies
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(folder)


def fqcompile(*args: str) -> None:
    run = subprocess.run(python_command("-m", "fqcompile.cli", *args))
    if run.returncode:
        sys.exit(f"fqcompile {args[0]} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--work", help="default: out/<shape>-random")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "austen"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every row, in turn (each takes ~10-20 s)")
    ap.add_argument("--signal", choices=["entropy", "estimate", "both"], default="entropy",
                    help="the dynamic policy's signal (estimate, both: norm weights spread over [0.5, 1.5], so that "
                         "each block's input, and its decision, varies by token)")
    ap.add_argument("--out", help="default: docs/bench-random (TinyLlama) or docs/bench-random-<shape>")
    args = ap.parse_args()
    suffix = "" if args.signal == "entropy" else f"-{args.signal}"
    work = Path(args.work or ROOT / "out" / f"{args.shape}-random{suffix}")
    stem = "bench-random" if args.shape == "tinyllama" else f"bench-random-{args.shape}"
    out = Path(args.out or ROOT / "docs" / (stem + suffix))
    work.mkdir(parents=True, exist_ok=True)
    model, calib, ckpt = work / "model", work / "calibration", work / "nested-rtn"
    build(model, args.shape, spread_norms=args.signal != "entropy")
    if not (calib / "policy.json").is_file():
        fqcompile("calibrate", "--model", str(model), "--out", str(calib), "--dataset", args.data, "--signal",
                  args.signal, "--target-bits", "6", "--samples", "4", "--eval-samples", "2", "--seq-len", "64",
                  "--buckets", "4")
    if not (ckpt / "fqcompile.json").is_file():
        fqcompile("export", "--model", str(model), "--out", str(ckpt), "--method", "rtn", "--calib", str(calib))
    name = SHAPES[args.shape][3].split("'")[0]
    about = f"A random-weight model of {SHAPES[args.shape][3]} (scripts/bench_random_model.py). "
    print(report(str(ckpt), out, args.new_tokens, args.prompt_tokens,
                 f"Generation benchmark: {name} shape, random weights", about, args.repeats))


if __name__ == "__main__":
    main()
