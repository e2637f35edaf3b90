"""The training loop the MAML and NeuronML examples share: meta-iterations with Adam, a curve of the
training loss and of held-out scores, and the time per meta-iteration."""

import time

import torch

import _common


def add_learner(parser, *, shots, queries, meta_batch, inner_lr, hidden, hidden_help):
    """The options every meta-learning example has; ``shots`` and ``queries`` as (default, help)."""
    parser.add_argument("--shots", type=_common.positive_int, default=shots[0], help=shots[1])
    parser.add_argument("--queries", type=_common.positive_int, default=queries[0], help=queries[1])
    parser.add_argument("--meta-batch", type=_common.positive_int, default=meta_batch, help="tasks per meta-iteration")
    parser.add_argument("--inner-lr", type=_common.positive_float, default=inner_lr, help="inner step size")
    parser.add_argument("--meta-lr", type=_common.positive_float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--hidden", type=_common.positive_int, default=hidden, help=hidden_help)
    parser.add_argument("--learner", choices=("fused", "reference"), default="fused",
                        help="fused: the package's layers, all tasks of a meta-batch at once; reference: plain "
                             "PyTorch, a Python loop over the tasks with one backward each (the eager baseline)")
    parser.add_argument("--eval-every", type=_common.positive_int, default=100,
                        help="iterations between evaluations on held-out tasks")
    parser.add_argument("--eval-tasks", type=_common.positive_int, default=100,
                        help="held-out tasks per evaluation along the curve")
    parser.add_argument("--test-tasks", type=_common.positive_int, default=600,
                        help="held-out tasks of the final test")


def evaluate(learner, sample, tasks, batch, steps):
    """Per-task scores over ``tasks`` held-out tasks, ``batch`` at a time, and the mean active fraction."""
    scores, active = [], []
    done = 0
    while done < tasks:
        n = min(batch, tasks - done)
        s, a = learner.evaluate(sample(n), steps)
        scores.append(s.detach().cpu())
        active.append(a)
        done += n
    return torch.cat(scores), sum(active) / len(active)


def meta_train(learner, sample_train, sample_eval, args, dev, eval_steps, score_name):
    """Trains ``learner`` for ``args.iterations`` meta-iterations; returns (curve rows, seconds per
    meta-iteration: the meta-gradient and the Adam step, not the task sampling or the evaluations)."""
    parameters = [p for p in learner.module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.meta_lr)
    rows, losses, scores, seconds = [], [], [], 0.0
    for iteration in range(1, args.iterations + 1):
        batch = sample_train(args.meta_batch)
        _common.synchronize(dev)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stats = learner.meta_backward(batch)
        optimizer.step()
        _common.synchronize(dev)
        seconds += time.perf_counter() - start
        losses.append(stats["loss"])
        scores.append(stats["score"])
        if iteration % args.eval_every == 0 or iteration == args.iterations:
            held_out, active = evaluate(learner, sample_eval, args.eval_tasks, args.meta_batch, eval_steps)
            rows.append({"iteration": iteration, "train_loss": sum(losses) / len(losses),
                         f"train_{score_name}": sum(scores) / len(scores),
                         f"eval_{score_name}": float(held_out.mean()), "active_fraction": active})
            losses, scores = [], []
            print(f"iteration {iteration}/{args.iterations}: eval {score_name} {float(held_out.mean()):.4f}",
                  flush=True)
    return rows, seconds / args.iterations


def ci95(scores):
    return 1.96 * float(scores.std()) / len(scores) ** 0.5 if len(scores) > 1 else float("nan")
