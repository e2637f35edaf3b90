"""``python -m neuronml_fast.meta train|compare|scaling``: meta-train and evaluate; time the backends side by side.

train:   a progress bar, periodic evaluation on held-out tasks, a checkpoint every
         ``--checkpoint-every`` iterations (``--resume`` continues from it; a folder that holds a
         run is continued with ``--resume`` or replaced with ``--overwrite``, never silently), and at the end
         ``DIR/results.json`` (test_accuracy over ``--test-tasks`` evaluation tasks with its ci95,
         active_fraction, sec_per_iter, ...), ``DIR/curve.csv`` and ``DIR/curve.png``.
compare: meta-iterations of the reference loop, the fused task-batched layers and torch.func
         vmap (MAML only), interleaved in one process; a line per learner and repeat on stderr,
         then medians and ratios.
scaling: meta-iterations of the same meta-batch on 1 rank x N threads and on N ranks x 1 thread
         (torch.distributed, gloo, this machine): medians and the speed-up.

``torchrun --nproc_per_node=N -m neuronml_fast.meta train ...`` (``--nnodes``/``--rdzv-*`` across
machines) splits each meta-batch over N ranks: see neuronml_fast/meta/distributed.py and
docs/distributed.md.

--backend takes the package's backend names: ``reference`` runs the plain PyTorch learner (tasks
in a loop), ``auto``, ``cpu``, ``triton`` and ``cuda`` the fused learner (tasks batched) with the
package's ops on that backend.
"""

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import time

import warnings

import torch

from .. import _outputs
from .. import backends as package_backends

from .distributed import DEFAULT_TIMEOUT_S, DistributedError, World, environment_rank, shard, task_seed
from .learners import MAML, PlasticHead, NeuronML, ci95
from .models import MLP, Conv4
from .tasks import NWayKShot, Omniglot, SinusoidTasks, random_episodes

ALGOS = ("maml", "neuronml", "plastic")
DATASETS = ("omniglot", "sinusoid")


# ---- arguments ----------------------------------------------------------------------------

# The package's backend names: "reference" runs the plain PyTorch learner (tasks in a loop), the
# others the fused learner (tasks batched) with the package's ops on that backend.
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
DEPRECATED_BACKENDS = {"fused": "auto"}  # the learner's own name, from before the CLI used the package's
RUN_FILES = ("results.json", "checkpoint.pt", "curve.csv", "curve.png")


