"""What a training run records as it goes: metrics.csv, the loss curve and the progress display.

    write_metrics(out / "metrics.csv", rows)      # atomically: a kill leaves the old file or the new one
    rows = read_metrics(out / "metrics.csv", upto=checkpoint_step)
    plot_loss(out / "metrics.csv", out / "loss.png")
    with Progress(start, total, enabled=True, every=10) as bar: bar.update(step, loss, lr, samples_per_s, tokens_per_s)
    with contextlib.closing(TensorBoardLog("runs/a/tensorboard", rows_before)) as tb: tb.write(row)

metrics.csv has one row per optimizer step with the columns of `METRICS`; floats are written with repr,
so equal text means equal bits. matplotlib and tqdm are optional: without them there is no loss.png (a
note on stderr says so) and progress is a printed line every `every` steps. Progress shows the step's
loss, lr, samples/s and tokens/s (the input tokens of its batches, image tokens included, padding not counted).

TensorBoard (optional, `pip install tensorboard`): TensorBoardLog writes each metrics row's columns other
than step as scalars `train/<column>` at global step = the row's step, through
torch.utils.tensorboard.SummaryWriter (TensorBoard keeps them as float32). A resumed run opens it with
purge_step 1 and writes the rows it read back from metrics.csv again, so TensorBoard drops what a killed run
wrote (or lost unflushed) and shows one value per step, the ones metrics.csv holds.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from vlmkit.files import write_text_atomically

METRICS = ("step", "loss", "lr", "samples_per_s", "grad_norm")
MetricRow = dict[str, Any]
TENSORBOARD_PREFIX = "train/"  # scalar tags: train/loss, train/lr, ...


def read_metrics(path: Path, upto: int) -> list[MetricRow]:
    """The rows of metrics.csv up to step `upto` (rows after a checkpoint are redone on resume)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


def write_metrics(path: Path, rows: list[MetricRow]) -> None:
    """Replace path with rows atomically: a kill leaves the old file or the new one, never half of one."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, text.getvalue())


def plot_loss(metrics_csv: str | Path, png: str | Path) -> Path | None:
    """Draw the loss curve of a metrics.csv into png (matplotlib, Agg backend). Returns png, or None with a
    note on stderr when matplotlib is not installed (it is not a dependency of vlmkit)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed, so {png} was not drawn; pip install matplotlib", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(metrics_csv).open(newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


class Progress:
    """tqdm when installed (it is not a vlmkit dependency), else a printed line every `every` steps; a
    context manager that closes the bar on exit."""

    def __init__(self, start: int, total: int, enabled: bool, every: int) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, samples_per_s: float, tokens_per_s: float) -> None:
        """Show that step (1-based) is done with this loss, learning rate and throughput (samples and input
        tokens per second)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s  "
                                     f"{tokens_per_s:.0f} tokens/s", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s  "
                  f"{tokens_per_s:.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the tqdm bar, if there is one."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        """The progress display itself."""
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Close the bar, also when training raised."""
        self.close()


def check_tensorboard() -> None:
    """Raise ValueError (the flag cannot be used here; the CLI prints it as an error) saying what to install
    when the tensorboard package, which SummaryWriter needs, is missing: it is an optional extra of vlmkit."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package, which is not installed: "
                          "pip install tensorboard  (or pip install 'vlmkit[tensorboard]')")


class TensorBoardLog:
    """metrics.csv's rows as TensorBoard scalars in `log_dir` (see the module docstring); close() flushes
    and closes the event file (use it under contextlib.closing). rows: the rows of the steps done before (a resumed run's,
    read back from metrics.csv): every event already in log_dir is purged and these are written again, so
    the log holds exactly metrics.csv's rows whatever a killed run had written or not yet flushed."""

    def __init__(self, log_dir: str | Path, rows: list[MetricRow]) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=1 if rows else None, flush_secs=10)
        for row in rows:
            self.write(row)

    def write(self, row: MetricRow) -> None:
        """Add one metrics row: every column but step, at global step row["step"]."""
        for column in METRICS[1:]:
            self.writer.add_scalar(TENSORBOARD_PREFIX + column, float(row[column]), int(row["step"]))

    def close(self) -> None:
        """Flush the events to disk and close the file."""
        self.writer.close()
