"""Image preprocessing speed: vlmkit's anyres and dynamic schemes vs transformers' PIL image processors.

    python bench/bench_images.py                 # default: 1 thread, 7 repetitions
    python bench/bench_images.py --reps 15 --threads 1 --json bench/results/images.json

What is measured: images per second, each image processed alone as a server would
(one call per image, batch 1), for

- anyres (LLaVA-v1.6 settings: grid pinpoints of 336-px tiles, CLIP mean/std):
  vlmkit `plan_anyres` vs transformers `LlavaNextImageProcessorPil`;
- dynamic (Qwen2-VL defaults: min_pixels 56*56, max_pixels 28*28*1280):
  vlmkit `plan_dynamic` vs transformers `Qwen2VLImageProcessorPil`,

on four real photos (matplotlib's grace_hopper, scikit-image's astronaut, coffee and
chelsea), each resized beforehand to five sizes: small 320x240, 640x480, 1280x720,
tall 480x1280 and wide 1600x400. A size's row times its four photos; the "all" row
all twenty.

Before any timing, every image's outputs are compared (pixel values within 1e-5, same
shapes and grids), so both sides do the same work. Each repetition times transformers
and vlmkit back to back, alternating which goes first, so machine noise hits both
alike; the first repetition warms up and is dropped. Reported: medians with the
min-max spread over repetitions, and the speed-up as the median of the per-repetition
ratios. The last column is the ceiling any implementation reaches when it must give
these exact pixels: the images/s of the Pillow bicubic resizes alone (the calls both
sides make: anyres the base view and the canvas, dynamic the smart_resize size),
divided by transformers' images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data
import torch
import transformers
from PIL import Image

from vlmkit.schemes.anyres import LLAVA_V16_PINPOINTS, fit_within, plan_anyres, select_best_resolution
from vlmkit.schemes.dynamic import (IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, MERGE_SIZE, PATCH_SIZE, plan_dynamic,
                                          smart_resize)
from vlmkit.config import CLIP_MEAN, CLIP_STD

TILE, PATCH = 336, 14
SIZES = {"small 320x240": (320, 240), "640x480": (640, 480), "1280x720": (1280, 720),
         "tall 480x1280": (480, 1280), "wide 1600x400": (1600, 400)}  # name -> (width, height)
TOLERANCE = 1e-5
BICUBIC = Image.Resampling.BICUBIC


def photos() -> dict[str, Image.Image]:
    """The four real photos as RGB PIL images."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        images = {"grace_hopper": Image.open(f).convert("RGB")}
    for name in ("astronaut", "coffee", "chelsea"):
        images[name] = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return images


def anyres_pair() -> tuple[Callable, Callable, Callable, Callable]:
    """(transformers call, vlmkit call, output check, the resizes both make) for anyres."""
    processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in LLAVA_V16_PINPOINTS], image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD))

    def reference(image):
        return processor(images=image, return_tensors="pt")

    def ours(image):
        return plan_anyres(image, LLAVA_V16_PINPOINTS, TILE, CLIP_MEAN, CLIP_STD, PATCH)

    def check(image) -> float:
        expected, got = reference(image)["pixel_values"][0], ours(image).pixel_values  # (views, 3, 336, 336)
        if expected.shape != got.shape:
            raise SystemExit(f"anyres: {image.size} gives views {tuple(got.shape)}, "
                             f"transformers {tuple(expected.shape)}")
        return (expected - got).abs().max().item()

    def resizes(image):
        canvas = select_best_resolution((image.height, image.width), LLAVA_V16_PINPOINTS)
        new_h, new_w = fit_within((image.height, image.width), canvas)
        image.resize((TILE, TILE), BICUBIC)
        image.resize((new_w, new_h), BICUBIC)

    return reference, ours, check, resizes


