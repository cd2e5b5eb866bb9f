"""`vlmkit eval`: answer every sample of a dataset with a model and score the answers (eval/runner.py)."""

from __future__ import annotations

import argparse
import json

import torch

from vlmkit.commands.common import add_data_flags, add_model_flag, load_model_of
from vlmkit.data.formats import load_dataset, print_problems
from vlmkit.eval.runner import (DEFAULT_METRICS, METRICS, PREDICTIONS_FILE, SUMMARY_FILE, evaluate, get_metrics,
                                summary_table, write_results)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `eval`."""
    p = sub.add_parser("eval", help="answer every sample of a dataset and score the answers",
                       description="Evaluate a model on a LLaVA-style dataset: each conversation up to its last "
                                   "assistant turn is the prompt, that turn the reference; answers are greedy. "
                                   f"Prints the mean scores; with --out writes {PREDICTIONS_FILE} and {SUMMARY_FILE}.")
    add_model_flag(p)
    p.add_argument("--data", required=True, metavar="DATA.json", help="the dataset file (JSON or JSONL)")
    add_data_flags(p, "scores the others")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), metavar="A,B",
                   help=f"comma-separated metrics from: {', '.join(METRICS)} (default {','.join(DEFAULT_METRICS)})")
    p.add_argument("--out", default=None, metavar="DIR", help=f"write {PREDICTIONS_FILE} and {SUMMARY_FILE} here")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--answer-separator", default=None, metavar="TEXT",
                   help="split each reference into several accepted answers at this text (for anls, vqa_accuracy)")
    p.add_argument("--tesseract", action="store_true",
                   help="also read each one-image sample with Tesseract and report its scores beside the model's")
    p.add_argument("--tesseract-psm", type=int, default=7,
                   help="Tesseract page segmentation mode: 7 one text line (default), 6 a block, 3 automatic")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = list(get_metrics([name.strip() for name in args.metrics.split(",") if name.strip()]))
    # every image is decoded here, so an unreadable one is a listed problem and not a failure mid-run
    samples, problems = load_dataset(args.data, image_root=args.image_root, policy=args.data_policy,
                                     check_images=True)
    if problems:
        print_problems(problems)
    result = evaluate(load_model_of(args), samples, metrics, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, answer_separator=args.answer_separator,
                      compare_tesseract=args.tesseract, tesseract_psm=args.tesseract_psm, quiet=args.json)
    if args.out is not None:
        write_results(result, args.out)
    print(json.dumps(result.to_json(), ensure_ascii=False) if args.json else summary_table(result))
    return 0