class _Parser(argparse.ArgumentParser):
    """An argument parser that stays silent on the ranks other than 0 (``quiet``): torchrun's ranks
    parse the same command line, and one copy of a usage error is enough."""

    quiet = False

    def error(self, message):
        if self.quiet:
            self.exit(2)
        super().error(message)

    def print_usage(self, file=None):
        if not self.quiet:
            super().print_usage(file)

    def print_help(self, file=None):
        if not self.quiet:
            super().print_help(file)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, except where there is none to show (a flag, or a
    default that depends on --dataset and is spelled out in the help)."""

    def _get_help_string(self, action):
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if no_default or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def number_argument(kind, expected, accept):
    """An argparse type: ``kind(text)`` where ``accept`` holds it, else a usage error naming what was
    expected (the examples' arguments use it too)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # what argparse names in "invalid <type> value"
    return parse


positive_int = number_argument(int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = number_argument(int, "an integer >= 0", lambda v: v >= 0)
positive_float = number_argument(float, "a number > 0", lambda v: v > 0 and v != float("inf"))
nonnegative_float = number_argument(float, "a number >= 0", lambda v: 0 <= v < float("inf"))
fraction = number_argument(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)


def _add_common(parser, data_root=True):
    parser.add_argument("--algo", choices=ALGOS, default="maml", help="meta-learner: MAML, NeuronML "
                        "(MAML with a learned frugal structure) or a plastic output layer")
    parser.add_argument("--dataset", choices=DATASETS, default="omniglot", help="task distribution")
    if data_root:
        parser.add_argument("--data-root", default=None, help="folder holding images_background(.zip) and "
                            "images_evaluation(.zip); required for Omniglot")
    else:  # the command reads no images
        parser.set_defaults(data_root=None)
    parser.add_argument("--ways", type=positive_int, default=5, help="classes per task (Omniglot)")
    parser.add_argument("--shots", type=positive_int, default=None,
                        help="support examples per class (Omniglot) or per task (sinusoid); "
                        "default: 1 (Omniglot), 10 (sinusoid)")
    parser.add_argument("--queries", type=positive_int, default=None,
                        help="query examples per class (Omniglot) or per task (sinusoid); "
                        "default: 15 (Omniglot), 10 (sinusoid)")
    parser.add_argument("--meta-batch", type=positive_int, default=None,
                        help="tasks per meta-iteration; default: 32 (Omniglot), 25 (sinusoid)")
    parser.add_argument("--inner-lr", type=positive_float, default=None,
                        help="inner-loop SGD step size; default: 0.4 (Omniglot), 0.01 (sinusoid)")
    parser.add_argument("--inner-steps", type=nonnegative_int, default=1, help="inner-loop SGD steps in training")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML (no second derivatives)")
    parser.add_argument("--downsample", choices=("stride", "pool"), default="stride",
                        help="Conv4 variant: stride-2 convs (Finn et al.'s Omniglot model) or max-pooling")
    parser.add_argument("--target-active", type=fraction, default=0.5,
                        help="NeuronML: fraction of neurons the frugality term holds active")
    parser.add_argument("--lambda-frugality", type=nonnegative_float, default=1.0,
                        help="NeuronML: weight of the frugality term")
    parser.add_argument("--lambda-plasticity", type=nonnegative_float, default=0.1,
                        help="NeuronML: weight of the plasticity term (tasks use different neurons)")
    parser.add_argument("--lambda-sensitivity", type=nonnegative_float, default=0.1,
                        help="NeuronML: weight of the sensitivity term (active neurons are the important ones)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the task samplers")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")


def build_parser():
    parser = _Parser(prog="python -m neuronml_fast.meta", description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train, evaluate, write DIR/results.json",
                                description="Meta-train, evaluate on held-out tasks, write DIR/results.json, "
                                "curve.csv and curve.png.", formatter_class=_HelpFormatter)
    _add_common(train)
    train.add_argument("--backend", choices=BACKENDS + tuple(DEPRECATED_BACKENDS), default="auto",
                       help="reference: the plain PyTorch learner, tasks in a loop; auto, cpu, triton, cuda: the "
                       "fused learner, tasks batched, on that backend of the package (fused: deprecated "
                       "name of auto)")
    train.add_argument("--iterations", type=positive_int, default=1000, help="meta-iterations")
    train.add_argument("--time-limit", type=positive_float, default=None,
                       help="stop meta-training after this many minutes")
    train.add_argument("--meta-lr", type=positive_float, default=1e-3, help="Adam learning rate of the meta-update")
    train.add_argument("--eval-inner-steps", type=nonnegative_int, default=None, help="inner steps at evaluation "
                       "(default: 3 for Omniglot as in Finn et al., else --inner-steps)")
    train.add_argument("--eval-every", type=nonnegative_int, default=100,
                       help="meta-iterations between evaluations on held-out tasks; 0: only at the end")
    train.add_argument("--eval-tasks", type=positive_int, default=100, help="tasks per periodic evaluation")
    train.add_argument("--test-tasks", type=positive_int, default=600, help="evaluation tasks for the final test")
    train.add_argument("--checkpoint-every", type=nonnegative_int, default=100,
                       help="meta-iterations between checkpoints; 0: only at the end")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in DIR from DIR/checkpoint.pt, "
                          f"with its settings (only {RESUMABLE} may change)")
    existing.add_argument("--overwrite", action="store_true", help="replace a previous run in DIR")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="output folder; one that holds a run needs --resume or --overwrite")
    _add_dist_timeout(train)
    compare = commands.add_parser("compare", help="time meta-iterations of reference, fused and torch.func vmap",
                                  description="Time meta-iterations of the reference learner, the fused learner "
                                  "and torch.func vmap (MAML), interleaved; print medians and ratios.",
                                  formatter_class=_HelpFormatter)
    _add_common(compare)
    compare.add_argument("--backend", choices=tuple(b for b in BACKENDS if b != "reference")
                         + tuple(DEPRECATED_BACKENDS), default="auto",
                         help="the package backend the fused learner runs on (fused: deprecated name of auto)")
    compare.add_argument("--repeats", type=positive_int, default=5, help="timed meta-iterations per learner")
    compare.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed meta-iterations per learner first")
    compare.add_argument("--synthetic", action="store_true", help="random images instead of Omniglot")
    compare.add_argument("--json", default=None, help="also write the timings to this file")
    scaling = commands.add_parser("scaling", help="time the same meta-batch on 1 rank x N threads and N ranks x 1 "
                                  "thread", description="Time meta-iterations of the same meta-batch on 1 rank x N "
                                  "threads and on N ranks x 1 thread (torch.distributed, gloo, on this machine); "
                                  "print medians and the speed-up. Omniglot runs on random episodes of its shapes "
                                  "(pixels do not change the time), so no --data-root. The default meta-batch is "
                                  "rounded up to a multiple of --ranks.", formatter_class=_HelpFormatter)
    _add_common(scaling, data_root=False)
    scaling.add_argument("--backend", choices=("auto", "reference", "cpu"), default="auto",
                         help="reference: the plain PyTorch learner; auto, cpu: the fused learner on that backend")
    scaling.add_argument("--ranks", type=positive_int, default=2, help="N: processes of the distributed run, "
                         "and threads of the single-process run")
    scaling.add_argument("--repeats", type=positive_int, default=5, help="timed meta-iterations per configuration")
    scaling.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed meta-iterations first")
    scaling.add_argument("--json", default=None, help="also write the timings to this file")
    _add_dist_timeout(scaling)
    parser.commands = {"train": train, "compare": compare, "scaling": scaling}  # errors after parsing show their usage
    return parser


