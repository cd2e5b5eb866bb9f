"""The verbs that plan before a model runs: `vlmkit presets` (the model presets, their sizes, image tokens and
training stages) and `vlmkit tokens` (how many tokens images cost under an image scheme, with an overlay)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmkit.image.load import load_image
from vlmkit.image.overlay import draw_plan
from vlmkit.image.plan import ImagePlan
from vlmkit.presets import PRESETS, SUMMARY_SIZES, get_preset, summarize
from vlmkit.schemes import SCHEMES, get_scheme
from vlmkit.schemes.base import check_work
from vlmkit.train.recipes import describe_recipe


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `presets` and `tokens`."""
    _add_presets(sub)
    _add_tokens(sub)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    sizes = ", ".join(f"{w}x{h}" for w, h in SUMMARY_SIZES)
    p = sub.add_parser("presets", help="list the model presets",
                       description="List the model presets: parts, parameter count (counted on the meta device) "
                                   f"and the image tokens of a {sizes} (width x height) image under each model's "
                                   "own image plan, then its training stages (train/recipes.py).")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per preset")
    p.set_defaults(run=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    rows = [{**summarize(name), "recipe": describe_recipe(name)} for name in PRESETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("\n".join(presets_table(rows)))
    return 0


def presets_table(rows: list[dict]) -> list[str]:
    """The lines of `vlmkit presets`: a header naming the columns, then per preset a line of its columns and
    two indented lines, its vision tower and its training stages (what --stage takes)."""
    sizes = list(rows[0]["tokens"]) if rows else []
    header = ["preset", "parameters", "scheme", "projector", "LM (x layers, w width)",
              *[f"tokens {size}" for size in sizes]]
    cells = [[r["name"], f"{r['parameters'] / 1e6:.2f}M", r["scheme"], r["projector"], r["lm"],
              *[str(r["tokens"][size]) for size in sizes]] for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    right = {1, *range(5, len(header))}  # numbers are right-aligned under their header

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    indent = " " * (widths[0] + 2)
    lines = [line(header).rstrip()]
    for r, values in zip(rows, cells):
        lines += [line(values).rstrip(), f"{indent}vision: {r['vision']}",
                  f"{indent}stages: {' -> '.join(stage['name'] for stage in r['recipe'])}"]
    return lines


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="plan how many tokens images cost under an image scheme",
                       description="Print each image's plan under an image scheme (sizes, grid, tokens per part) "
                                   "and the total: the token budget before a model ever runs. The images are "
                                   "planned as the images of one prompt.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to plan")
    p.add_argument("--scheme", required=True, metavar="S",
                   help="the image scheme, with its reference model's defaults (its preset's config): " + ", ".join(
                       f"{name} ({s.reference_preset})" for name, s in SCHEMES.items() if s.reference_preset))
    p.add_argument("--num-images-in-prompt", type=int, default=None, metavar="N",
                   help="how many images the prompt holds, for schemes that depend on it (tiles: tiling is off "
                        "above 2); default: the number of IMAGE arguments")
    p.add_argument("--overlay", default=None, metavar="OUT.png",
                   help="draw the grid and global view over each image: the first image to OUT.png, "
                        "the next ones to OUT-1.png, OUT-2.png, ... (each file written is named on stderr)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one plan summary per image")
    p.set_defaults(run=_run_tokens)


def overlay_paths(out: str, count: int) -> list[Path]:
    """Where `--overlay out.png` writes count images: out.png, out-1.png, out-2.png, ..."""
    path = Path(out)
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count)]


def _run_tokens(args: argparse.Namespace) -> int:
    scheme = get_scheme(args.scheme)
    if scheme.reference_preset is None:
        raise ValueError(f"--scheme {args.scheme} names no reference model to plan with; give one of "
                         f"{', '.join(n for n, s in SCHEMES.items() if s.reference_preset)}")
    cfg = get_preset(scheme.reference_preset)
    num_images = len(args.images)
    if args.num_images_in_prompt is not None:
        if not scheme.counts_images:
            raise ValueError(f"--num-images-in-prompt does not apply to --scheme {args.scheme}: its plan does not "
                             "depend on the number of images; leave it out")
        num_images = args.num_images_in_prompt
    if args.overlay is not None and Path(args.overlay).suffix.lower() != ".png":
        raise ValueError(f"--overlay {args.overlay}: the overlay is a PNG; give a path ending in .png")
    images = [load_image(path) for path in args.images]
    plans = []
    for image in images:
        check_work(scheme, cfg, image.size, num_images)  # as plan_image does, with --scheme's scheme
        plans.append(scheme.plan(cfg, image, num_images))
    if args.overlay is not None:
        for source, image, image_plan, path in zip(args.images, images, plans,
                                                   overlay_paths(args.overlay, len(images))):
            draw_plan(image, image_plan, scheme.geometry(image_plan)).save(path)
            print(f"overlay of {source} written to {path}", file=sys.stderr)  # stdout keeps the plans (--json)
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
        f"  grid            {rows}x{cols} {get_scheme(plan.scheme).grid_unit} (rows x cols)",
        f"  model parts     {listing(plan.parts)} = {plan.num_tokens} (num_tokens)",
        f"  text parts      {listing(plan.text_parts)}"
        + (f" = {sum(plan.text_parts.values())}" if plan.text_parts else ""),
        f"  context tokens  {plan.context_tokens}",
    ])
