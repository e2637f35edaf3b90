"""MAML with ``torch.func`` (``vmap`` over tasks of ``grad``): the third way to batch tasks, for `compare`.

Plain PyTorch layers (the model's unbatched functional form, on the reference backend): the
baseline is what torch.func makes of eager PyTorch.
"""

from torch.func import grad, vmap

from .learners import _score, _task_loss


def meta_backward(learner, batch):
    """One MAML meta-iteration with torch.func; leaves the meta-gradient in ``.grad``."""
    model, kind = learner.model, learner.kind
    params = learner.fast_parameters()
    steps, lr, first_order = learner.inner_steps, learner.inner_lr, learner.first_order

    def support_loss(p, x, y):
        return _task_loss(kind, model.functional(p, x, None, False), y)

    def query_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(support_loss)(p, xs, ys)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - lr * g[k] for k in p}
        out = model.functional(p, xq, None, False)
        return _task_loss(kind, out, yq), out

    losses, out = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch)
    loss = losses.mean()
    loss.backward()
    return {"loss": float(loss.detach()), "score": float(_score(kind, out.detach(), batch[3]).mean()),
            "active_fraction": 1.0}


def available(learner):
    return learner.name == "maml"

