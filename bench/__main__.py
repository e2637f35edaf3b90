"""`python -m bench` (what `make bench` runs): time every case on this machine and report."""

import argparse
import os
import sys
import time

import torch

from . import ceilings as ceilings_mod
from . import memory, report
from .cases import select
from .runner import kernel_backends, run_case

HERE = os.path.dirname(os.path.abspath(__file__))
# A run writes to an untracked folder; the committed reference results in bench/results/ change
# only when asked for by name (--out bench/results).
DEFAULT_OUT = os.path.join(HERE, "out")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--cases", nargs="*", help="only cases whose id contains one of these strings")
    p.add_argument("--full", action="store_true", help="include the long cases and take more samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=None, help="samples per variant (default 7, --full 15)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/out, untracked); "
                   "--out bench/results replaces the committed reference results")
    p.add_argument("--tag", default=None, help="results file name (default: cpu or gpu)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p.parse_args(argv)


def _progress(items):
    try:
        from tqdm import tqdm
        return tqdm(items, file=sys.stderr, unit="case", dynamic_ncols=True)
    except ImportError:
        return items


def main(argv=None):
    from neuronml_fast._memory import keep_freed_memory

    args = parse(argv)
    keep_freed_memory()  # every variant runs with the same allocator settings
    cases = select(args.cases, args.full)
    if args.list or not cases:
        print("\n".join(c.id for c in cases) or "no case matches --cases")
        return 0 if cases else 2
    device = torch.device(args.device)
    rounds = args.rounds or (15 if args.full else 7)
    print(f"device {device}, backends timed: {', '.join(kernel_backends(device)) or 'none'}; "
          f"{len(cases)} cases, {rounds} interleaved rounds each", file=sys.stderr)
    start = time.time()
    ceilings = ceilings_mod.measure(device, quick=not args.full)
    rows = []
    for case in (bar := _progress(cases)):
        if hasattr(bar, "set_description"):
            bar.set_description(case.id[:40])
        rows += run_case(case, device, rounds=rounds, with_compile=not args.no_compile, quick=not args.full)
    tag = args.tag or ("gpu" if device.type == "cuda" else "cpu")
    meta = report.metadata(device, ceilings)
    extra = {}
    if any(c.family == "plastic_rnn" for c in cases):
        extra["plastic_memory"] = memory.plastic_memory(device)
    files = report.write(rows, meta, args.out, tag, extra) + report.plots(rows, args.out, tag)
    print()
    print(open(os.path.join(args.out, tag + ".md")).read())
    print(f"{len(rows)} timings in {time.time() - start:.0f} s; wrote {', '.join(os.path.relpath(f) for f in files)}")
    defects = report.ceiling_defects(rows)
    if defects:
        print(f"warning: {len(defects)} rows ran past their ceilings: the ceiling probes miss these cases "
              "(bench/ceilings.py), see 'ceiling defects' above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
