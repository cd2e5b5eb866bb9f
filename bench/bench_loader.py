"""Whether `vlmkit train --workers N` helps: training throughput with the batches built in-process (0) and in
N DataLoader worker processes, on a synthetic dataset of large photos (`vlmkit data synth --negatives`, which
must be decoded and resized to the model's 336 px every time a sample is read).

    python bench/bench_loader.py                                  # llava-1.5-small, 1024x768 photos, workers 0 1 2
    python bench/bench_loader.py --preset qwen2-vl-small --image-size 640x480 --reps 3

Each repetition runs every worker count once, in turn (so machine noise hits all alike), as one in-process
run_training of --steps steps (batch --batch-size, torch --threads); a run's throughput is its samples over the
summed step times from metrics.csv (each step's time includes waiting for its batch), the first step left out
(it starts the workers). Also timed: building the batches alone, in this process (`data only`), and the
train steps on batches already built (`compute only`), which bound what overlapping them can win.
Medians over the repetitions are printed.

Measured on the 2-core CI machine while other jobs shared it (load average 2-7, so +-20 % between runs of
one setting), llava-1.5-small (336-px pad scheme, 576 image tokens), batch 8, torch threads 2:
    48 photos 1024x768, 3 reps:  workers 0: 2.1  1: 2.2  2: 2.8 samples/s   (data only 11.5, compute only 2.5)
    the same, again, 3 reps:     workers 0: 1.7  1: 1.9  2: 2.0 samples/s   (data only 6.2, compute only 2.3)
    32 photos 2048x1536, 2 reps: workers 0: 2.5  1: 2.8  2: 2.5 samples/s   (data only 6.0, compute only 7.2)
Workers win 5-30 % in most of these runs, about the noise; with 2 cores the workers and torch's compute threads
take turns on the same cores, so the gain is bounded well below the sum of the two halves. On a machine with
free cores (or a GPU doing the compute) the overlap is what removes the data time from the step.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmkit.data.formats import load_dataset
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.train.batches import ShuffledBatches
from vlmkit.train.loop import train
from vlmkit.train.run import (
    RunConfig,
    build_stage,
    load_for_training,
    prepare_data,
    run_training,
)


def _throughput(run: Path) -> float:
    """Samples per second over the steps after the first (metrics.csv's per-step samples_per_s)."""
    with (run / "metrics.csv").open(newline="") as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)][1:]
    return len(rates) / sum(1 / r for r in rates)  # every step has the same number of samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-1.5-small")
    parser.add_argument("--image-size", default="1024x768", metavar="WxH")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", default=None, help="a synth folder to reuse (default: a new temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data or tempfile.mkdtemp(prefix="bench-loader-"))
    if not (root / DATASET_FILE).is_file():
        width, height = (int(v) for v in args.image_size.split("x"))
        synthesize(root, {"negatives": args.samples}, seed=0, image_size=(width, height), progress=False)
    data = root / DATASET_FILE
    base = {"model": args.preset, "data": str(data), "stage": "full", "steps": args.steps,
            "batch_size": args.batch_size, "threads": args.threads, "progress": False, "log_every": 1000}

    # the two halves alone: building batches in this process, and training on batches built beforehand
    samples, _ = load_dataset(data, policy="fail")
    loaded = load_for_training(args.preset, samples, 0)
    examples, _ = prepare_data(samples, loaded)
    t0 = time.perf_counter()
    stream = iter(ShuffledBatches(examples, args.batch_size, 0, seed=0))
    built = [next(stream) for _ in range(args.steps)]
    data_only = args.batch_size * args.steps / (time.perf_counter() - t0)
    stage = build_stage(RunConfig(out=str(root / "unused"), **base))
    t0 = time.perf_counter()
    train(loaded.model, built, stage, args.steps, progress=False)
    compute_only = args.batch_size * args.steps / (time.perf_counter() - t0)

    results: dict[int, list[float]] = {n: [] for n in args.workers}
    with tempfile.TemporaryDirectory() as runs:
        for rep in range(args.reps):
            for workers in args.workers:
                out = Path(runs) / f"r{rep}w{workers}"
                run_training(RunConfig(out=str(out), workers=workers, **base))
                results[workers].append(_throughput(out))
    print(f"{args.preset}, {args.samples} photos of {args.image_size}, batch {args.batch_size}, {args.steps} steps, "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs")
    print(f"data only (batches built in this process): {data_only:.1f} samples/s")
    print(f"compute only (steps on batches built before): {compute_only:.1f} samples/s")
    for workers, rates in results.items():
        print(f"--workers {workers}: {statistics.median(rates):.1f} samples/s (median of {len(rates)}: "
              f"{', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()
