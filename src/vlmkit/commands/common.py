"""What several verb modules share: the --model, --dtype, --quantize, --compile and --device flags of every verb that loads a model
(vlmkit/load.py) and the loading they ask for; the --data-policy and --image-root flags of every verb that
reads a dataset (data/formats.py: train, eval)."""

from __future__ import annotations

import argparse
import sys

import torch

from vlmkit.data.formats import POLICIES
from vlmkit.decoding import compile_decoding
from vlmkit.devices import DEVICE_HELP
from vlmkit.load import SPECIAL_SPECS, LoadedModel, load_model
from vlmkit.quantize import QUANTIZE_CHOICES

# --dtype choices. bfloat16 halves the bytes a decoding step reads and runs matrix products on the CPU's
# bf16 units (AVX-512 BF16): faster for models of ~100M parameters and up, with answers that can
# differ from float32's after a near-tie. float16 is left out: CPU kernels for it are slow.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """Add --device (vlmkit.devices.resolve_device reads it): every verb that runs a model has it."""
    p.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def add_model_flag(p: argparse.ArgumentParser) -> None:
    """Add the required --model flag (what vlmkit.load.load_model accepts), --dtype and --device."""
    p.add_argument("--model", required=True,
                   help=f"a model directory, a .gguf file, a Hugging Face hub id (owner/name[@revision]; a local "
                        f"folder of that name wins), or one of: {', '.join(SPECIAL_SPECS)}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the weights (and so the activations) to this type; on a CPU the KV cache "
                        "stays float32 (default: as loaded, float32)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="int8 (per output channel) or int4 (groups of 32 inputs; int4-g64 / int4-g128 for larger "
                        "groups) weights for the language model's linear layers, through PyTorch's CPU kernels: "
                         "faster decoding, slower prefill; computes in bfloat16 unless --dtype says otherwise "
                         "(float32 is slower than unquantized float32 on a CPU); nf4: QLoRA's 4-bit NormalFloat "
                         "(torchao, dequantized per matmul: smallest, slowest); gguf keeps a .gguf file's Q4_x / "
                         "Q5_x / Q8_0 blocks as they are (Q6_K matrices and other types are dequantized, with a "
                         "warning). A model folder is quantized layer by layer as it loads, so it never exists "
                         "in full as floats")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile: the first steps compile it (tens of seconds on a "
                        "CPU, reported on stderr), later ones run faster; needs a C++ compiler on a CPU")
    add_device_flag(p)


def load_model_of(args: argparse.Namespace) -> LoadedModel:
    """The model named by --model, cast to --dtype if given, on --device, quantized by --quantize if given, its
    decode step compiled with --compile (each compilation and its time reported on stderr)."""
    loaded = load_model(args.model, dtype=None if args.dtype is None else DTYPES[args.dtype], device=args.device,
                        quantize=args.quantize)
    if args.compile:
        compile_decoding(loaded.model, report=lambda text: print(text, file=sys.stderr, flush=True))
    return loaded


def add_data_flags(p: argparse.ArgumentParser, skipped: str) -> None:
    """Add --image-root and --data-policy (what data.formats.load_dataset takes as image_root and policy);
    skipped says what the verb does with the records skip drops, beside printing them."""
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder relative image paths are resolved against (default: the dataset's folder)")
    p.add_argument("--data-policy", default="fail", choices=POLICIES,
                   help=f"bad records: fail lists them all and stops (default); skip drops them, prints them "
                        f"and {skipped}")
