"""GPTQ baseline with GPTQModel, on CPU, with our exact calibration samples.

Run it with the separate venv (it does not use the project's venv):

    GPTQMODEL_CPU_WORKERS=2 /work/gptqmodel-venv/bin/python scripts/gptqmodel_baseline.py \
        --model ~/.cache/fqcompile/models/smollm2-135m-0.1.2 --calib calib.json --out out/gptq-w4g128

--calib is a JSON list of token-id lists (each already starts with BOS); every sample is
passed as input_ids with an attention mask of ones, in file order, unpadded and not
concatenated. The quantized checkpoint is saved in GPTQ format (packed int32 qweight,
qzeros, fp16 scales, g_idx) to --out, with the settings used in baseline_settings.json.

Checkpoint layout (checkpoint_format "gptq" = v1, verified against GPTQModel 7.7.0):
code[k, n] = (qweight[k // 8, n] >> 4 * (k % 8)) & 15; zero words are stored minus 0x11111111
(whole 32-bit word, borrows included), so zero[g, n] = ((qzeros[g, n // 8] + 0x11111111) mod 2**32
>> 4 * (n % 8)) & 15; W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n]).
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only, even where a GPU exists
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder (fp32/fp16 safetensors)")
    p.add_argument("--calib", required=True, help="JSON file: list of token-id lists")
    p.add_argument("--out", required=True, help="folder for the GPTQ checkpoint")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False,
                   help="symmetric grid (default: asymmetric, like our quantizer)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order: process columns by decreasing Hessian diagonal")
    p.add_argument("--gar", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQModel's group-aware reordering (its default; off here = plain GPTQ)")
    p.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H)")
    args = p.parse_args()

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    samples = json.loads(Path(args.calib).read_text())
    calibration = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]

    config = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act,
                  act_group_aware=args.gar and not args.desc_act, damp_percent=args.damp,
                  format="gptq")
    start = time.perf_counter()
    qconfig = QuantizeConfig(**config, device="cpu", offload_to_disk=False)
    model = GPTQModel.load(args.model, qconfig, dtype=torch.float32)
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    quantized = time.perf_counter()
    model.save(args.out)
    done = time.perf_counter()

    tokens = sum(len(s) for s in samples)
    record = dict(config, model=str(args.model), calib=str(args.calib), samples=len(samples),
                  tokens=tokens, quantize_s=round(quantized - start, 1), total_s=round(done - start, 1),
                  cpu_workers=os.environ["GPTQMODEL_CPU_WORKERS"], torch_threads=torch.get_num_threads())
    (Path(args.out) / "baseline_settings.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"quantized {len(samples)} samples / {tokens} tokens: load+quantize {quantized - start:.1f} s, "
          f"save {done - quantized:.1f} s, wall {done - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
