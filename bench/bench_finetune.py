"""Memory and time of one fine-tuning optimizer step of a LLaVA-1.5-7B-shaped model: full bf16, LoRA bf16, QLoRA NF4.

    python bench/bench_finetune.py                               # LoRA and QLoRA at 7B, 3 steps each; full estimated
    python bench/bench_finetune.py --modes qlora --steps 2 --require-available 8
    python bench/bench_finetune.py --preset llava-1.5-small --modes full lora qlora --steps 2   # seconds

The model is the `llava-1.5` preset (CLIP ViT-L/14 at 336 px, mlp2x_gelu projector, Vicuna-7B-shaped LM with
LLaVA's 32064-token vocabulary: 7.06 B parameters) with random weights. It is built as `vlmkit train` loads a
model folder (weights/materialize.py): on the meta device, then module by module in bf16, with random values
(N(0, 0.02) matrices, drawn per module in bf16: the numbers do not matter here), and for QLoRA each layer the
stage freezes stored in NF4 right after it exists (train/qlora.py frozen_linears), so neither the fp32 nor the
bf16 model exists in full. LoRA and QLoRA: r=16, alpha=32 on the LM's attention and MLP, everything else
frozen (stage `lora`); full: every parameter trains (AdamW's states then in bf16, as the parameters).

One step: one 336-px image (576 placeholder positions) + `--text-tokens` (64) text tokens, batch 1, activation
checkpointing, the loss over the text tokens, backward, AdamW step, zero_grad. Each mode runs in its own
process; this process reads that child's peak resident set size from the kernel (os.wait4's ru_maxrss: build
and steps together), and the child reports its build time, its resident size once built (freed heap handed
back with malloc_trim), the median of `--steps` step times and the machine's 1-minute load average before and
after the steps (step times on a shared machine depend on it). Full bf16 at 7B does not fit in 24 GB: unless
`full` is in --modes, its memory is estimated from the parameter count (formula printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
MODES = ("full", "lora", "qlora")
LORA = "r=16,alpha=32,targets=lm.attn,lm.mlp"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _config(preset: str, lm_layers: int | None, vision_layers: int | None):  # noqa: ANN202 (a Preset)
    from vlmkit.presets import get_preset

    cfg = get_preset(preset)
    if lm_layers is not None:
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, num_layers=lm_layers))
    if vision_layers is not None:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_layers=vision_layers))
    return cfg


def _stage(mode: str):  # noqa: ANN202 (a Stage)
    from vlmkit.train.lora import parse_lora
    from vlmkit.train.stages import Stage

    if mode == "full":
        return Stage("full", {"vision": 1e-5, "projector": 1e-5, "lm": 1e-5})
    return Stage("lora", {"vision": 0.0, "projector": 0.0, "lm": 2e-4}, lora=parse_lora(LORA))


def measure(mode: str, args: argparse.Namespace) -> dict:
    """One mode in this process: build, one warm-up-free series of args.steps optimizer steps."""
    import torch
    from PIL import Image

    from vlmkit.models.image_model import build_model
    from vlmkit.prompt import flat_plans
    from vlmkit.train.loop import build_optimizer
    from vlmkit.train.lora import add_lora
    from vlmkit.train.qlora import frozen_linears
    from vlmkit.weights.materialize import build_on_meta, materialize, random_values, release_memory

    torch.set_num_threads(args.threads)
    print(f"{mode}: torch {torch.__version__}, {torch.get_num_threads()} thread(s)", file=sys.stderr, flush=True)
    cfg, stage = _config(args.preset, args.lm_layers, args.vision_layers), _stage(mode)
    t0 = time.perf_counter()
    model = build_on_meta(build_model, cfg)
    base_params = sum(p.numel() for p in model.parameters())  # before any adapter: what full fine-tuning trains
    plan = frozen_linears(model, stage) if mode == "qlora" else None
    materialize(model, random_values(seed=0), dtype=torch.bfloat16, quantize=plan)
    if stage.lora is not None:
        add_lora(model, stage.lora)
    optimizer = build_optimizer(model, stage)  # freezes what the stage freezes
    release_memory()
    build_s = time.perf_counter() - t0
    ready_kib = _status_kib("VmRSS")
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    plans = flat_plans(model.plan_images([Image.new("RGB", (cfg.vision.image_size,) * 2)]))
    inputs = model.image_inputs(plans)
    n_image = sum(p.num_tokens for p in plans)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, cfg.image_token_id, (1, args.text_tokens), generator=generator)
    ids = torch.cat([torch.full((1, n_image), cfg.image_token_id), text], dim=1)  # (1, 576 + 64)
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
    model.train()
    times, losses, load = [], [], [os.getloadavg()[0]]
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=labels, loss_only=True, **inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        print(f"{mode}: step {len(times)}/{args.steps} {times[-1]:.1f} s, loss {losses[-1]:.4f}", file=sys.stderr,
              flush=True)
    return {"mode": mode, "base_params": base_params, "params": params, "trained_params": trained, "quantized_layers": len(plan or {}),
            "positions": ids.shape[1], "build_s": round(build_s, 2), "ready_rss_gib": round(ready_kib * 1024 / GIB, 2),
            "step_s": round(statistics.median(times), 3), "steps": [round(t, 3) for t in times],
            "loss": round(losses[-1], 4),
            "load_avg": [round(x, 1) for x in (*load, os.getloadavg()[0])]}  # the machine's 1-min load, before/after


def full_estimate(params: int) -> dict:
    """Bytes of full fine-tuning's weights, gradients and AdamW states (activations not counted): pure bf16
    (everything bf16) and mixed precision (bf16 weights and gradients, fp32 master weights and AdamW states)."""
    return {"params": params,
            "bf16_formula": "2 B weights + 2 B gradients + 2 x 2 B AdamW m, v (bf16) = 8 B per parameter",
            "bf16_gib": round(8 * params / GIB, 1),
            "fp32_master_formula": "2 B weights + 2 B gradients + 4 B fp32 master + 2 x 4 B AdamW m, v (fp32) "
                                   "= 16 B per parameter",
            "fp32_master_gib": round(16 * params / GIB, 1)}


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def run_child(mode: str, args: argparse.Namespace) -> dict:
    """mode measured in a fresh process; adds its peak resident size (the kernel's, through os.wait4)."""
    argv = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--steps", str(args.steps),
            "--threads", str(args.threads), "--text-tokens", str(args.text_tokens)]
    for flag, value in (("--lm-layers", args.lm_layers), ("--vision-layers", args.vision_layers)):
        if value is not None:
            argv += [flag, str(value)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"the {mode} run failed (exit {child.returncode}); its errors are above")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gib"] = round(usage.ru_maxrss * 1024 / GIB, 2)  # Linux: KiB
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=MODES,
                   help="what to run (full at 7B needs ~53 GiB: by default it is estimated, not run)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per mode; the median time is reported")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--preset", default="llava-1.5", help="the model shape (a vlmkit preset)")
    p.add_argument("--lm-layers", type=int, default=None, help="override the preset's LM depth")
    p.add_argument("--vision-layers", type=int, default=None, help="override the preset's vision depth")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--require-available", type=float, default=0.0, metavar="GIB",
                   help="refuse to start a mode while /proc/meminfo's MemAvailable is below this (shared machines)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    print(f"# {args.preset}, {args.steps} step(s) per mode, {args.threads} thread(s)", flush=True)
    results = []
    for mode in args.modes:
        free = available_gib()
        if free < args.require_available:
            raise SystemExit(f"{mode}: only {free:.1f} GiB available, --require-available {args.require_available}")
        results.append(run_child(mode, args))
        print(json.dumps(results[-1]), flush=True)
    if "full" not in args.modes:
        print(json.dumps({"mode": "full (estimate)", **full_estimate(results[0]["base_params"])}), flush=True)


if __name__ == "__main__":
    main()
