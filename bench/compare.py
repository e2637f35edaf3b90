"""`python -m bench.compare BEFORE AFTER`: the same bench cases timed in two checkouts of the package,
alternating call by call, so that the machine's drift lands on both sides alike.

Each checkout (a folder with its own built extensions) gets a worker process that imports its own
``neuronml_fast`` and ``bench``, builds every selected case once and then times one case per
request; the controller alternates the two workers case by case and flips their order every round.
Only one worker runs at a time. Prints a Markdown table of medians and their ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_CASES = ["sensitivity", "masked_conv2d", "masked_linear", "plastic_rnn", "meta_iteration/maml"]


def _worker(cases, variant, sample_s):
    import torch  # noqa: F401  (imported by the checkout's own package below)

    from neuronml_fast._memory import keep_freed_memory

    from .cases import select
    from .runner import build_variants

    keep_freed_memory()
    timed = []
    for case in select(cases, False):
        _, variants = build_variants(case, "cpu", with_compile=False)
        fn = variants[variant]
        fn(0)  # first call: allocator growth, pools
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < sample_s:
            fn(calls)
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        timed.append((case.id, fn, max(1, int(sample_s / per_call))))
    print(json.dumps([case_id for case_id, _, _ in timed]), flush=True)
    for line in sys.stdin:
        _, fn, calls = timed[int(line)]
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        print(json.dumps((time.perf_counter() - start) / calls * 1e3), flush=True)


def _start(folder, args):
    command = [sys.executable, "-m", "bench.compare", "--worker", "--variant", args.variant,
               "--sample-s", str(args.sample_s), "--cases", *args.cases]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(folder)}
    return subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ask(worker, index):
    worker.stdin.write(f"{index}\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def compare(args):
    workers = {"before": _start(args.before, args), "after": _start(args.after, args)}
    ids = {name: json.loads(w.stdout.readline()) for name, w in workers.items()}
    if ids["before"] != ids["after"]:
        raise SystemExit(f"the checkouts select different cases: {ids}")
    samples = {(case, name): [] for case in ids["before"] for name in workers}
    for r in range(args.rounds):
        for i, case in enumerate(ids["before"]):
            order = ("before", "after") if (r + i) % 2 == 0 else ("after", "before")
            for name in order:
                samples[(case, name)].append(_ask(workers[name], i))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    print(f"| case ({args.variant}) | before ms | after ms | after/before |\n|---|---|---|---|")
    ratios = []
    for case in ids["before"]:
        before, after = (statistics.median(samples[(case, n)]) for n in ("before", "after"))
        ratios.append(after / before)
        print(f"| {case} | {before:.3f} | {after:.3f} | {after / before:.3f} |")
    print(f"\nmedians of {args.rounds} samples of about {args.sample_s} s each, the checkouts alternating call by "
          f"call; after/before geometric mean {statistics.geometric_mean(ratios):.3f}, range "
          f"{min(ratios):.3f}-{max(ratios):.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("before", nargs="?", help="checkout of the package before the change (extensions built)")
    p.add_argument("after", nargs="?", help="checkout after the change")
    p.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="case ids containing one of these strings")
    p.add_argument("--variant", default="cpu", help="the variant timed (a backend, or eager)")
    p.add_argument("--rounds", type=int, default=15, help="samples per case and checkout")
    p.add_argument("--sample-s", type=float, default=0.25, help="seconds per sample")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.cases, args.variant, args.sample_s)
    if not (args.before and args.after):
        p.error("before, after: expected two checkout folders")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
