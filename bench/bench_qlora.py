"""Resident memory and time of one LoRA vs one QLoRA (NF4 base) optimizer step, each in its own process.

    python bench/bench_qlora.py                          # llava-1.5 shape, 2 of its 32 LM layers, 4 of 24 ViT layers
    python bench/bench_qlora.py --lm-layers 4 --vision-layers 24 --modes lora qlora

The model is the llava-1.5 preset (ViT-L/14 336 px, mlp2x_gelu, a 4096-wide Llama LM with its 32064 vocabulary)
with fewer layers, random weights in bf16. LoRA r=16, alpha=32 on the LM's attention and MLP (the rest frozen),
as `vlmkit train --lora ... [--quantize nf4]` trains it; for QLoRA every frozen linear weight is then NF4
(train/qlora.py). One step: one 336-px image + 64 text tokens (576 + 64 positions), batch 1, activation
checkpointing, loss over the text tokens, backward, AdamW step. Printed per mode: the resident memory of the
ready model (after quantization, garbage collected), the peak resident memory during the step (VmHWM reset via
/proc/self/clear_refs before it), and the step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(mode: str, lm_layers: int, vision_layers: int, threads: int) -> dict:
    import torch

    from vlmkit.models.image_model import build_model
    from vlmkit.presets import get_preset
    from vlmkit.train.loop import build_optimizer
    from vlmkit.train.lora import parse_lora
    from vlmkit.train.stages import Stage

    torch.set_num_threads(threads)
    cfg = get_preset("llava-1.5")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, num_layers=lm_layers),
                              vision=dataclasses.replace(cfg.vision, num_layers=vision_layers))
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    stage = Stage("lora", {"vision": 0.0, "projector": 0.0, "lm": 2e-4},
                  lora=parse_lora("r=16,alpha=32,targets=lm.attn,lm.mlp"))
    from vlmkit.train.lora import add_lora
    add_lora(model, stage.lora)
    optimizer = build_optimizer(model, stage)  # freezes all but the adapters
    quantized = 0
    if mode == "qlora":
        from vlmkit.train.qlora import quantize_frozen
        quantized = len(quantize_frozen(model))
    params = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
    model.train()
    n_image = 576
    ids = torch.cat([torch.full((1, n_image), cfg.image_token_id), torch.randint(3, 30000, (1, 64))], dim=1)
    labels = ids.clone()
    labels[:, :n_image] = -100
    pixels = torch.randn(1, 3, 336, 336, dtype=torch.bfloat16)
    gc.collect()
    ready = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    loss = model(input_ids=ids, pixel_values=pixels, labels=labels, loss_only=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    return {"mode": mode, "params_M": round(params / 1e6, 1), "quantized_layers": quantized,
            "ready_rss_MiB": round(ready), "step_peak_rss_MiB": round(_rss_mib("VmHWM")),
            "step_s": round(step_s, 2), "loss": round(loss.item(), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.lm_layers, args.vision_layers, args.threads)))
        return
    for mode in args.modes:  # each in a fresh process: the peak of one does not hide the other's
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--lm-layers", str(args.lm_layers),
                              "--vision-layers", str(args.vision_layers), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
