"""MAML and NeuronML on Omniglot 5-way 1-shot classification.

The set-up of MAML (Finn, Abbeel & Levine, ICML 2017, section 5.2), which NeuronML (Wang et al.,
TPAMI 2024) keeps: Omniglot images resized to 28x28, each character's rotations by multiples of
90 degrees taken as classes of their own; the background alphabets for meta-training, the
evaluation alphabets for testing. A task is 5 classes with 1 labelled example each; the network is
4 blocks of [3x3 convolution with 64 filters and stride 2, batch normalization, ReLU] and a linear
layer; one inner gradient step of size 0.4 during meta-training and 3 at test time; meta-batches of
32 tasks; Adam with learning rate 1e-3 as the meta-optimizer. As in Finn et al.'s Omniglot code,
the meta-update uses 1 query image per class.

The network is the package's `Conv4` (`MaskedConv2d` / `MaskedLinear`), trained by
`neuronml_fast.meta.MAML` or `neuronml_fast.meta.NeuronML` (``--algo neuronml``: MAML plus a
learned, task-conditioned neuron mask held near ``--target-active`` of the neurons).
``--learner reference`` runs the same algorithm as plain PyTorch with the tasks in a Python loop,
for the time per iteration of the eager baseline.

The Omniglot archives (``images_background.zip`` and ``images_evaluation.zip``, or their extracted
folders) are read from ``--data-root``.

    python examples/omniglot_5way1shot.py --data-root ../shared/data/omniglot --out runs/omniglot_maml
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _meta  # noqa: E402

from neuronml_fast.meta import MAML, Conv4, NeuronML, NWayKShot, Omniglot  # noqa: E402


def build_parser():
    parser = _common.parser(__doc__, iterations=600, out="runs/omniglot_5way1shot")
    _meta.add_learner(parser, shots=(1, "labelled examples per class"),
                      queries=(1, "query images per class for the meta-update and the evaluations"), meta_batch=32,
                      inner_lr=0.4, hidden=64, hidden_help="filters per convolution")
    parser.add_argument("--data-root", required=True,
                        help="folder holding images_background.zip and images_evaluation.zip (or the folders)")
    parser.add_argument("--algo", choices=("maml", "neuronml"), default="maml", help="meta-learner")
    parser.add_argument("--target-active", type=_common.positive_float, default=0.5,
                        help="NeuronML: the fraction of neurons kept active")
    parser.add_argument("--ways", type=_common.positive_int, default=5, help="classes per task")
    parser.add_argument("--inner-steps", type=_common.positive_int, default=1, help="inner steps in meta-training")
    parser.add_argument("--eval-inner-steps", type=_common.positive_int, default=3, help="inner steps at test time")
    parser.add_argument("--image-size", type=_common.positive_int, default=28, help="image side in pixels")
    parser.set_defaults(eval_every=100, eval_tasks=64)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.algo == "neuronml" and not args.target_active <= 1:
        parser.error(f"--target-active: expected a fraction in (0, 1], got {args.target_active}")
    dev = _common.setup(parser, args)
    wall = time.perf_counter()
    try:
        background = Omniglot(args.data_root, "background", image_size=args.image_size)
        evaluation = Omniglot(args.data_root, "evaluation", image_size=args.image_size)
        # Test and curve tasks come from the evaluation alphabets, from two separate samplers.
        train = NWayKShot(background, args.ways, args.shots, args.queries, seed=args.seed)
        held_out = NWayKShot(evaluation, args.ways, args.shots, args.queries, seed=args.seed + 1)
        test = NWayKShot(evaluation, args.ways, args.shots, args.queries, seed=args.seed + 2)
    except (OSError, ValueError) as error:
        parser.error(f"--data-root: {error}")
    except ImportError as error:  # pillow missing: the error says how to get it
        parser.error(str(error))
    to = lambda batch: tuple(t.to(dev) for t in batch)  # noqa: E731

    model = Conv4(args.ways, hidden=args.hidden, image_size=args.image_size).to(dev)
    if args.algo == "maml":
        learner = MAML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps, backend=args.learner)
    else:
        learner = NeuronML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps, backend=args.learner,
                           target_active=args.target_active)

    rows, sec = _meta.meta_train(learner, lambda n: to(train.sample(n)), lambda n: to(held_out.sample(n)), args, dev,
                                 eval_steps=args.eval_inner_steps, score_name="accuracy")
    _common.write_curve(args.out, rows, "iteration", [("train_accuracy", "train (query accuracy after the inner step)"),
                                                      ("eval_accuracy", "evaluation alphabets")],
                        "accuracy", f"{args.algo}, Omniglot {args.ways}-way {args.shots}-shot")

    scores, active = _meta.evaluate(learner, lambda n: to(test.sample(n)), args.test_tasks, args.meta_batch,
                                    args.eval_inner_steps)
    line = (f"omniglot_5way1shot: {args.algo} test accuracy {100 * float(scores.mean()):.2f} ± "
            f"{100 * _meta.ci95(scores):.2f} % over {args.test_tasks} tasks of the evaluation alphabets, "
            f"{100 * active:.1f} % neurons active; {args.iterations} iterations, {sec:.3f} s/iter "
            f"({args.learner} learner on {dev.type}); wall {time.perf_counter() - wall:.0f} s")
    _common.summarize(args.out, line)
    return {"rows": rows, "test_accuracy": float(scores.mean()), "sec_per_iter": sec}


if __name__ == "__main__":
    main()