def _add_dist_timeout(parser):
    parser.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                        help="seconds a collective may wait for the other ranks (under torchrun) before the job "
                        "ends with an error naming the rank")


def _check_device(parser, args):
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"--device: expected cpu here (torch sees no CUDA device), got {args.device!r}")
        if device.index is not None and device.index >= count:
            parser.error(f"--device: expected cuda:0..cuda:{count - 1} ({count} CUDA device(s) here), "
                         f"got {args.device!r}")


def _check_backend(parser, args):
    if args.backend in DEPRECATED_BACKENDS:
        replacement = DEPRECATED_BACKENDS[args.backend]
        warnings.warn(f"--backend {args.backend} is deprecated: it means --backend {replacement} (the fused "
                      f"learner on the package's {replacement} backend)", FutureWarning, stacklevel=2)
        args.backend = replacement
    if args.backend in ("auto", "reference"):
        return
    device_type = torch.device(args.device).type
    status = package_backends.status(args.backend)
    if device_type not in status.devices:
        usable = [b for b in BACKENDS
                  if b in ("auto", "reference") or device_type in package_backends.status(b).devices]
        parser.error(f"--backend: expected a backend that runs on {device_type} here ({', '.join(usable)}), "
                     f"got {args.backend!r} ({status.state}; {status.detail})")


def out_problem(args):
    """A folder that holds a run is continued (--resume) or replaced (--overwrite), never silently mixed,
    and ``--out`` is a folder this process can write: the usage error, or None."""
    problem = _outputs.folder_problem("--out", args.out)
    if problem:
        return problem
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if not found:
        return None
    if args.resume and "checkpoint.pt" not in found:
        return (f"--resume: expected {os.path.join(args.out, 'checkpoint.pt')} to continue from, got a folder "
                f"holding {', '.join(found)} without it (--overwrite replaces that run)")
    if not args.resume and not args.overwrite:
        return (f"--out: expected a folder without a previous run, got {args.out!r} holding "
                f"{', '.join(found)} (--resume continues that run, --overwrite replaces it)")
    return None


# The settings a resumed run may change: where and how fast it runs, how often it reports, when it
# stops. Every other setting of `run_config` (and the seed) must be the checkpoint's.
RESUMABLE = ("--iterations (not below the iterations done), --time-limit, --backend, --device, --threads, "
             "--eval-every, --eval-tasks, --test-tasks, --checkpoint-every, --dist-timeout")


def _run_settings(args):
    settings = {key: value for key, value in run_config(args).items() if key not in ("backend", "learner")}
    return {**settings, "seed": args.seed}


def resume_problem(args):
    """--resume continues the run the checkpoint holds, with its settings: the usage error naming each
    setting given otherwise (and --iterations below the iterations done), or None."""
    path = os.path.join(args.out, "checkpoint.pt")
    if not args.resume or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    stored = state.get("args")
    if stored is not None:
        theirs, ours = _run_settings(argparse.Namespace(**stored)), _run_settings(args)
        differ = [f"--{key.replace('_', '-')} {ours.get(key)} (the run has {theirs.get(key)})"
                  for key in ours if key in theirs and theirs[key] != ours[key]]
        if differ:
            return (f"--resume: expected the settings of the run in {path}, got {', '.join(differ)}; only "
                    f"{RESUMABLE} may change")
    done = state.get("iteration", 0)
    if args.iterations < done:
        return (f"--iterations: expected at least {done} to resume the run in {path} (the iterations it has done), "
                f"got {args.iterations}")
    return None


def _check(parser, args):
    _check_device(parser, args)
    _check_backend(parser, args)
    if args.algo == "plastic" and args.dataset != "omniglot":
        parser.error(f"--algo plastic: expected --dataset omniglot (the plastic head is a classifier), "
                     f"got --dataset {args.dataset}")
    if args.command == "scaling" and args.threads is not None:
        parser.error(f"--threads: expected none (scaling runs 1 rank x --ranks threads and --ranks ranks x 1 thread), "
                     f"got {args.threads}")
    problem = getattr(args, "json", None) and _outputs.file_problem("--json", args.json)
    if problem:
        parser.error(problem)
    needs_archives = args.dataset == "omniglot" and args.command != "scaling" and not getattr(args, "synthetic", False)
    if needs_archives and args.data_root is None:
        parser.error("--data-root: expected the folder holding images_background.zip and images_evaluation.zip "
                     "(required for --dataset omniglot), got none")


