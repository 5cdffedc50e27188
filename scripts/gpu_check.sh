#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (torch with CUDA and triton installed), in under 5 minutes
# (plus part 3, vLLM on GPTQ exports, when GPTQ_EXPORTS is set):
#   1. the Triton kernel tests, run on the device (not in the interpreter);
#   2. a timing table: our Triton kernel at each precision against torch's fp16 matmul
#      on dense weights, and a device-to-device copy for the memory bandwidth.
# Usage: bash scripts/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import fqcompile" 2>/dev/null || "$PY" -m pip install --quiet --no-deps -e .
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'triton', triton.__version__)"
"$PY" -m pip install --quiet pytest 2>/dev/null || true

timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py

timeout 120 "$PY" - <<'PYEOF'
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fqcompile.formats.nested import Layout, pack_planes, quantize_rtn
from fqcompile.kernels import backend, flex_linear

dev = torch.device("cuda")
print(f"\n{torch.cuda.get_device_name()} - fqcompile backend: {backend(dev)}")
buf = torch.empty(2**30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(buf)
ms = do_bench(lambda: dst.copy_(buf))
copy_gbs = 2 * buf.numel() / (ms * 1e-3) / 1e9  # read + write
print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
del buf, dst

print(f"\n{'shape':>12} {'batch':>5} {'fp16 ms':>8} {'ours-4 ms':>9} {'ours-8 ms':>9} {'4 vs fp16':>9} {'8 vs fp16':>9} {'4-bit GB/s':>10} {'of copy':>7}")
for out_f, in_f in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    w = torch.randn(out_f, in_f) * 0.02
    layout = Layout(out_f, in_f, group_size=128, ladder=(4, 8))
    codes, scale, zero = quantize_rtn(w, 128, (4, 8))
    planes = [p.to(dev) for p in pack_planes(codes, layout)]
    scale, zero = scale.to(dev), zero.to(dev)
    w16 = w.half().to(dev)
    for batch in (1, 4, 32, 512):
        x = torch.randn(batch, in_f, device=dev, dtype=torch.float16)
        t16 = do_bench(lambda: F.linear(x, w16))
        t4 = do_bench(lambda: flex_linear(x, planes, (layout, scale, zero), 4))
        t8 = do_bench(lambda: flex_linear(x, planes, (layout, scale, zero), 8))
        read4 = planes[0].numel() + scale.numel() * 3 + x.numel() * 2
        gbs = read4 / (t4 * 1e-3) / 1e9
        print(f"{out_f}x{in_f:>6} {batch:>5} {t16:8.4f} {t4:9.4f} {t8:9.4f} {t16 / t4:9.2f} {t16 / t8:9.2f} {gbs:10.0f} {gbs / copy_gbs:7.2f}")
PYEOF

# 3. vLLM on GPTQ exports (issue: GPTQ-format export), when GPTQ_EXPORTS names a folder of
#    `fqcompile export-gptq` outputs made with --dataset (e.g. `python scripts/gptq_interop.py
#    --group-size 64 --keep exports`: vLLM's GPTQ layers need a group size that divides every
#    layer's inputs) and VLLM_PYTHON a python with vLLM and fqcompile installed (its own venv:
#    vLLM pins its own torch; the lent machine has no package index). For each export: the
#    perplexity on the windows fqcompile measured (recorded in the export) against fqcompile's,
#    the greedy generation, and the decode speed at batch 1.
if [ -n "${GPTQ_EXPORTS:-}" ]; then
  timeout 540 "${VLLM_PYTHON:?set VLLM_PYTHON to a python with vLLM installed}" - "$GPTQ_EXPORTS" <<'PYEOF'
import json, math, sys, time
from pathlib import Path

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from fqcompile.calibration.data import load_samples

for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "fqcompile-gptq.json").is_file()):
    record = json.loads((folder / "fqcompile-gptq.json").read_text())
    quality = record.get("quality")
    if not quality or not Path(quality["dataset"]).exists():
        print(f"{folder.name}: skipped (exported without --dataset, or its text is not on this machine)")
        continue
    tok = AutoTokenizer.from_pretrained(folder)
    data = load_samples(quality["dataset"], tok, split="eval", seq_len=quality["seq_len"],
                        max_samples=quality["samples"]).tolist()
    llm = LLM(model=str(folder), dtype="float16", gpu_memory_utilization=0.3, max_model_len=2048)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in data],
                        SamplingParams(max_tokens=1, prompt_logprobs=1))
    nll = -sum(o.prompt_logprobs[t][ids[t]].logprob for o, ids in zip(outs, data) for t in range(1, len(ids)))
    ppl = math.exp(nll / sum(len(ids) - 1 for ids in data))
    ours = quality["fqcompile_perplexity"]
    prompt = "It is a truth universally acknowledged, that"
    start = time.perf_counter()
    gen = llm.generate([prompt], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))[0].outputs[0]
    seconds = time.perf_counter() - start
    verdict = "ok" if abs(ppl / ours - 1) <= 0.001 else "MISMATCH (over 0.1%)"
    print(f"{folder.name}: {record['plan']}, vLLM perplexity {ppl:.3f} vs fqcompile {ours:.3f} "
          f"({100 * (ppl / ours - 1):+.3f}%: {verdict}), decode {len(gen.token_ids) / seconds:.1f} tokens/s")
    print(f"  {prompt}{gen.text[:200]!r}")
    del llm
PYEOF
fi
