"""Generation speed on a random-weight model of TinyLlama-1.1B's shape: docs/bench-random.{md,json}.

    python scripts/bench_random_model.py [--work out/tinyllama-random] [--new-tokens 128] [--repeats 1]

Speed does not depend on the weights' values, so the model is a LlamaForCausalLM with
TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32 query / 4 KV heads) and
transformers' seeded random initialization (normal, std 0.02; never zero). Its vocabulary
is the built-in tokenizer's 49,152 (TinyLlama's own tokenizer is not on this machine;
its 32,000 would make the head 2/3 the size). In --work, once: the model folder, a dynamic
policy calibrated at 6 average bits (small settings: the policy's quality is meaningless
on random weights, only its bit mix matters), and an RTN nested [4, 8] export with that
policy. Then scripts/bench_generate.py's report on it (three bench runs and the breakdown).
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
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)


def build(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fqcompile import sources

    if (folder / "config.json").is_file():
        return
    tok = AutoTokenizer.from_pretrained(sources.resolve(sources.BUILTIN_NAME))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, **SHAPE))
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
    ap.add_argument("--work", default=str(ROOT / "out" / "tinyllama-random"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "austen"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every row, in turn (each takes ~10-20 s)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-random"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, calib, ckpt = work / "model", work / "calibration", work / "nested-rtn"
    build(model)
    if not (calib / "policy.json").is_file():
        fqcompile("calibrate", "--model", str(model), "--out", str(calib), "--dataset", args.data,
                  "--target-bits", "6", "--samples", "4", "--eval-samples", "2", "--seq-len", "64", "--buckets", "4")
    if not (ckpt / "fqcompile.json").is_file():
        fqcompile("export", "--model", str(model), "--out", str(ckpt), "--method", "rtn", "--calib", str(calib))
    about = ("A random-weight model of TinyLlama-1.1B's shape (scripts/bench_random_model.py: 22 layers, hidden 2048, "
             "MLP 5632, 32 query / 4 KV heads, vocabulary 49,152). ")
    print(report(str(ckpt), Path(args.out), args.new_tokens, args.prompt_tokens,
                 "Generation benchmark: TinyLlama-1.1B shape, random weights", about, args.repeats))


if __name__ == "__main__":
    main()
