"""`vlmkit data synth`: write a synthetic dataset (images with their exact answers, LLaVA JSON; data/synth.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmkit.data.synth import DATASET_FILE, KINDS, TEXT_LANGUAGES, parse_size, synthesize


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `data` and its subcommand `synth`."""
    p = sub.add_parser("data", help="make datasets (data synth)", description="Make datasets.")
    data_sub = p.add_subparsers(dest="data_verb", required=True, metavar="SUBCOMMAND")
    s = data_sub.add_parser("synth", help="write a Vary-style synthetic dataset (images + LLaVA JSON)",
                            description="Synthesize images with their exact answers (rendered English or "
                                        "Chinese text, charts, tables, natural-image negatives, shape questions, grounding) "
                                        f"and write them as OUT/{DATASET_FILE} plus OUT/images/*.png. "
                                        "The same seed gives the same files.")
    s.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created if missing)")
    for kind in KINDS:
        s.add_argument(f"--{kind}", type=int, default=0, metavar="N", help=f"number of {kind} samples (default 0)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--image-size", default="256x256", metavar="WxH", help="image width x height (default 256x256)")
    s.add_argument("--lang", default="en", choices=TEXT_LANGUAGES,
                   help="language of lines, paragraphs and pages: en, zh (Chinese, needs apt fonts-noto-cjk) or "
                        "both (alternating); default en")
    s.set_defaults(run=_run_data_synth)


def _run_data_synth(args: argparse.Namespace) -> int:
    counts = {kind: getattr(args, kind) for kind in KINDS}
    samples = synthesize(args.out, counts, seed=args.seed, image_size=parse_size(args.image_size), lang=args.lang)
    print(f"wrote {len(samples)} samples to {Path(args.out) / DATASET_FILE}")
    return 0
