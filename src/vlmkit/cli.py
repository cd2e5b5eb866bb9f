"""The `vlmkit` command line: `vlmkit <verb> --help` describes each verb.

    vlmkit generate --model smollm2-135m --prompt "What is the capital of France?"
    vlmkit generate --model tiny-random --image photo.jpg --prompt "Describe it." --json
    vlmkit presets --json
    vlmkit tokens photo.jpg scan.png --scheme anyres --overlay plan.png
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from vlmkit.generate import GenerationConfig, generate, stream
from vlmkit.image.load import load_image
from vlmkit.image.overlay import draw_plan
from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes import SCHEMES, get_scheme
from vlmkit.load import SPECIAL_SPECS, load_model
from vlmkit.presets import PRESETS, SUMMARY_SIZES, summarize


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt (optionally about images) and exit",
                       description="Answer one prompt with a model, streaming the text to stdout.")
    p.add_argument("--model", required=True,
                   help=f"a model directory, a .gguf file, or one of: {', '.join(SPECIAL_SPECS)}")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to ask about (repeat for several); placed before the prompt")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    images = [load_image(path) for path in args.image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    plans = loaded.plan_images(images)
    prompt = loaded.prompt_ids(messages, plans)
    prefill = loaded.image_inputs(plans)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                           stop_strings=tuple(args.stop), seed=args.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        if args.json:
            result = generate(loaded.model, [prompt], cfg, prefill_inputs=prefill, tokenizer=loaded.tokenizer)
            ids, reason, text = result.token_ids[0], result.finish_reasons[0], result.texts[0]
        else:
            pieces = stream(loaded.model, prompt, cfg, loaded.tokenizer, prefill_inputs=prefill)
            for piece in pieces:
                print(piece, end="", flush=True)
            print(flush=True)
            ids, reason = pieces.result.token_ids[0], pieces.result.finish_reasons[0]
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": loaded.name, "text": text, "finish_reason": reason,
                          "prompt_tokens": len(prompt), "completion_tokens": len(ids),
                          "seconds": round(seconds, 3)}, ensure_ascii=False))
    else:
        print(f"[{len(prompt)} prompt tokens, {len(ids)} generated in {seconds:.2f} s, {reason}]", file=sys.stderr)
    return 0


def _add_presets(sub: argparse._SubParsersAction) -> None:
    sizes = ", ".join(f"{w}x{h}" for w, h in SUMMARY_SIZES)
    p = sub.add_parser("presets", help="list the model presets",
                       description="List the model presets: parts, parameter count (counted on the meta device) "
                                   f"and the image tokens of a {sizes} (width x height) image under each model's "
                                   "own image plan.")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per preset")
    p.set_defaults(run=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    rows = [summarize(name) for name in PRESETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        tokens = "  ".join(f"{size}: {n}" for size, n in r["tokens"].items())
        print(f"{r['name']:<19} {r['parameters'] / 1e6:>10.2f}M  {r['scheme']:<7} {r['projector']:<28} "
              f"{r['lm']:<26} tokens {tokens}")
        print(f"{'':<19} {r['vision']}")
    return 0


GRID_UNITS = {"pad": "view", "anyres": "tiles", "hd": "crops", "tiles": "tiles", "slices": "slices",
              "dynamic": "14-px patches", "dual": "view"}


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="plan how many tokens images cost under an image scheme",
                       description="Print each image's plan under an image scheme (sizes, grid, tokens per part) "
                                   "and the total: the token budget before a model ever runs. The images are "
                                   "planned as the images of one prompt.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to plan")
    p.add_argument("--scheme", required=True, metavar="S",
                   help=f"the image scheme, with its reference model's defaults: {', '.join(SCHEMES)}")
    p.add_argument("--num-images-in-prompt", type=int, default=None, metavar="N",
                   help="how many images the prompt holds, for schemes that depend on it (tiles: tiling is off "
                        "above 2); default: the number of IMAGE arguments")
    p.add_argument("--overlay", default=None, metavar="OUT.png",
                   help="draw the grid and global view over each image: the first image to OUT.png, "
                        "the next ones to OUT-1.png, OUT-2.png, ...")
    p.add_argument("--json", action="store_true", help="print a JSON list, one plan summary per image")
    p.set_defaults(run=_run_tokens)


def overlay_paths(out: str, count: int) -> list[Path]:
    """Where `--overlay out.png` writes count images: out.png, out-1.png, out-2.png, ..."""
    path = Path(out)
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count)]


def _run_tokens(args: argparse.Namespace) -> int:
    plan = get_scheme(args.scheme)
    options = {}
    if "num_images" in inspect.signature(plan).parameters:
        given = args.num_images_in_prompt
        options["num_images"] = len(args.images) if given is None else given
    elif args.num_images_in_prompt is not None:
        raise ValueError(f"--num-images-in-prompt does not apply to --scheme {args.scheme}: its plan does not "
                         "depend on the number of images; leave it out")
    if args.overlay is not None and Path(args.overlay).suffix.lower() != ".png":
        raise ValueError(f"--overlay {args.overlay}: the overlay is a PNG; give a path ending in .png")
    images = [load_image(path) for path in args.images]
    plans = [plan(image, **options) for image in images]
    if args.overlay is not None:
        for image, image_plan, path in zip(images, plans, overlay_paths(args.overlay, len(images))):
            draw_plan(image, image_plan).save(path)
    if args.json:
        print(json.dumps([{"image": path, **p.summary()} for path, p in zip(args.images, plans)], indent=2))
        return 0
    for path, image_plan in zip(args.images, plans):
        print(_describe(path, image_plan))
    num_tokens = sum(p.num_tokens for p in plans)
    context = sum(p.context_tokens for p in plans)
    print(f"total: {len(plans)} image(s), {num_tokens} model-filled tokens, {context} context tokens")
    return 0


def _describe(path: str, plan: ImagePlan) -> str:
    """Several lines describing one image's plan, for `vlmkit tokens`."""
    def listing(parts: dict[str, int]) -> str:
        return " + ".join(f"{name} {count}" for name, count in parts.items()) or "none"
    rows, cols = plan.grid
    return "\n".join([
        f"{path}  ({plan.scheme})",
        f"  original size   {plan.original_size[0]}x{plan.original_size[1]}",
        f"  resized size    {plan.resized_size[0]}x{plan.resized_size[1]}",
        f"  grid            {rows}x{cols} {GRID_UNITS.get(plan.scheme, '')} (rows x cols)",
        f"  model parts     {listing(plan.parts)} = {plan.num_tokens} (num_tokens)",
        f"  text parts      {listing(plan.text_parts)}"
        + (f" = {sum(plan.text_parts.values())}" if plan.text_parts else ""),
        f"  context tokens  {plan.context_tokens}",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="vlmkit: vision-language models in pure PyTorch")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_generate(sub)
    _add_presets(sub)
    _add_tokens(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlmkit {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
