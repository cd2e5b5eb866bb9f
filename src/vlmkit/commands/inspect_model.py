"""`vlmkit inspect MODEL`: what a model folder, .gguf file, preset or hub id holds and whether vlmkit can load
it (vlmkit.describe), without loading its weights."""

from __future__ import annotations

import argparse
import json

from vlmkit.describe import describe_model, report_lines


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `inspect`."""
    p = sub.add_parser("inspect", help="what a model holds and whether vlmkit can load it (no weights loaded)",
                       description="Describe a model without loading its weights: model type, parts (vision "
                                   "tower, projector, language model with layers and width), parameters and the "
                                   "memory the weights need in float32 and bfloat16, the stored dtype, and the "
                                   "loader vlmkit would use, or why none. Reads config.json and the safetensors "
                                   "headers (a hub id: its config and tokenizer files are fetched into the hub "
                                   "cache, the weights' headers read remotely unless cached).")
    p.add_argument("model", metavar="MODEL",
                   help="a model directory, a .gguf file, smollm2-135m, a preset (vlmkit presets) or a Hugging "
                        "Face hub id (owner/name[@revision]; a local folder of that name wins)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    report = describe_model(args.model)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print("\n".join(report_lines(report)))
    return 0
