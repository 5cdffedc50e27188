"""Generation speed per policy in one run, written to docs/bench-generate.{md,json}.

    python scripts/bench_generate.py CKPT [--new-tokens 128] [--prompt-tokens 64]

Runs `fqcompile bench` (fqcompile/bench.py): decode and prefill tokens/s for static
precision at each rung, static-mixed and dynamic (when the checkpoint is calibrated),
and the source model in bf16 through Hugging Face generate, with the controller's share
of the decode time and the peak memory.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-generate"))
    args = ap.parse_args()
    out = Path(args.out)
    cmd = [sys.executable, "-m", "fqcompile.cli", "bench", args.checkpoint, "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--json", str(out.with_suffix(".json"))]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "fqcompile bench failed")
    data = json.loads(out.with_suffix(".json").read_text())
    manifest = json.loads((Path(args.checkpoint) / "fqcompile.json").read_text())
    try:
        import llama_cpp  # noqa: F401
        llama_note = "llama.cpp rows: not implemented yet."
    except ImportError:
        llama_note = "No llama.cpp rows: llama-cpp-python is not installed."
    text = "\n".join([
        "# Generation benchmark", "",
        f"Measured {datetime.date.today()}, {data['threads']} threads, torch {torch.__version__}, batch 1, greedy, "
        f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (stop tokens ignored). Command:", "",
        f"    python scripts/bench_generate.py {' '.join(sys.argv[1:])}", "",
        f"Checkpoint: {manifest['source']['model']}, {manifest['quantizer']['method']} nested "
        f"{manifest['ladder']}, group {manifest['group_size']}. {llama_note}", "",
        run.stdout.strip(), "",
        "Controller share: the precision controller's hooks as a share of the decode time. "
        "Peak RSS: the process's peak so far (the runs share one process).", ""])
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
