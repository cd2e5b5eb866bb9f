"""`vlmkit export`: a LoRA run folder as a full model folder with the adapters folded in (--merge), or its
adapters alone as a PEFT adapter directory for transformers + peft (--adapters-only, weights/peft.py).

    vlmkit train --model tiny-random --data synth/data.json --lora r=8,alpha=16 --out run
    vlmkit export run --merge --out merged         # W + alpha/r B A in every adapted layer (train/lora.py)
    vlmkit generate --model merged --prompt "Hi"   # the same answers as --model run
    vlmkit export run --adapters-only --out adapter   # adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmkit.load import load_model
from vlmkit.train.lora import lora_layers, merge_lora
from vlmkit.weights.peft import write_peft_adapter


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `export`."""
    p = sub.add_parser("export", help="write a LoRA run's model with its adapters merged in, or its adapters (PEFT)",
                       description="Load a model folder with LoRA adapters (a `vlmkit train --lora` run folder). "
                                   "--merge folds every adapter into its weight (W + alpha/r B A) and writes a full "
                                   "model folder in the same format as the run's (config.json, safetensors, "
                                   "tokenizer), which any verb loads without the adapters; --adapters-only writes "
                                   "the adapters alone for transformers + peft (Llama-family LMs and LLaVA).")
    p.add_argument("folder", metavar="RUN", help="the model folder with adapters (a vlmkit train --lora run folder)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="fold the adapters into the weights: a full model folder")
    mode.add_argument("--adapters-only", action="store_true",
                      help="write only the adapters as a PEFT adapter directory (adapter_config.json + "
                           "adapter_model.safetensors, transformers module names; fused qkv / gate_up adapters "
                           "split by rows) that transformers + peft apply to the base model")
    p.add_argument("--out", required=True, metavar="DIR", help="the new folder (must not exist or be empty)")
    p.add_argument("--json", action="store_true", help="end with one JSON object: the folder, the layers, the LoRA")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.resolve() == Path(args.folder).resolve():
        raise ValueError(f"--out {out} is the run folder itself; give a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; give a new folder (nothing is overwritten)")
    loaded = load_model(args.folder)  # on the CPU: merging runs no model
    if not lora_layers(loaded.model):
        raise ValueError(f"{args.folder} has no LoRA adapters (no lora.json): it is a full model folder already; "
                         "export takes a `vlmkit train --lora` run")
    spec = loaded.model.lora_config.spec()
    if args.adapters_only:
        write_peft_adapter(loaded.model, out)
        layers = len(lora_layers(loaded.model))
        if args.json:
            print(json.dumps({"out": str(out), "adapted_layers": layers, "lora": spec}))
        else:
            print(f"wrote the adapters of {layers} layers ({spec}) to {out} (PEFT format)")
        return 0
    merged = merge_lora(loaded.model)
    loaded.save_pretrained(out)
    if args.json:
        print(json.dumps({"out": str(out), "merged_layers": merged, "lora": spec}))
    else:
        print(f"merged {merged} LoRA layers ({spec}) into {out}")
    return 0
