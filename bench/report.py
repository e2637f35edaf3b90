"""Terminal table, JSON and CSV in the results folder, and PNG plots."""

import csv
import datetime
import json
import math
import os
import platform
import subprocess

import torch

import neuronml_fast as nf

from .ceilings import METHOD as ROOFLINE_METHOD

ABOVE_CEILING_NOTE = ("* ran past its ceiling: no kernel can, so this is a defect of the ceiling probes (a shape, "
                      "cache level or thread count they miss), listed in the JSON's `ceiling_defects` to be fixed; "
                      "the raw fraction is `roofline_above_ceiling`, and 100 % here is a floor, not a measurement.")


def ceiling_defects(rows):
    """[(case, variant, raw roofline fraction)] of the rows that ran past their ceiling. The
    ceilings are measured to be unreachable (ceilings.py), so each such row shows a probe that
    misses what the case does, never a kernel faster than the machine."""
    return [(r.case, r.variant, r.extra["roofline_above_ceiling"]) for r in rows
            if "roofline_above_ceiling" in r.extra]


def metadata(device, ceilings):
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": str(device),
        "device_name": name,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "neuronml_fast": nf.__version__,
        "ceilings": {"copy_gbps": ceilings.copy_gbps, "read_gbps": ceilings.read_gbps,
                     "matmul_tflops": ceilings.matmul_tflops},
        # How the roofline column was computed; results files without this key used the
        # whole-machine ceilings above, measured once at the start of the run.
        "roofline": ROOFLINE_METHOD,
    }


def _fmt(x, digits=2, suffix=""):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}{suffix}"


def _roofline_cell(row):
    cell = _fmt(100 * row.roofline_fraction, 1, "%")
    return cell + "*" if "roofline_above_ceiling" in row.extra else cell


def table(rows):
    """Markdown table, speedups first; one line per case and variant."""
    cross = any("do_bench_ms" in r.extra for r in rows)  # GPU: triton.testing.do_bench beside ours
    header = "| case | variant | vs eager | vs compile | median ms | IQR ms | roofline |" + (" do_bench ms |" if cross else "")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if cross else "")]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.variant} | {_fmt(r.speedup_vs_eager, 2, 'x')} | {_fmt(r.speedup_vs_compile, 2, 'x')} "
            f"| {_fmt(r.median_ms, 3)} | {_fmt(r.q1_ms, 3)}-{_fmt(r.q3_ms, 3)} "
            f"| {_roofline_cell(r)} |"
            + (f" {_fmt(r.extra.get('do_bench_ms', float('nan')), 3)} |" if cross else "")
        )
    defects = ceiling_defects(rows)
    if defects:
        lines += ["", ABOVE_CEILING_NOTE, "ceiling defects: " + "; ".join(f"{c} / {v} ({100 * f:.0f} %)"
                                                                      for c, v, f in defects)]
    return "\n".join(lines)


def write(rows, meta, out_dir, tag, extra=None):
    from .memory import table as memory_table

    extra = extra or {}
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, tag)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": [r.__dict__ for r in rows],
                   "ceiling_defects": [list(d) for d in ceiling_defects(rows)], **extra}, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        fields = ["case", "variant", "median_ms", "q1_ms", "q3_ms", "speedup_vs_eager", "speedup_vs_compile",
                  "roofline_fraction"]
        writer.writerow(fields + ["roofline_above_ceiling", "device", "git_commit"])
        for r in rows:
            writer.writerow([getattr(r, k) for k in fields] + [r.extra.get("roofline_above_ceiling", ""),
                                                               meta["device_name"], meta["git_commit"]])
    with open(base + ".md", "w") as f:
        f.write(f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, commit {meta['git_commit']}, "
                f"{meta['date'][:10]}; copy {meta['ceilings']['copy_gbps']:.1f} GB/s, "
                f"read {meta['ceilings']['read_gbps']:.1f} GB/s, matmul "
                + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in meta["ceilings"]["matmul_tflops"].items())
                + f" at the start; roofline: {meta['roofline']}\n\n" + table(rows) + "\n")
        if "plastic_memory" in extra:
            f.write("\n" + memory_table(extra["plastic_memory"]) + "\n")
    return [base + ext for ext in (".json", ".csv", ".md")]


def plots(rows, out_dir, tag):
    """One PNG per family with a swept parameter; returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for family, plotter in PLOTTERS.items():
        family_rows = [r for r in rows if r.family == family]
        if not family_rows:
            continue
        fig = plotter(plt, family_rows)
        if fig is None:
            continue
        path = os.path.join(out_dir, f"{tag}-{family}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _speedup_bars(plt, rows):
    cases = sorted({r.case for r in rows})
    variants = [v for v in ("compile", "cpu", "triton", "cuda") if any(r.variant == v for r in rows)]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(cases)), 3.2))
    width = 0.8 / max(1, len(variants))
    for k, v in enumerate(variants):
        values = [next((r.speedup_vs_eager for r in rows if r.case == c and r.variant == v), 0) for c in cases]
        ax.bar([i + k * width for i in range(len(cases))], values, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels([c.split("/", 1)[1] for c in cases], rotation=20, ha="right")
    ax.set_ylabel("speedup vs eager")
    ax.legend()
    return fig


def _masked_fraction(plt, rows):
    by_active = {}
    for r in rows:
        p = r.params
        if p.get("tasks") or not p.get("backward", True) or r.variant == "eager":
            continue
        by_active.setdefault(r.variant, []).append((p["active"], r.speedup_vs_eager))
    if not by_active:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for variant, points in by_active.items():
        points.sort()
        ax.plot([100 * a for a, _ in points], [s for _, s in points], marker="o", label=variant)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("active neurons (%)")
    ax.set_ylabel("fwd+bwd speedup vs eager")
    ax.set_title("masked conv, Conv4 block")
    ax.legend()
    return fig


def _time_bars(plt, rows):
    cases = sorted({r.case for r in rows})
    variants = sorted({r.variant for r in rows}, key=lambda v: (v != "eager", v))
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(cases)), 3.2))
    width = 0.8 / max(1, len(variants))
    for k, v in enumerate(variants):
        values = [next((r.median_ms / 1e3 for r in rows if r.case == c and r.variant == v), 0) for c in cases]
        ax.bar([i + k * width for i in range(len(cases))], values, width, label="reference loop" if v == "eager" else v)
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels([c.split("/", 1)[1] for c in cases], rotation=15, ha="right")
    ax.set_ylabel("seconds per meta-iteration")
    ax.legend()
    return fig


PLOTTERS = {"meta_iteration": _time_bars, "neuron_sensitivity": _speedup_bars, "masked_conv2d": _masked_fraction, "plastic_rnn": _speedup_bars}