def _defaults(args):
    omniglot = args.dataset == "omniglot"
    args.shots = args.shots or (1 if omniglot else 10)
    args.queries = args.queries or (15 if omniglot else 10)
    if args.meta_batch is None:
        args.meta_batch = 32 if omniglot else 25
        if args.command == "scaling":  # each of the --ranks ranks takes an equal share
            args.meta_batch = -(-args.meta_batch // args.ranks) * args.ranks
    args.inner_lr = args.inner_lr if args.inner_lr is not None else (0.4 if omniglot else 0.01)
    if getattr(args, "eval_inner_steps", None) is None and args.command == "train":
        args.eval_inner_steps = max(args.inner_steps, 3) if omniglot else args.inner_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---- data and learner -----------------------------------------------------------------------


class _Sampler:
    """Meta-batches on the device, Omniglot episodes or sinusoid tasks: task ``index`` of round
    ``round_`` (a meta-iteration, an evaluation) of ``stream`` from its own seed, so any split of a
    batch over ranks draws the tasks one process draws (`neuronml_fast.meta.distributed.task_seed`)."""

    def __init__(self, args, stream, data=None):
        self.args, self.stream, self.device = args, stream, torch.device(args.device)
        if args.dataset == "sinusoid":
            self.tasks = SinusoidTasks()
        else:
            self.tasks = NWayKShot(data, args.ways, args.shots, args.queries)

    def _one(self):
        if self.args.dataset == "sinusoid":
            return self.tasks.sample(1, self.args.shots, self.args.queries)
        return self.tasks.sample(1)

    def sample(self, round_, indices):
        """The tasks ``indices`` (a range) of round ``round_``, stacked: ``(x_support [T, ...], ...)``."""
        tasks = []
        for index in indices:
            self.tasks.generator.manual_seed(task_seed(self.args.seed, self.stream, round_, index))
            tasks.append(self._one())
        return tuple(torch.cat(part).to(self.device) for part in zip(*tasks))


# Names in the errors of the loader and sampler, as the CLI spells them.
_OPTION_NAMES = {"data_root": "--data-root", "ways": "--ways", "shots, queries": "--shots, --queries"}


def _usage_message(error):
    text = str(error).strip("'\"")
    for name, option in _OPTION_NAMES.items():
        if text.startswith(name + ":"):
            return option + text[len(name):]
    return f"--data-root: {text}"


def data_root_problem(args, splits):
    """Every archive a run needs is there before minutes are spent decoding the first one: the usage
    error, or None."""
    root = args.data_root
    if not splits:
        return None
    if not os.path.isdir(root):
        return f"--data-root: expected a folder holding the Omniglot archives, got {root!r} (no such folder)"
    for split in splits:
        names = (f"images_{split}.zip", f"images_{split}")
        if not any(os.path.exists(os.path.join(root, name)) for name in names):
            held = ", ".join(sorted(os.listdir(root))[:8]) or "nothing"
            return (f"--data-root: expected a folder holding {names[0]} or {names[1]}/, got {root!r} "
                    f"(it holds {held})")
    return None


def read_omniglot(args, splits, say=True):
    """({split: Omniglot}, None), checked against --ways/--shots/--queries, or (None, the usage error)."""
    data = {}
    for split in splits:
        if say:
            print(f"loading Omniglot {split} from {args.data_root}", file=sys.stderr, flush=True)
        try:
            data[split] = Omniglot(args.data_root, split)
            NWayKShot(data[split], args.ways, args.shots, args.queries)
        except (FileNotFoundError, ValueError) as error:
            return None, _usage_message(error)
        except ImportError as error:  # pillow missing: the error says how to get it
            return None, str(error)
    return data, None


def learner_kind(backend):
    """The meta-learner a CLI backend runs: the plain PyTorch loop or the fused, task-batched one."""
    return "reference" if backend == "reference" else "fused"


def build_learner(args, backend):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.dataset == "sinusoid":
        model, kind = MLP().to(device), "regression"
    else:
        model, kind = Conv4(args.ways, downsample=args.downsample).to(device), "classification"
    backend = learner_kind(backend)
    if args.algo == "plastic":
        return PlasticHead(model, args.ways, backend=backend)
    options = dict(kind=kind, inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=args.first_order,
                   backend=backend)
    if args.algo == "maml":
        return MAML(model, **options)
    return NeuronML(model, lambda_frugality=args.lambda_frugality, lambda_plasticity=args.lambda_plasticity,
                    lambda_sensitivity=args.lambda_sensitivity, target_active=args.target_active, **options)


def evaluate(learner, sampler, round_, tasks, batch_size, steps, world=None):
    """Per-task scores of the ``tasks`` tasks of round ``round_``, and the mean active fraction.

    Across ranks each evaluates its `shard` of the tasks, ``batch_size`` at a time, and every rank
    gets every score, in task order.
    """
    world = world or World()
    mine = shard(tasks, world.size, world.rank)
    rows = []
    for start in range(mine.start, mine.stop, batch_size):
        indices = range(start, min(start + batch_size, mine.stop))
        score, active = learner.evaluate(sampler.sample(round_, indices), steps)
        rows.append(torch.stack([score.detach().cpu().double(), torch.full((len(indices),), float(active),
                                                                          dtype=torch.float64)], 1))
    rows = torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
    rows = world.gather_shards(rows, tasks)
    return rows[:, 0], float(rows[:, 1].mean())


# ---- train ------------------------------------------------------------------------------


def _git_commit():
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


EXTRA = "pip install 'neuronml_fast[meta]'"  # the extra that brings pillow, matplotlib and tqdm


def missing_package_note(package, consequence):
    """The one line that says an optional package is missing, what that costs, and how to get it."""
    return f"note: {package} is not installed, so {consequence} ({EXTRA} installs it)"


class _TextProgress:
    """Progress as plain lines on stderr, about every twentieth of the run: what `train` shows
    without tqdm."""

    def __init__(self, total, initial):
        self.total, self.done = total, initial
        self.every = max(1, (total - initial) // 20)
        self.postfix = {}

    def set_postfix(self, values):
        self.postfix = dict(values)
        if self.done % self.every == 0 or self.done == self.total:
            values = ", ".join(f"{key} {value}" for key, value in self.postfix.items())
            print(f"iteration {self.done}/{self.total}" + (f": {values}" if values else ""), file=sys.stderr,
                  flush=True)

    def update(self, count):
        self.done += count

    def close(self):
        pass


def _progress(total, initial):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety, not a dependency: plain lines instead
        _say(missing_package_note("tqdm", "progress is printed as plain lines instead of a bar"))
        return _TextProgress(total, initial)
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr)


def _clear_run(out):
    """--overwrite: the previous run's files go first, so none of them outlives the new run."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


def run_config(args):
    """The settings of this run that apply to its task and algorithm, as results.json records them."""
    config = {"algo": args.algo, "dataset": args.dataset, "backend": args.backend,
              "learner": learner_kind(args.backend)}
    if args.dataset == "omniglot":
        config.update(ways=args.ways, shots=args.shots, queries=args.queries, downsample=args.downsample)
    else:  # a sinusoid task is a regression: shots and queries are points per task, there are no classes
        config.update(shots=args.shots, queries=args.queries)
    config.update(meta_batch=args.meta_batch, meta_lr=args.meta_lr)
    if args.algo in ("maml", "neuronml"):
        config.update(inner_lr=args.inner_lr, inner_steps=args.inner_steps, eval_inner_steps=args.eval_inner_steps,
                      first_order=args.first_order)
    if args.algo == "neuronml":
        config.update(target_active=args.target_active, lambda_frugality=args.lambda_frugality,
                      lambda_plasticity=args.lambda_plasticity, lambda_sensitivity=args.lambda_sensitivity)
    return config


def train(args, data=None, world=None):
    """Meta-train on ``data`` ({split: Omniglot}; None for sinusoids) and write the run to ``args.out``.

    ``world`` (a `World`): this process's share of a distributed run; one process when None.
    """
    with package_backends.use_backend(args.backend):  # "reference" or the fused learner's backend
        if world is None or not world.joined:
            return _train(args, data or {})
        return _train(args, data or {}, world)


# What a checkpoint's tasks were drawn with: per-task seeds (`_Sampler`) resume at any world size.
TASK_SEEDS = "per-task seeds"


def _resume_state(args, path, world):
    """The checkpoint to continue from, read by rank 0 and sent to every rank; None without one."""
    state, problem = None, None
    if world.is_main and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("tasks") != TASK_SEEDS:
            state, problem = None, (f"--resume: expected a checkpoint whose tasks come from {TASK_SEEDS}, got {path} "
                                    f"written with a sequential task sampler (--overwrite starts the run anew)")
    state, problem = world.broadcast((state, problem), "broadcast of the checkpoint")
    if problem:
        raise ValueError(problem)
    return state


def _command(args, world):
    module = "-m neuronml_fast.meta " + " ".join(args.argv)
    if not world.joined:
        return "python " + module
    nodes = os.environ.get("GROUP_WORLD_SIZE", "?")
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
    return f"torchrun --nnodes={nodes} --nproc_per_node={per_node} {module}"


class _Run:
    """A training run's state from iteration to iteration: what a checkpoint saves and a resume
    restores."""

    def __init__(self, args, world):
        self.args, self.world = args, world
        self.learner = build_learner(args, args.backend)
        self.learner.task_gather = world.gather_tasks
        self.optimizer = torch.optim.Adam(self.learner.module.parameters(), lr=args.meta_lr)
        self.checkpoint_path = os.path.join(args.out, "checkpoint.pt")
        self.curve, self.iteration, self.elapsed = [], 0, 0.0

    def resume(self):
        state = _resume_state(self.args, self.checkpoint_path, self.world)
        if state is None:
            return
        self.learner.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.curve, self.iteration, self.elapsed = state["curve"], state["iteration"], state["train_seconds"]
        if self.world.is_main:
            print(f"resumed from {self.checkpoint_path} at iteration {self.iteration} (written by "
                  f"{state.get('world_size', 1)} rank(s), continued by {self.world.size})", file=sys.stderr)

    def save_checkpoint(self):
        # Every rank holds the same parameters after the all-reduce; the barrier makes rank 0's file
        # the state of an iteration every rank has finished.
        self.world.barrier(f"barrier before the checkpoint of iteration {self.iteration}")
        if not self.world.is_main:
            return
        torch.save({"module": self.learner.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "tasks": TASK_SEEDS, "curve": self.curve, "iteration": self.iteration,
                    "train_seconds": self.elapsed, "world_size": self.world.size, "args": vars(self.args)},
                   self.checkpoint_path + ".tmp")
        os.replace(self.checkpoint_path + ".tmp", self.checkpoint_path)

    def out_of_time(self):
        """One decision for every rank: a rank that stopped alone would leave the others waiting."""
        limit = self.args.time_limit
        if limit is None or not self.world.any(self.elapsed >= limit * 60):
            return False
        if self.world.is_main:
            print(f"time limit of {limit} min reached at iteration {self.iteration}", file=sys.stderr)
        return True

    def meta_iteration(self, batch):
        """One meta-update on this rank's share of the meta-batch; the averaged statistics."""
        world, began = self.world, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        # NeuronML's backward all-gathers (reduce-scatters) its structure's gradients.
        stats = world.run(f"meta-iteration {self.iteration + 1}", self.learner.meta_backward, batch)
        stats = world.average_gradients(self.learner.module.parameters(), stats,
                                        f"all-reduce of the meta-gradient of iteration {self.iteration + 1}")
        self.optimizer.step()
        self.elapsed += time.perf_counter() - began
        self.iteration += 1
        return stats


def _train(args, data, world=None):
    world = world or World()
    if world.is_main:
        if args.overwrite:
            _clear_run(args.out)
        os.makedirs(args.out, exist_ok=True)
    train_tasks = _Sampler(args, "train", data.get("background"))
    val_tasks = _Sampler(args, "validation", data.get("evaluation"))
    run = _Run(args, world)
    if args.resume:
        run.resume()
    per_rank = args.meta_batch // world.size
    _meta_train(run, train_tasks, val_tasks, per_rank)
    run.save_checkpoint()
    return _test_and_report(run, data, per_rank)


def _meta_train(run, train_tasks, val_tasks, per_rank):
    """Meta-iterations up to ``--iterations`` (or the time limit), with validation and checkpoints."""
    args, world = run.args, run.world
    mine = range(world.rank * per_rank, (world.rank + 1) * per_rank)
    metric = _metric(args)
    bar = _progress(args.iterations, run.iteration) if world.is_main else None
    while run.iteration < args.iterations and not run.out_of_time():
        stats = run.meta_iteration(train_tasks.sample(run.iteration, mine))
        iteration = run.iteration
        row = {"iteration": iteration, "train_seconds": round(run.elapsed, 3), "meta_loss": stats["loss"],
               f"train_{metric}": stats["score"], "active_fraction": stats["active_fraction"]}
        if (args.eval_every > 0 and iteration % args.eval_every == 0) or iteration == args.iterations:
            scores, _ = evaluate(run.learner, val_tasks, iteration, args.eval_tasks, per_rank, args.eval_inner_steps,
                                 world)
            row[f"val_{metric}"] = float(scores.mean())
        run.curve.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("meta_loss", f"val_{metric}",
                                                                            "active_fraction")})
        if args.checkpoint_every and iteration % args.checkpoint_every == 0:
            run.save_checkpoint()
    if bar is not None:
        bar.close()


