"""vlmkit vs transformers on one tiny LLaVA, side by side in one run.

    python bench/bench_llava.py                 # default: 2 threads, 5 repetitions
    python bench/bench_llava.py --reps 7 --threads 1 --json bench/results/llava.json

The model (the `bench-tiny` preset: CLIP-style ViT 96 px, patch 8, 192 wide,
4 layers; mlp2x_gelu; Llama LM 256 wide, 4 layers) is built once in
transformers with random weights, saved, and loaded by vlmkit, so both run
the same weights. Measured, alternating the two implementations every
repetition so that machine noise hits both alike:

- training step: forward + loss + backward + AdamW step, batch 16, one image
  (144 tokens) + 48 text tokens per sample, in fp32 and under bf16 autocast
  (both implementations in the same precision in each row). vlmkit computes
  the loss with `loss_only=True`, its training path: lm_head runs only where a
  label exists (here 48 of 193 positions), the loss value is the same;
- greedy generation: 32 new tokens after a prompt with one image, batch 1 and
  16, fp32, tokens/s counting generated tokens only (prefill time included).

Both must produce the same greedy tokens, or the run stops. Medians of --reps
repetitions are printed with the ratio vlmkit / transformers (higher = vlmkit faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from vlmkit.generate import GenerationConfig, generate
from vlmkit.models.vlm import VLM
from vlmkit.schemes.pad import image_token_count
from vlmkit.weights import from_pretrained
from vlmkit.presets import bench_tiny
from vlmkit.weights.llava import config_to_hf

TEXT_TOKENS = 48
PROMPT_TEXT_TOKENS = 16
NEW_TOKENS = 32


def build_models(workdir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random weights in a transformers LlavaForConditionalGeneration and a vlmkit VLM."""
    torch.manual_seed(0)
    config = config_to_hf(bench_tiny())
    # Wider initial weights than the default 0.02 so that greedy decoding has clear winners
    # (near-ties would make the token-equality check flip on rounding noise).
    config["text_config"]["initializer_range"] = 0.1
    hf_cfg = transformers.LlavaConfig(**config)
    hf = transformers.LlavaForConditionalGeneration(hf_cfg)
    hf.save_pretrained(workdir)
    return hf, from_pretrained(workdir)


def batch(cfg, batch_size: int, text_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, 1 + image tokens + text), pixel_values (B, 3, S, S)) with one image per sample."""
    g = torch.Generator().manual_seed(seed)
    n_img = image_token_count(cfg)
    text = torch.randint(3, cfg.image_token_id, (batch_size, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long),
                     torch.full((batch_size, n_img), cfg.image_token_id), text], dim=1)
    size = cfg.vision.image_size
    return ids, torch.randn(batch_size, 3, size, size, generator=g)


def time_train_step(model, optimizer, ids, pixels, labels, bf16: bool) -> float:
    # vlmkit's training path asks for the loss only: lm_head runs on labelled positions alone.
    extra = {"loss_only": True} if isinstance(model, VLM) else {}
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, pixel_values=pixels, labels=labels, **extra)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def generate_hf(model, ids, pixels) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def generate_vlmkit(model, ids, pixels) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    with torch.no_grad():
        result = generate(model, ids, GenerationConfig(max_new_tokens=NEW_TOKENS),
                          prefill_inputs={"pixel_values": pixels})
    return time.perf_counter() - start, result.token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--train-batch", type=int, default=16, help="batch size of the training step")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(Path(tmp))
    cfg = ours.cfg
    results: dict[str, dict[str, float]] = {}

    # Training step: the same batch, both models start from the same weights, the same optimizer.
    ids, pixels = batch(cfg, args.train_batch, TEXT_TOKENS, seed=1)
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    hf.train(), ours.train()
    opts = {"transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4),
            "vlmkit": torch.optim.AdamW(ours.parameters(), lr=1e-4)}
    models = {"transformers": hf, "vlmkit": ours}
    for precision, bf16 in (("fp32", False), ("bf16 autocast", True)):
        times: dict[str, list[float]] = {name: [] for name in models}
        for rep in range(args.reps + 1):  # the first repetition warms up and is dropped
            for name, model in models.items():
                t = time_train_step(model, opts[name], ids, pixels, labels, bf16)
                if rep:
                    times[name].append(t)
        key = f"train step s, b{args.train_batch} {precision}"
        results[key] = {k: statistics.median(v) for k, v in times.items()}

    # Greedy generation, tokens/s. Reload the weights: the training steps changed them differently.
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(Path(tmp))
    hf.eval(), ours.eval()
    for bs in (1, 16):
        ids, pixels = batch(cfg, bs, PROMPT_TEXT_TOKENS, seed=2)
        rates: dict[str, list[float]] = {"transformers": [], "vlmkit": []}
        for rep in range(args.reps + 1):
            t_hf, tok_hf = generate_hf(hf, ids, pixels)
            t_ours, tok_ours = generate_vlmkit(ours, ids, pixels)
            if tok_hf != tok_ours:
                raise SystemExit(f"greedy tokens differ at batch {bs}: the comparison would be meaningless\n"
                                 f"transformers: {tok_hf}\nvlmkit:       {tok_ours}")
            if rep:
                rates["transformers"].append(bs * NEW_TOKENS / t_hf)
                rates["vlmkit"].append(bs * NEW_TOKENS / t_ours)
        results[f"generate tok/s, b{bs} fp32"] = {k: statistics.median(v) for k, v in rates.items()}

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"medians of {args.reps}")
    print(f"{'measurement':<34}{'transformers':>14}{'vlmkit':>12}{'speed-up':>10}")
    for name, r in results.items():
        speedup = r["transformers"] / r["vlmkit"] if name.startswith("train") else r["vlmkit"] / r["transformers"]
        r["speedup"] = speedup
        print(f"{name:<34}{r['transformers']:>14.4g}{r['vlmkit']:>12.4g}{speedup:>9.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
