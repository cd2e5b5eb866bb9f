"""`vlmkit export`: turn a LoRA run folder into a full model folder with the adapters folded in.

    vlmkit train --model tiny-random --data synth/data.json --lora r=8,alpha=16 --out run
    vlmkit export run --merge --out merged         # W + alpha/r B A in every adapted layer (train/lora.py)
    vlmkit generate --model merged --prompt "Hi"   # the same answers as --model run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmkit.load import load_model
from vlmkit.train.lora import lora_layers, merge_lora


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `export`."""
    p = sub.add_parser("export", help="write a LoRA run's model with its adapters merged into the weights",
                       description="Load a model folder with LoRA adapters (a `vlmkit train --lora` run folder), "
                                   "fold every adapter into its weight (W + alpha/r B A) and write a full model "
                                   "folder in the same format as the run's (config.json, safetensors, tokenizer), "
                                   "which any verb loads without the adapters.")
    p.add_argument("folder", metavar="RUN", help="the model folder with adapters (a vlmkit train --lora run folder)")
    p.add_argument("--merge", action="store_true", help="fold the adapters into the weights (required)")
    p.add_argument("--out", required=True, metavar="DIR", help="the new model folder (must not exist or be empty)")
    p.add_argument("--json", action="store_true", help="end with one JSON object: the folder and the layers merged")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if not args.merge:
        raise ValueError("say what to export: --merge writes a full model folder with the adapters folded in")
    out = Path(args.out)
    if out.resolve() == Path(args.folder).resolve():
        raise ValueError(f"--out {out} is the run folder itself; give a new folder for the merged model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; give a new folder (nothing is overwritten)")
    loaded = load_model(args.folder)  # on the CPU: merging runs no model
    if not lora_layers(loaded.model):
        raise ValueError(f"{args.folder} has no LoRA adapters (no lora.json): it is a full model folder already; "
                         "--merge exports a `vlmkit train --lora` run")
    spec = loaded.model.lora_config.spec()
    merged = merge_lora(loaded.model)
    loaded.save_pretrained(out)
    if args.json:
        print(json.dumps({"out": str(out), "merged_layers": merged, "lora": spec}))
    else:
        print(f"merged {merged} LoRA layers ({spec}) into {out}")
    return 0