def _metric(args):
    return "mse" if args.dataset == "sinusoid" else "accuracy"


def _test_and_report(run, data, per_rank):
    """The score on the test tasks, and results.json and the curve in ``--out``."""
    args, world, metric = run.args, run.world, _metric(run.args)
    test_tasks = _Sampler(args, "test", data.get("evaluation"))
    began = time.perf_counter()
    scores, active = evaluate(run.learner, test_tasks, 0, args.test_tasks, per_rank, args.eval_inner_steps, world)
    results = {
        **run_config(args), "iterations": run.iteration, f"test_{metric}": float(scores.mean()),
        "ci95": ci95(scores), "test_tasks": args.test_tasks, "active_fraction": active,
        "sec_per_iter": run.elapsed / max(run.iteration, 1), "train_seconds": run.elapsed,
        "eval_seconds": time.perf_counter() - began, "seed": args.seed, "device": _device_name(args.device),
        **world.describe(), "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": _git_commit(),
        "command": _command(args, world),
    }
    if world.is_main:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        _write_curve(run.curve, args.out, metric)
        print(json.dumps(results, indent=2))
    return results


def _timing_setup(args):
    """The problem a timing command measured, for its report's first line."""
    if args.dataset == "sinusoid":
        task = f"sinusoid {args.shots}-shot regression"
    else:
        random_images = args.command == "scaling" or getattr(args, "synthetic", False)
        task = f"omniglot {args.ways}-way {args.shots}-shot" + (" (random images)" if random_images else "")
    if args.algo == "plastic":
        adaptation = "no inner steps (the plastic head adapts through its trace)"
    else:
        adaptation = f"{args.inner_steps} inner step(s), {'first' if args.first_order else 'second'} order"
    return f"{args.algo} {task}, {args.queries} queries, meta-batch {args.meta_batch}, {adaptation}"


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
        _say(missing_package_note("matplotlib", f"{os.path.join(out, 'curve.png')} is not drawn (curve.csv holds "
                                  "the same numbers)"))
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


