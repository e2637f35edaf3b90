"""What every example shares: argument types, the device, and the curve it writes (CSV and PNG)."""

import argparse
import csv
import os
import time

import torch

from neuronml_fast import _outputs
from neuronml_fast.meta.cli import missing_package_note, nonnegative_int, number_argument, positive_float, positive_int

fraction = number_argument(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)


def parser(doc, iterations, out):
    """An example's argument parser: its description is the first paragraph of ``doc`` (the
    script's docstring), with the options every example has."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--iterations", type=positive_int, default=iterations, help="training iterations")
    parser.add_argument("--out", default=out, help="folder for curve.csv, curve.png and summary.txt")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the task sampler")
    parser.add_argument("--threads", type=nonnegative_int, default=0,
                        help="CPU threads for PyTorch (0: PyTorch's default)")
    return parser


def add_plastic_comparison(parser, metric, eager_iterations):
    """--report-every and --eager-iterations, for the examples that train a plastic network
    beside the published eager loop."""
    parser.add_argument("--report-every", type=positive_int, default=50,
                        help=f"iterations per point of the curve (mean {metric} over the block)")
    parser.add_argument("--eager-iterations", type=nonnegative_int, default=eager_iterations,
                        help="iterations of the published eager loop to time against (0: skip)")


def block_means(values, every):
    """Means of ``values`` over consecutive blocks of ``every`` (the last may be shorter)."""
    return [sum(values[i:i + every]) / len(values[i:i + every]) for i in range(0, len(values), every)]


def device(parser, name):
    """The torch.device for ``--device``, or a usage error naming the argument."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: expected a device this machine has, got {name!r} and no GPU is visible")
    return dev


def setup(parser, args):
    """Checks --out (before the work that fills it), applies --threads and --seed and returns the device."""
    problem = _outputs.folder_problem("--out", args.out)
    if problem:
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return device(parser, args.device)


def train_loop(step, iterations, dev, report_every, name, metric, fmt):
    """Runs ``step()`` (one optimizer step, returning its loss and metric as 0-d tensors)
    ``iterations`` times, printing the metric's mean over each block of ``report_every``; returns
    (losses, metrics, seconds per iteration)."""
    losses, metrics = [], []
    synchronize(dev)
    start = time.perf_counter()
    for _ in range(iterations):
        loss, value = step()
        losses.append(loss.detach())
        metrics.append(value.detach())
        if len(metrics) % report_every == 0:
            block = float(torch.stack(metrics[-report_every:]).mean())
            print(f"{name}: iteration {len(metrics)}/{iterations}, {metric} {block:{fmt}}", flush=True)
    synchronize(dev)
    seconds = (time.perf_counter() - start) / iterations
    return torch.stack(losses).tolist(), torch.stack(metrics).tolist(), seconds


def synchronize(dev):
    """Waits for the device's queued work, so wall-clock times measure the work itself."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def write_curve(out, rows, x, series, ylabel, title, log_y=False):
    """Writes ``out/curve.csv`` (every column of ``rows``) and ``out/curve.png`` (``series`` against
    ``x``). Without matplotlib the PNG is skipped with a note: the CSV holds the same numbers."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(missing_package_note("matplotlib", f"{os.path.join(out, 'curve.png')} is not drawn (curve.csv holds "
                                   "the same numbers)"))
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in series:
        points = [(row[x], row[column]) for row in rows if row.get(column) not in (None, "")]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=120)
    plt.close(fig)


def summarize(out, line):
    """Prints the one-line summary and keeps it beside the curve."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(line + "\n")
    print(line)
