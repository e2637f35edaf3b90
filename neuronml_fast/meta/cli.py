"""``python -m neuronml_fast.meta train|compare``: meta-train and evaluate; time the backends side by side.

train:   a progress bar, periodic evaluation on held-out tasks, a checkpoint every
         ``--checkpoint-every`` iterations (``--resume`` continues from it), and at the end
         ``DIR/results.json`` (test_accuracy over ``--test-tasks`` evaluation tasks with its ci95,
         active_fraction, sec_per_iter, ...), ``DIR/curve.csv`` and ``DIR/curve.png``.
compare: meta-iterations of the reference loop, the fused task-batched layers and torch.func
         vmap (MAML only), interleaved in one process; prints medians and ratios.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

import torch

from .learners import MAML, PlasticHead, NeuronML, ci95
from .models import MLP, Conv4
from .tasks import NWayKShot, Omniglot, SinusoidTasks, random_episodes

ALGOS = ("maml", "neuronml", "plastic")
DATASETS = ("omniglot", "sinusoid")


# ---- arguments ----------------------------------------------------------------------------


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_common(parser):
    parser.add_argument("--algo", choices=ALGOS, default="maml")
    parser.add_argument("--dataset", choices=DATASETS, default="omniglot")
    parser.add_argument("--data-root", default=None, help="folder holding images_background(.zip) and "
                        "images_evaluation(.zip) (Omniglot)")
    parser.add_argument("--ways", type=_positive_int, default=5)
    parser.add_argument("--shots", type=_positive_int, default=None, help="default: 1 (Omniglot), 10 (sinusoid)")
    parser.add_argument("--queries", type=_positive_int, default=None,
                        help="query examples per class (Omniglot, default 15) or per task (sinusoid, default 10)")
    parser.add_argument("--meta-batch", type=_positive_int, default=None, help="default: 32 (Omniglot), 25 (sinusoid)")
    parser.add_argument("--inner-lr", type=float, default=None, help="default: 0.4 (Omniglot), 0.01 (sinusoid)")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true", help="first-order MAML (no second derivatives)")
    parser.add_argument("--downsample", choices=("stride", "pool"), default="stride", help="Conv4 variant")
    parser.add_argument("--target-active", type=float, default=0.5, help="NeuronML: frugality target")
    parser.add_argument("--lambda-frugality", type=float, default=1.0)
    parser.add_argument("--lambda-plasticity", type=float, default=0.1)
    parser.add_argument("--lambda-sensitivity", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m neuronml_fast.meta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train, evaluate, write DIR/results.json")
    _add_common(train)
    train.add_argument("--backend", choices=("reference", "fused"), default="fused")
    train.add_argument("--iterations", type=_positive_int, default=1000)
    train.add_argument("--time-limit", type=float, default=None, help="stop meta-training after this many minutes")
    train.add_argument("--meta-lr", type=float, default=1e-3)
    train.add_argument("--eval-inner-steps", type=int, default=None, help="inner steps at evaluation "
                       "(default: 3 for Omniglot as in Finn et al., else --inner-steps)")
    train.add_argument("--eval-every", type=int, default=100, help="0: only at the end")
    train.add_argument("--eval-tasks", type=_positive_int, default=100, help="tasks per periodic evaluation")
    train.add_argument("--test-tasks", type=_positive_int, default=600, help="evaluation tasks for the final test")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if it exists")
    train.add_argument("--out", required=True, help="output folder")
    compare = commands.add_parser("compare", help="time meta-iterations of reference, fused and torch.func vmap")
    _add_common(compare)
    compare.add_argument("--repeats", type=_positive_int, default=5)
    compare.add_argument("--warmup", type=int, default=1)
    compare.add_argument("--synthetic", action="store_true", help="random images instead of Omniglot")
    compare.add_argument("--json", default=None, help="also write the timings to this file")
    return parser


def _defaults(args):
    omniglot = args.dataset == "omniglot"
    args.shots = args.shots or (1 if omniglot else 10)
    args.queries = args.queries or (15 if omniglot else 10)
    args.meta_batch = args.meta_batch or (32 if omniglot else 25)
    args.inner_lr = args.inner_lr if args.inner_lr is not None else (0.4 if omniglot else 0.01)
    if args.inner_steps < 0:
        raise SystemExit(f"--inner-steps: expected an int >= 0, got {args.inner_steps}")
    if args.algo == "plastic" and not omniglot:
        raise SystemExit("--algo plastic: the plastic head is a classifier; use --dataset omniglot")
    if getattr(args, "eval_inner_steps", None) is None and args.command == "train":
        args.eval_inner_steps = max(args.inner_steps, 3) if omniglot else args.inner_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---- data and learner -----------------------------------------------------------------------


class _Sampler:
    """Meta-batches on the device: Omniglot episodes or sinusoid tasks."""

    def __init__(self, args, seed, data=None):
        self.args, self.device = args, torch.device(args.device)
        if args.dataset == "sinusoid":
            self.tasks = SinusoidTasks(seed)
        else:
            self.tasks = NWayKShot(data, args.ways, args.shots, args.queries, seed)

    def sample(self, tasks):
        if self.args.dataset == "sinusoid":
            batch = self.tasks.sample(tasks, self.args.shots, self.args.queries)
        else:
            batch = self.tasks.sample(tasks)
        return tuple(part.to(self.device) for part in batch)

    def state(self):
        return self.tasks.generator.get_state()

    def load_state(self, state):
        self.tasks.generator.set_state(state)


def _omniglot(args, split):
    if args.data_root is None:
        raise SystemExit("--data-root: required for --dataset omniglot (the folder with images_background.zip "
                         "and images_evaluation.zip)")
    return Omniglot(args.data_root, split)


def build_learner(args, backend):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.dataset == "sinusoid":
        model, kind = MLP().to(device), "regression"
    else:
        model, kind = Conv4(args.ways, downsample=args.downsample).to(device), "classification"
    if args.algo == "plastic":
        return PlasticHead(model, args.ways, backend=backend)
    options = dict(kind=kind, inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=args.first_order,
                   backend=backend)
    if args.algo == "maml":
        return MAML(model, **options)
    return NeuronML(model, lambda_frugality=args.lambda_frugality, lambda_plasticity=args.lambda_plasticity,
                    lambda_sensitivity=args.lambda_sensitivity, target_active=args.target_active, **options)


def evaluate(learner, sampler, tasks, batch_size, steps):
    """Per-task scores over ``tasks`` sampled tasks, and the mean active fraction."""
    scores, active = [], []
    remaining = tasks
    while remaining > 0:
        count = min(batch_size, remaining)
        score, fraction = learner.evaluate(sampler.sample(count), steps)
        scores.append(score.detach().cpu())
        active.append(fraction * count)
        remaining -= count
    return torch.cat(scores), sum(active) / tasks


# ---- train ------------------------------------------------------------------------------


def _git_commit():
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _progress(total, initial):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety, not a dependency
        return None
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr)


def train(args):
    os.makedirs(args.out, exist_ok=True)
    regression = args.dataset == "sinusoid"
    background = None if regression else _omniglot(args, "background")
    evaluation = None if regression else _omniglot(args, "evaluation")
    train_tasks = _Sampler(args, args.seed, background)
    val_tasks = _Sampler(args, args.seed + 1, evaluation)
    learner = build_learner(args, args.backend)
    optimizer = torch.optim.Adam(learner.module.parameters(), lr=args.meta_lr)
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    curve, start, elapsed = [], 0, 0.0
    if args.resume and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, weights_only=False)
        learner.module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        train_tasks.load_state(state["sampler"])
        curve, start, elapsed = state["curve"], state["iteration"], state["train_seconds"]
        print(f"resumed from {checkpoint_path} at iteration {start}", file=sys.stderr)

    def save_checkpoint(iteration):
        torch.save({"module": learner.module.state_dict(), "optimizer": optimizer.state_dict(),
                    "sampler": train_tasks.state(), "curve": curve, "iteration": iteration,
                    "train_seconds": elapsed, "args": vars(args)}, checkpoint_path + ".tmp")
        os.replace(checkpoint_path + ".tmp", checkpoint_path)

    bar = _progress(args.iterations, start)
    iteration = start
    metric = "mse" if regression else "accuracy"
    while iteration < args.iterations:
        if args.time_limit is not None and elapsed >= args.time_limit * 60:
            print(f"time limit of {args.time_limit} min reached at iteration {iteration}", file=sys.stderr)
            break
        batch = train_tasks.sample(args.meta_batch)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stats = learner.meta_backward(batch)
        optimizer.step()
        elapsed += time.perf_counter() - began
        iteration += 1
        row = {"iteration": iteration, "train_seconds": round(elapsed, 3), "meta_loss": stats["loss"],
               f"train_{metric}": stats["score"], "active_fraction": stats["active_fraction"]}
        if (args.eval_every > 0 and iteration % args.eval_every == 0) or iteration == args.iterations:
            scores, _ = evaluate(learner, val_tasks, args.eval_tasks, args.meta_batch, args.eval_inner_steps)
            row[f"val_{metric}"] = float(scores.mean())
        curve.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("meta_loss", f"val_{metric}",
                                                                            "active_fraction")})
        if args.checkpoint_every and iteration % args.checkpoint_every == 0:
            save_checkpoint(iteration)
    if bar is not None:
        bar.close()
    save_checkpoint(iteration)
    test_tasks = _Sampler(args, args.seed + 2, evaluation)
    began = time.perf_counter()
    scores, active = evaluate(learner, test_tasks, args.test_tasks, args.meta_batch, args.eval_inner_steps)
    results = {
        "algo": args.algo, "dataset": args.dataset, "backend": args.backend, "ways": args.ways, "shots": args.shots,
        "queries": args.queries, "meta_batch": args.meta_batch, "inner_steps": args.inner_steps,
        "eval_inner_steps": args.eval_inner_steps, "first_order": args.first_order, "iterations": iteration,
        f"test_{metric}": float(scores.mean()), "ci95": ci95(scores), "test_tasks": args.test_tasks,
        "active_fraction": active, "sec_per_iter": elapsed / max(iteration, 1), "train_seconds": elapsed,
        "eval_seconds": time.perf_counter() - began, "seed": args.seed, "device": _device_name(args.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": _git_commit(),
        "command": "python -m neuronml_fast.meta " + " ".join(sys.argv[1:]),
    }
    if regression:
        results["test_accuracy"] = None  # regression: see test_mse
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _write_curve(curve, args.out, metric)
    print(json.dumps(results, indent=2))
    return results


def _device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _write_curve(curve, out, metric):
    if not curve:
        return
    keys = list(dict.fromkeys(k for row in curve for k in row))  # columns in order of first appearance
    with open(os.path.join(out, "curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(curve)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    its = [r["iteration"] for r in curve]
    axes[0].plot(its, [r["meta_loss"] for r in curve], lw=0.6)
    axes[0].set(xlabel="meta-iteration", ylabel="meta-loss (query)", yscale="log")
    val = [(r["iteration"], r[f"val_{metric}"]) for r in curve if f"val_{metric}" in r]
    axes[1].plot(its, [r[f"train_{metric}"] for r in curve], lw=0.4, alpha=0.5, label="train (query)")
    if val:
        axes[1].plot(*zip(*val), marker="o", label="held-out tasks")
    axes[1].set(xlabel="meta-iteration", ylabel=metric)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=110)
    plt.close(fig)


# ---- compare ----------------------------------------------------------------------------


def compare(args):
    from . import functorch_maml

    if args.dataset == "omniglot" and not args.synthetic:
        batch = _Sampler(args, args.seed, _omniglot(args, "background")).sample(args.meta_batch)
    elif args.dataset == "omniglot":
        episodes = random_episodes(args.meta_batch, args.ways, args.shots, args.queries, seed=args.seed)
        batch = tuple(part.to(args.device) for part in episodes)
    else:
        batch = _Sampler(args, args.seed).sample(args.meta_batch)
    runners = {}
    for backend in ("reference", "fused"):
        learner = build_learner(args, backend)
        runners[backend] = (learner, learner.meta_backward)
    if functorch_maml.available(runners["reference"][0]):
        learner = build_learner(args, "reference")
        runners["torch.func vmap"] = (learner, lambda b, learner=learner: functorch_maml.meta_backward(learner, b))
    times = {name: [] for name in runners}
    synchronize = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    for repeat in range(args.warmup + args.repeats):
        for name, (learner, step) in runners.items():  # interleaved: drift hits every backend alike
            learner.module.zero_grad(set_to_none=True)
            synchronize()
            began = time.perf_counter()
            step(batch)
            synchronize()
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - began)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    base = medians["reference"]
    print(f"{args.algo} {args.dataset} {args.ways}-way {args.shots}-shot, {args.queries} queries, meta-batch "
          f"{args.meta_batch}, {args.inner_steps} inner step(s), {'first' if args.first_order else 'second'} order, "
          f"{_device_name(args.device)}, {torch.get_num_threads()} threads; median of {args.repeats}")
    for name, median in medians.items():
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:<16} {median:8.3f} s/iter  (range {spread})  reference/this = {base / median:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "seconds": times, "median": medians}, f, indent=2)
    return medians


def main(argv=None):
    from .._memory import keep_freed_memory

    args = _defaults(build_parser().parse_args(argv))
    keep_freed_memory()  # same allocator settings for every backend compared (see neuronml_fast/_memory.py)
    return train(args) if args.command == "train" else compare(args)
