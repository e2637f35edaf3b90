"""MAML on sinusoid regression (Finn, Abbeel & Levine, "Model-agnostic meta-learning", ICML 2017,
section 5.1).

The set-up, as the paper gives it: each task is y = A sin(x - phase) with the amplitude A drawn
from [0.1, 5.0], the phase from [0, pi] and x from [-5, 5]; K = 10 examples per task; a network of
two hidden layers of 40 ReLU units; one inner gradient step of size 0.01 on the mean squared
error; meta-batches of 25 tasks; Adam as the meta-optimizer. The evaluation adapts with the same
step size to K = 10 examples of a new task and measures the error on held-out points of it, after
1 and after 10 gradient steps (and before any, to show what meta-learning gained).

The network is the package's `MLP` (`MaskedLinear` layers) trained by `neuronml_fast.meta.MAML`;
``--learner reference`` runs the same algorithm as plain PyTorch with the tasks in a Python loop,
for the time per iteration of the eager baseline.

    python examples/sinusoid_maml.py --out runs/sinusoid_maml
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _meta  # noqa: E402

from neuronml_fast.meta import MAML, MLP, SinusoidTasks  # noqa: E402


def build_parser():
    parser = _common.parser(__doc__, iterations=10000, out="runs/sinusoid_maml")
    _meta.add_learner(parser, shots=(10, "K: examples per task to adapt on"),
                      queries=(10, "points per task for the meta-update (the final test uses 100)"), meta_batch=25,
                      inner_lr=0.01, hidden=40, hidden_help="units per hidden layer")
    # A 40-unit network is too small to split across threads: one thread is fastest.
    parser.set_defaults(eval_every=1000, threads=1)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    dev = _common.setup(parser, args)
    wall = time.perf_counter()

    model = MLP(hidden=(args.hidden, args.hidden)).to(dev)
    learner = MAML(model, kind="regression", inner_lr=args.inner_lr, inner_steps=1, backend=args.learner)
    train_tasks, eval_tasks = SinusoidTasks(seed=args.seed), SinusoidTasks(seed=args.seed + 10**6)
    to = lambda batch: tuple(t.to(dev) for t in batch)  # noqa: E731
    sample_train = lambda n: to(train_tasks.sample(n, args.shots, args.queries))  # noqa: E731
    sample_eval = lambda n: to(eval_tasks.sample(n, args.shots, args.queries))  # noqa: E731

    rows, sec = _meta.meta_train(learner, sample_train, sample_eval, args, dev, eval_steps=1, score_name="mse")
    _common.write_curve(args.out, rows, "iteration", [("train_mse", "train (query MSE after 1 step)"),
                                                      ("eval_mse", "held-out tasks (after 1 step)")],
                        "mean squared error", "MAML, sinusoid regression (Finn et al. 2017)", log_y=True)

    test_tasks = SinusoidTasks(seed=args.seed + 2 * 10**6)
    sample_test = lambda n: to(test_tasks.sample(n, args.shots, 100))  # noqa: E731
    results = {}
    for steps in (0, 1, 10):
        test_tasks.generator.manual_seed(args.seed + 2 * 10**6)  # the same test tasks for each step count
        scores, _ = _meta.evaluate(learner, sample_test, args.test_tasks, args.meta_batch, steps)
        results[steps] = (float(scores.mean()), _meta.ci95(scores))
    line = (f"sinusoid_maml: test MSE over {args.test_tasks} tasks after 0 / 1 / 10 steps: "
            + " / ".join(f"{m:.3f} ± {c:.3f}" for m, c in results.values())
            + f"; {args.iterations} iterations, {sec * 1e3:.1f} ms/iter ({args.learner} learner on {dev.type}); "
            f"wall {time.perf_counter() - wall:.0f} s")
    _common.summarize(args.out, line)
    return {"rows": rows, "test_mse": results, "sec_per_iter": sec}


if __name__ == "__main__":
    main()