def _say(message):
    print(message, file=sys.stderr, flush=True)


def compare(args, data=None):
    """Time meta-iterations of each learner, interleaved; a line per learner and repeat on stderr."""
    from . import functorch_maml

    data = data or {}
    if args.dataset == "omniglot" and not args.synthetic:
        batch = _Sampler(args, "train", data["background"]).sample(0, range(args.meta_batch))
    elif args.dataset == "omniglot":
        episodes = random_episodes(args.meta_batch, args.ways, args.shots, args.queries, seed=args.seed)
        batch = tuple(part.to(args.device) for part in episodes)
    else:
        batch = _Sampler(args, "train").sample(0, range(args.meta_batch))
    runners = _compare_runners(args, functorch_maml)
    _say(f"timing {', '.join(runners)}: {args.warmup} warm-up and {args.repeats} timed meta-iteration(s) each, "
         f"interleaved")
    times = {name: [] for name in runners}
    synchronize = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    total = args.warmup + args.repeats
    for repeat in range(total):
        stage = f"warm-up {repeat + 1}/{args.warmup}" if repeat < args.warmup else \
            f"repeat {repeat - args.warmup + 1}/{args.repeats}"
        for name, (learner, step, backend) in runners.items():  # interleaved: drift hits every backend alike
            learner.module.zero_grad(set_to_none=True)
            synchronize()
            began = time.perf_counter()
            with package_backends.use_backend(backend):
                step(batch)
            synchronize()
            seconds = time.perf_counter() - began
            if repeat >= args.warmup:
                times[name].append(seconds)
            _say(f"  {stage}: {name} {seconds:.3f} s")
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    base = medians["reference"]
    print(f"{_timing_setup(args)}, {_device_name(args.device)}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    for name, median in medians.items():
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:<16} {median:8.3f} s/iter  (range {spread})  reference/this = {base / median:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "seconds": times, "median": medians}, f, indent=2)
    return medians


