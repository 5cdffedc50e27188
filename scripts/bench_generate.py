"""Generation speed per policy in one run, written to docs/bench-generate.{md,json}.

    python scripts/bench_generate.py CKPT [--new-tokens 128] [--prompt-tokens 64] [--out PREFIX]

Runs `fqcompile bench` (fqcompile/bench.py) three times: every policy as exported (float
head, float activations) plus the baselines (Hugging Face generate in bf16; llama.cpp at
Q8_0 and Q4_0 when llama-cpp-python is installed and the source is a GGUF); every policy
with the 8-bit head (--quantized-head); and with the 8-bit head and int8 activations
(--int8-activations), which is what llama.cpp's Q4_0/Q8_0 dot products do (activations
in 8-bit blocks of 32). Each row is its own process, so its peak memory is its own.
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(checkpoint: str, new_tokens: int, prompt_tokens: int, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "fqcompile.cli", "bench", checkpoint, "--new-tokens", str(new_tokens),
               "--prompt-tokens", str(prompt_tokens), "--json", str(out), *extra]
        run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode:
            sys.exit(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "fqcompile bench failed")
        return json.loads(out.read_text())


def report(checkpoint: str, out: Path, new_tokens: int, prompt_tokens: int, title: str, about: str) -> str:
    """Both bench runs; writes OUT.json and OUT.md and returns the markdown."""
    plain = bench(checkpoint, new_tokens, prompt_tokens)
    head = bench(checkpoint, new_tokens, prompt_tokens, "--quantized-head", "--no-baseline")
    both = bench(checkpoint, new_tokens, prompt_tokens, "--quantized-head", "--int8-activations", "--no-baseline")
    rows = plain["rows"] + head["rows"] + both["rows"]
    data = {"checkpoint": checkpoint, "threads": plain["threads"], "rows": rows, "notes": plain["notes"]}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    from fqcompile.bench import table

    manifest = json.loads((Path(checkpoint) / "fqcompile.json").read_text())
    notes = [f"- {n}" for n in plain["notes"]]
    text = "\n".join([
        f"# {title}", "",
        f"Measured {datetime.date.today()}, {data['threads']} threads, torch {torch.__version__}, batch 1, greedy, "
        f"{prompt_tokens}-token prompt, {new_tokens} new tokens (stop tokens ignored). Command:", "",
        f"    python {' '.join(sys.argv)}", "",
        about,
        f"Checkpoint: {manifest['source']['model']}, {manifest['quantizer']['method']} nested "
        f"{manifest['ladder']}, group {manifest['group_size']}.", "",
        table(rows), "", *notes, "" if notes else "",
        "Controller share: the precision controller's hooks as a share of the decode time. Bits read/weight: "
        "the quantized layers' planes, scales and zeros per weight (the head is not counted). "
        "\"8-bit head\": `--quantized-head`; \"int8 activations\": `--int8-activations`. Peak RSS: each row is a process of its own.", ""])
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-generate"))
    args = ap.parse_args()
    print(report(args.checkpoint, Path(args.out), args.new_tokens, args.prompt_tokens, "Generation benchmark", ""))


if __name__ == "__main__":
    main()
