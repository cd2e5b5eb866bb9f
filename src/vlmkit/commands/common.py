"""What several verb modules share: the --model flag of every verb that loads a model (vlmkit/load.py)."""

from __future__ import annotations

import argparse

from vlmkit.load import SPECIAL_SPECS


def add_model_flag(p: argparse.ArgumentParser) -> None:
    """Add the required --model flag: what vlmkit.load.load_model accepts."""
    p.add_argument("--model", required=True,
                   help=f"a model directory, a .gguf file, or one of: {', '.join(SPECIAL_SPECS)}")