def _compare_runners(args, functorch_maml):
    """{name: (learner, step(batch), package backend to run it on)}."""
    reference = build_learner(args, "reference")
    fused = build_learner(args, args.backend)
    runners = {"reference": (reference, reference.meta_backward, "reference"),
               "fused": (fused, fused.meta_backward, args.backend)}
    if functorch_maml.available(reference):
        learner = build_learner(args, "reference")
        runners["torch.func vmap"] = (learner, lambda b, learner=learner: functorch_maml.meta_backward(learner, b),
                                      "reference")
    return runners


# ---- scaling ------------------------------------------------------------------------------


def _scaling_batch(args):
    """The meta-batch every configuration times: random episodes with Omniglot's shapes, or sinusoid tasks."""
    if args.dataset == "omniglot":
        episodes = random_episodes(args.meta_batch, args.ways, args.shots, args.queries, seed=args.seed)
        return tuple(part.to(args.device) for part in episodes)
    return _Sampler(args, "train").sample(0, range(args.meta_batch))


def _scaling_worker(rank, size, threads, port, args, out):
    """One rank of a timed run: ``warmup + repeats`` meta-iterations of its share of the meta-batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    world = World.from_environment(args.device, args.dist_timeout)
    with package_backends.use_backend(args.backend):
        learner = build_learner(args, args.backend)
        learner.task_gather = world.gather_tasks
        per_rank = args.meta_batch // size
        batch = tuple(part[rank * per_rank:(rank + 1) * per_rank] for part in _scaling_batch(args))
        seconds = []
        for _ in range(args.warmup + args.repeats):
            world.barrier()  # every rank starts the iteration together
            began = time.perf_counter()
            learner.module.zero_grad(set_to_none=True)
            stats = learner.meta_backward(batch)
            world.average_gradients(learner.module.parameters(), stats)
            seconds.append(time.perf_counter() - began)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seconds[args.warmup:], f)
    world.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_run(args, size, threads, out):
    """Median and all seconds per meta-iteration of ``size`` ranks x ``threads`` threads (gloo, this machine)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_scaling_worker, args=(size, threads, _free_port(), args, out), nprocs=size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + args.dist_timeout + 60 * (args.warmup + args.repeats)
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise DistributedError(f"scaling: {size} rank(s) x {threads} thread(s) ran past {deadline:g} s")
    with open(out) as f:
        seconds = json.load(f)
    return sorted(seconds)[len(seconds) // 2], seconds


def scaling(args):
    """Time the same meta-batch on 1 rank x N threads and N ranks x 1 thread; medians and the speed-up."""
    import tempfile

    configurations = {f"1 rank x {args.ranks} threads": (1, args.ranks),
                      f"{args.ranks} ranks x 1 thread": (args.ranks, 1)}
    medians, times = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (size, threads) in configurations.items():
            _say(f"timing {name}: {args.warmup} warm-up and {args.repeats} timed meta-iteration(s)")
            medians[name], times[name] = _timed_run(args, size, threads, os.path.join(folder, "seconds.json"))
    single, distributed = medians.values()
    print(f"{_timing_setup(args)}, backend {args.backend}, {_device_name(args.device)}; median of {args.repeats}")
    for name, median in medians.items():
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:<22} {median:8.3f} s/iter  (range {spread})")
    print(f"  speed-up of {args.ranks} ranks over 1 rank: {single / distributed:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "seconds": times, "median": medians,
                       "speedup": single / distributed}, f, indent=2)
    return medians


