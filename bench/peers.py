"""MAML meta-iterations the way the peer libraries run them: the extra variants of the
meta-iteration cases where the library is installed.

Each takes the reference learner (its model in plain layers, its inner_lr, inner_steps and
first_order) and a batch ``(xs, ys, xq, yq)`` of ``[T, ...]`` tensors, loops over the tasks as the
library's own MAML examples do, leaves the meta-gradient (the mean query loss's) in ``.grad`` and
returns {"loss": the mean query loss}.
"""

import importlib.util

import torch.nn.functional as F


def installed(name):
    return importlib.util.find_spec(name) is not None


def higher_meta_backward(learner, batch):
    """higher (Grefenstette et al.): innerloop_ctx around a plain torch.optim.SGD."""
    import higher
    import torch

    model = learner.model
    inner_opt = torch.optim.SGD(model.parameters(), lr=learner.inner_lr)
    tasks, total = len(batch[0]), 0.0
    for xs, ys, xq, yq in zip(*batch):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=not learner.first_order) as (fmodel, diffopt):
            for _ in range(learner.inner_steps):
                diffopt.step(F.cross_entropy(fmodel(xs), ys))
            loss = F.cross_entropy(fmodel(xq), yq) / tasks
            loss.backward()
            total += float(loss.detach())
    return {"loss": total}


def torchopt_meta_backward(learner, batch):
    """TorchOpt's MetaSGD: the module's parameters replaced by the differentiable update and
    restored after each task (TorchOpt's own MAML example)."""
    import torchopt

    model = learner.model
    inner_opt = torchopt.MetaSGD(model, lr=learner.inner_lr)
    model_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt)
    tasks, total = len(batch[0]), 0.0
    for xs, ys, xq, yq in zip(*batch):
        for _ in range(learner.inner_steps):
            inner_opt.step(F.cross_entropy(model(xs), ys))
            if learner.first_order:
                torchopt.stop_gradient(model)
                torchopt.stop_gradient(inner_opt)
        loss = F.cross_entropy(model(xq), yq) / tasks
        loss.backward()
        total += float(loss.detach())
        torchopt.recover_state_dict(model, model_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    return {"loss": total}


PEERS = {"higher": higher_meta_backward, "torchopt": torchopt_meta_backward}


def available():
    """{variant name: meta_backward(learner, batch)} of the installed peers."""
    return {name: fn for name, fn in PEERS.items() if installed(name)}
