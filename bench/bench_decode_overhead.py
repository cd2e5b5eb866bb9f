"""Where a batch-1 decoding step of SmolLM2-135M goes: the matmuls against everything around them.

    python bench/bench_decode_overhead.py                         # int4 g32 (bf16), 1 thread
    python bench/bench_decode_overhead.py --quantize none         # bf16 weights
    python bench/bench_decode_overhead.py --profile               # and torch.profiler's top ops

Each repetition runs one prefill of --prompt-tokens and times --new-tokens one-token steps (argmax included) of
the model as it is and of three stripped copies, in turn, so machine noise hits all alike; medians are printed:
 1. every linear layer returns zeros of its output shape (what is left: the step without matmuls);
 2. and the RMSNorms return their input;
 3. and attention returns its queries.
The differences are what the matmuls, the norms and attention cost; row 3 is the rest (embedding, RoPE, KV cache
writes, casts, residual adds, SwiGLU, module calls, argmax). The stripped steps compute garbage: only their time
counts (the token fed back is clamped into the vocabulary).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import vlmkit.models.lm as lm_module
from vlmkit.load import load_model
from vlmkit.quantize import Int4Linear, Int8Linear, language_model

LINEARS = (nn.Linear, Int8Linear, Int4Linear)
ORIGINAL = {"forward": {cls: cls.forward for cls in LINEARS}, "rms_norm": lm_module.rms_norm,
            "sdpa": F.scaled_dot_product_attention}


def _no_matmul(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], self.out_features)  # zeros: garbage could hold denormals, slow to add


def strip(level: int) -> None:
    """0: the model as it is; 1: no matmuls; 2: and no RMSNorm; 3: and no attention."""
    for cls in LINEARS:
        cls.forward = _no_matmul if level >= 1 else ORIGINAL["forward"][cls]
    lm_module.rms_norm = (lambda x, weight, eps: x) if level >= 2 else ORIGINAL["rms_norm"]
    F.scaled_dot_product_attention = (lambda q, k, v, **kw: q) if level >= 3 else ORIGINAL["sdpa"]


def decode_run(lm: nn.Module, ids: list[int], new: int) -> Callable[..., float]:
    vocab = lm.cfg.vocab_size

    @torch.inference_mode()
    def run(around: AbstractContextManager | None = None) -> float:
        """Seconds per decoded token; around (a profiler) wraps the decoding steps, not the prefill."""
        cache = lm.new_cache(1, len(ids) + new + 1)
        nxt = lm(input_ids=torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        with around or nullcontext():
            t = time.perf_counter()
            for _ in range(new):
                logits = lm(input_ids=nxt.clamp(0, vocab - 1), cache=cache, logits_to_keep=1).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t) / new

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--quantize", default="int4", help="int8, int4, int4-g64, int4-g128 or none (bf16 weights)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of the real step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    quantize = None if args.quantize == "none" else args.quantize
    lm = language_model(load_model("smollm2-135m", dtype=torch.bfloat16, quantize=quantize).model)
    ids = [1000 + i for i in range(args.prompt_tokens)]
    run = decode_run(lm, ids, args.new_tokens)
    names = ["full step", "without matmuls", "  and without RMSNorm", "  and without attention"]
    for level in range(len(names)):  # warm-up
        strip(level)
        run()
    times: list[list[float]] = [[] for _ in names]
    for _ in range(args.reps):
        for level in range(len(names)):
            strip(level)
            times[level].append(run())
    strip(0)
    ms = [statistics.median(t) * 1e3 for t in times]
    weights = "bf16" if quantize is None else f"{args.quantize} (bf16 activations)"
    print(f"SmolLM2-135M {weights}, {args.threads} threads, {args.prompt_tokens} prompt "
          f"tokens, {args.new_tokens} new, medians of {args.reps} alternating repetitions")
    for name, value in zip(names, ms):
        print(f"{name:26} {value:7.2f} ms/token")
    print(f"{'matmuls':26} {ms[0] - ms[1]:7.2f} ms ({100 * (ms[0] - ms[1]) / ms[0]:.0f}%)")
    print(f"{'RMSNorm':26} {ms[1] - ms[2]:7.2f} ms ({100 * (ms[1] - ms[2]) / ms[0]:.0f}%)")
    print(f"{'attention':26} {ms[2] - ms[3]:7.2f} ms ({100 * (ms[2] - ms[3]) / ms[0]:.0f}%)")
    print(f"{'the rest':26} {ms[3]:7.2f} ms ({100 * ms[3] / ms[0]:.0f}%)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        run(prof)
        print(f"torch.profiler, {args.new_tokens} decoding steps of the full model:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