# ---- main -----------------------------------------------------------------------------------


def _splits_needed(args):
    if args.dataset != "omniglot":
        return ()
    if args.command == "train":
        return ("background", "evaluation")
    return () if args.command == "scaling" or args.synthetic else ("background",)


def _check_world(parser, args, size):
    """The world size torchrun gives fits the command and the meta-batch."""
    if args.command != "train" and size > 1:
        parser.error(f"{args.command}: expected one process, got WORLD_SIZE={size} from torchrun (train runs on "
                     f"ranks; scaling starts its own)")
    ranks = size if args.command == "train" else getattr(args, "ranks", 1)
    if args.meta_batch % ranks:
        option = "world size" if args.command == "train" else "--ranks"
        parser.error(f"--meta-batch: expected a multiple of the {option} {ranks} (each rank takes meta-batch / "
                     f"{ranks} tasks), got {args.meta_batch}")


def _agree(parser, world, problem):
    """Stop every rank with a usage error when any rank found ``problem`` (its own files, its own data root)."""
    problems = [(rank, p) for rank, p in enumerate(world.all_objects((problem, socket.gethostname()))) if p[0]]
    if not problems:
        return
    world.close()
    if world.size == 1:
        parser.error(problems[0][1][0])
    parser.error("; ".join(f"{message} (on rank {rank}, host {host})" for rank, (message, host) in problems))


def _join(parser, args, splits):
    """This process's `World` (a process group under torchrun), with the files every rank needs checked."""
    if args.command != "train":
        return World()
    world = World.from_environment(args.device, args.dist_timeout)
    if world.backend == "nccl":
        args.device = f"cuda:{world.local_rank}"
    problem = data_root_problem(args, splits)
    if problem is None and world.is_main:
        problem = out_problem(args) or resume_problem(args)  # the run's folder is rank 0's
    _agree(parser, world, problem)
    return world


def main(argv=None):
    from .._memory import keep_freed_memory

    root = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rank, size = environment_rank()
    except DistributedError as error:
        root.error(str(error))
    for parser in (root, *root.commands.values()):
        parser.quiet = rank != 0  # one copy of a usage error, on rank 0
    args = root.parse_args(argv)
    args.argv = argv  # results.json records the command that made it, also when called in-process
    parser = root.commands[args.command]
    _check(parser, args)
    _defaults(args)
    _check_world(parser, args, size)
    splits = _splits_needed(args)
    world = _join(parser, args, splits)
    data, problem = read_omniglot(args, splits, say=world.is_main)
    _agree(parser, world, problem)
    keep_freed_memory()  # same allocator settings for every backend compared (see neuronml_fast/_memory.py)
    if args.command == "compare":
        return compare(args, data)
    if args.command == "scaling":
        return scaling(args)
    try:
        results = train(args, data, world)
    except DistributedError as error:
        # A clear line instead of a traceback; the exit status makes torchrun end the other ranks.
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    world.close()
    return results