def dynamic_pair() -> tuple[Callable, Callable, Callable, Callable]:
    """(transformers call, vlmkit call, output check, the resize both make) for dynamic."""
    processor = transformers.Qwen2VLImageProcessorPil()

    def reference(image):
        return processor(images=image, return_tensors="pt")

    def ours(image):
        return plan_dynamic(image)

    def check(image) -> float:
        expected, plan = reference(image), ours(image)
        if tuple(expected["image_grid_thw"][0].tolist()) != plan.extra["image_grid_thw"]:
            raise SystemExit(f"dynamic: {image.size} gives grid {plan.extra['image_grid_thw']}, "
                             f"transformers {expected['image_grid_thw'][0].tolist()}")
        return (expected["pixel_values"] - plan.pixel_values).abs().max().item()  # (patches, 1176)

    def resizes(image):
        new_h, new_w = smart_resize(image.height, image.width, PATCH_SIZE * MERGE_SIZE, IMAGE_MIN_PIXELS,
                                    IMAGE_MAX_PIXELS)
        image.resize((new_w, new_h), BICUBIC)

    return reference, ours, check, resizes


def seconds(fn: Callable, images: list[Image.Image]) -> float:
    """Wall time of fn on every image, one call per image."""
    start = time.perf_counter()
    for image in images:
        fn(image)
    return time.perf_counter() - start


def measure(pair: tuple[Callable, Callable, Callable, Callable], images: list[Image.Image],
            reps: int) -> dict[str, float]:
    """Medians, spreads and ratio of images/s over reps interleaved repetitions (after one warm-up)."""
    reference, ours, _, resizes = pair
    runs: dict[str, list[float]] = {"transformers": [], "vlmkit": [], "resize": []}
    for rep in range(reps + 1):
        order = [("transformers", reference), ("vlmkit", ours)]
        order = order if rep % 2 else order[::-1]
        timings = {name: seconds(fn, images) for name, fn in order + [("resize", resizes)]}
        if rep:
            for name, t in timings.items():
                runs[name].append(len(images) / t)
    ratios = [o / r for o, r in zip(runs["vlmkit"], runs["transformers"])]
    result = {}
    for name, rates in runs.items():
        result[name], result[f"{name}_min"], result[f"{name}_max"] = statistics.median(rates), min(rates), max(rates)
    result["speedup"] = statistics.median(ratios)
    result["speedup_min"], result["speedup_max"] = min(ratios), max(ratios)
    result["ceiling"] = result["resize"] / result["transformers"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per row (medians reported), at least 5")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.reps < 5:
        parser.error(f"--reps {args.reps} is too few for a median; use at least 5")
    torch.set_num_threads(args.threads)

    originals = photos()
    sets = {name: [p.resize(size, BICUBIC) for p in originals.values()] for name, size in SIZES.items()}
    sets["all"] = [image for images in list(sets.values()) for image in images]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for scheme, pair in (("anyres", anyres_pair()), ("dynamic", dynamic_pair())):
        worst = max(pair[2](image) for image in sets["all"])
        if worst > TOLERANCE:
            raise SystemExit(f"{scheme}: pixel values differ from transformers by {worst:.2e} > {TOLERANCE}; "
                             "the comparison would not be of equal work")
        print(f"{scheme}: outputs agree with transformers, max abs diff {worst:.1e}", flush=True)
        results[scheme] = {name: measure(pair, images, args.reps) for name, images in sets.items()}
        results[scheme]["max_abs_diff"] = {"value": worst}

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, Pillow {Image.__version__}, "
          f"numpy {np.__version__}, threads {args.threads}; images/s, median [min-max] of {args.reps} repetitions")
    header = (f"{'scheme':<8}{'images':<15}{'transformers':>22}{'vlmkit':>22}{'speed-up':>22}"
              f"{'resize only':>13}{'ceiling':>9}")
    print(header)
    for scheme, rows in results.items():
        for name, r in rows.items():
            if name == "max_abs_diff":
                continue
            cells = [f"{r[k]:.1f} [{r[k + '_min']:.1f}-{r[k + '_max']:.1f}]" for k in ("transformers", "vlmkit")]
            speed = f"{r['speedup']:.2f}x [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"
            print(f"{scheme:<8}{name:<15}{cells[0]:>22}{cells[1]:>22}{speed:>22}{r['resize']:>13.1f}"
                  f"{r['ceiling']:>8.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"reps": args.reps, "threads": args.threads, "torch": torch.__version__,
                "transformers": transformers.__version__}
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2))


if __name__ == "__main__":
    main()
