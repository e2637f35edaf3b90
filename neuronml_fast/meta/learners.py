"""Meta-learners: MAML (first and second order), NeuronML (MAML + a learned frugal structure) and
a plastic head (Miconi et al. 2018), each on ``reference`` or ``fused`` layers.

A meta-batch is ``(x_support [T, S, ...], y_support [T, S], x_query [T, Q, ...], y_query [T, Q])``.

Backends (same model, same algorithm, same meta-gradients up to float32 rounding):

* ``"reference"``: plain PyTorch, tasks in a Python loop, one backward per task (the way
  learn2learn and higher run MAML).
* ``"fused"``: our ops, all tasks at once. The meta-parameters are expanded to ``[T, ...]``
  (a view); the gradient of the *sum* of the task losses with respect to the expanded
  parameters is every task's own gradient, so the inner loop adapts all tasks in one pass, and
  the outer gradient flows back through the expansion into the shared initialization.

NeuronML's structure terms (the paper gives no formulas; these are ours). For each structured
layer ``l`` and task ``t`` (Conv4: the conv channels; MLP: the hidden units):

* importance ``I[t, l, c]``: the first-order Taylor importance (SPEC section 3,
  ``nf.neuron_sensitivity``) of neuron ``c`` for the support loss of task ``t`` at the
  meta-initialization, measured with every neuron active (a "probe" pass on the support set,
  so pruned neurons are measured too and can come back);
* mask: ``p = sigmoid(theta_l + beta_l * standardize(I[t, l]))`` (a `NeuronGate` holds the
  structure logits ``theta_l``, initialized to +1 for a random ``target_active`` fraction of the
  neurons and -1 for the rest; ``beta_l`` is learned from 0), hardened to ``m = 1[p > 1/2]`` with a
  straight-through gradient. The mask is task-conditioned and fixed during the inner loop,
  where pruned neurons are skipped;
* frugality ``R_f = max(0, mean(p) - target_active)`` (mean over every neuron and task: the
  expected active fraction, an L1 of the soft masks, held at the target);
* plasticity ``R_p = mean_l mean_{t != t'} cos(p[t, l], p[t', l])``: low when the tasks of a
  batch use different neurons;
* sensitivity ``R_s = mean_{t, l} (1 - pearson(p[t, l], I[t, l]))``: low when the active
  neurons are the important ones.

The outer loss is ``query loss + lambda_f R_f + lambda_p R_p + lambda_s R_s``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.masked import NeuronGate
from ..nn.plastic import PlasticLinear
from ..ops.plastic import plastic_linear, plastic_linear_reference
from ..ops.sensitivity import neuron_sensitivity, neuron_sensitivity_reference

BACKENDS = ("reference", "fused")
TASK_KINDS = ("classification", "regression")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def task_losses(kind, out, target):
    """Per-task mean losses ``[T]`` for task-batched outputs ``[T, S, ...]``."""
    if kind == "classification":
        per_example = F.cross_entropy(out.flatten(0, 1), target.flatten(0, 1), reduction="none")
        return per_example.view(out.shape[:2]).mean(1)
    return (out - target).pow(2).flatten(1).mean(1)


def _task_loss(kind, out, target):
    """The loss of one task (unbatched outputs)."""
    return F.cross_entropy(out, target) if kind == "classification" else F.mse_loss(out, target)


def _score(kind, out, target):
    """Per-task score ``[T]``: accuracy for classification, mean squared error for regression."""
    if kind == "classification":
        return (out.argmax(-1) == target).float().mean(-1)
    return (out - target).pow(2).flatten(1).mean(1)


def one_process(tensors):
    """The tasks of this process are the whole meta-batch (`MAML.task_gather` outside torch.distributed)."""
    return list(tensors)


def _expand(params, tasks):
    return {name: p.unsqueeze(0).expand(tasks, *p.shape) for name, p in params.items()}


def _sgd(params, grads, lr):
    # Gradient first: the result takes the gradient's memory layout, so fast conv weights stay in
    # the channels-last layout the CPU convolution returns its weight gradients in, and the next
    # convolution needs no transposing copy. Bitwise the same as p - lr * g.
    return {name: -lr * g + p for (name, p), g in zip(params.items(), grads)}


class MAML:
    """Model-agnostic meta-learning (Finn et al. 2017), inner loop batched over tasks when fused.

    ``model`` is a functional model (`Conv4`, `MLP`); ``first_order`` drops the second-order
    terms (FOMAML). ``meta_backward(batch)`` leaves the meta-gradient in ``.grad`` of
    ``self.module.parameters()`` and returns statistics; ``evaluate`` adapts without touching
    the meta-parameters.

    ``task_gather`` maps per-task tensors ``[T_local, ...]`` of this process's tasks to those of
    the whole meta-batch; terms that couple the tasks of a batch (NeuronML's structure) are
    computed on its result. `one_process` in one process; across ranks
    `neuronml_fast.meta.distributed.World.gather_tasks`.
    """

    name = "maml"

    def __init__(self, model, kind="classification", inner_lr=0.4, inner_steps=1, first_order=False,
                 backend="fused"):
        _check_choice("backend", backend, BACKENDS)
        _check_choice("kind", kind, TASK_KINDS)
        if not inner_lr > 0:
            raise ValueError(f"inner_lr: expected a positive number, got {inner_lr!r}")
        if int(inner_steps) != inner_steps or inner_steps < 0:
            raise ValueError(f"inner_steps: expected an int >= 0, got {inner_steps!r}")
        self.model, self.module = model, model
        self.kind, self.inner_lr, self.inner_steps = kind, float(inner_lr), int(inner_steps)
        self.first_order, self.backend = first_order, backend
        self.task_gather = one_process

    # ---- parameters ----------------------------------------------------------------------

    def fast_parameters(self):
        """The parameters the inner loop adapts (everything but the structure)."""
        return {name: p for name, p in self.model.named_parameters() if not name.startswith("structure")}

    @property
    def batched(self):
        return self.backend == "fused"

    # ---- structure (none for MAML) ---------------------------------------------------------

    def structure(self, batch, regularize=True):
        """(masks: per structured layer ``[T, C]``, or None; regularizer: a scalar, None unless ``regularize``)."""
        return None, None

    # ---- the inner loop --------------------------------------------------------------------

    def adapt(self, params, x, y, masks, steps, create_graph):
        """``steps`` SGD steps on the support loss; batched or one task, as the backend says."""
        for _ in range(steps):
            out = self.model.functional(params, x, masks, self.batched)
            loss = task_losses(self.kind, out, y).sum() if self.batched else _task_loss(self.kind, out, y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = _sgd(params, grads, self.inner_lr)
        return params

    def _initial(self, tasks):
        params = self.fast_parameters()
        return _expand(params, tasks) if self.batched else dict(params)

    # ---- one meta-iteration --------------------------------------------------------------

    def meta_backward(self, batch):
        """Accumulate the meta-gradient of one meta-batch; returns {"loss", "score", "active_fraction"}."""
        xs, ys, xq, yq = batch
        tasks = xs.shape[0]
        masks, regularizer = self.structure(batch)
        create_graph = not self.first_order
        if self.batched:
            params = self.adapt(self._initial(tasks), xs, ys, masks, self.inner_steps, create_graph)
            out = self.model.functional(params, xq, masks, True)
            query = task_losses(self.kind, out, yq).mean()
            total = query if regularizer is None else query + regularizer
            total.backward()
            scores = _score(self.kind, out.detach(), yq)
        else:
            query, scores = self._reference_meta_backward(batch, masks, regularizer, create_graph)
        return {"loss": float(query.detach()), "score": float(scores.mean()), "active_fraction": _active_fraction(masks)}

    def _reference_meta_backward(self, batch, masks, regularizer, create_graph):
        xs, ys, xq, yq = batch
        tasks = xs.shape[0]
        # The masks share one graph to the structure parameters: cut it per task (leaf copies)
        # and send their accumulated gradients back in one backward at the end.
        leaves = None if masks is None else [m.detach().requires_grad_() for m in masks]
        query, scores = 0.0, []
        for t in range(tasks):
            task_masks = None if leaves is None else [m[t] for m in leaves]
            params = self.adapt(self._initial(tasks), xs[t], ys[t], task_masks, self.inner_steps, create_graph)
            out = self.model.functional(params, xq[t], task_masks, False)
            loss = _task_loss(self.kind, out, yq[t]) / tasks
            loss.backward()
            query += float(loss.detach())
            scores.append(_score(self.kind, out.detach().unsqueeze(0), yq[t].unsqueeze(0)))
        if masks is not None:
            torch.autograd.backward([*masks, regularizer], [*[m.grad for m in leaves], torch.ones_like(regularizer)])
        return torch.tensor(query, dtype=torch.float64), torch.cat(scores)

    # ---- evaluation ---------------------------------------------------------------------

    def evaluate(self, batch, steps=None):
        """Adapt on the support sets and score the query sets: (per-task scores ``[T]``, active fraction)."""
        steps = self.inner_steps if steps is None else steps
        xs, ys, xq, yq = batch
        tasks = xs.shape[0]
        masks, _ = self.structure(batch, regularize=False)
        masks = None if masks is None else [m.detach() for m in masks]
        if self.batched:
            params = self.adapt(self._initial(tasks), xs, ys, masks, steps, create_graph=False)
            with torch.no_grad():
                scores = _score(self.kind, self.model.functional(params, xq, masks, True), yq)
        else:
            scores = []
            for t in range(tasks):
                task_masks = None if masks is None else [m[t] for m in masks]
                params = self.adapt(self._initial(tasks), xs[t], ys[t], task_masks, steps, create_graph=False)
                with torch.no_grad():
                    out = self.model.functional(params, xq[t], task_masks, False)
                scores.append(_score(self.kind, out.unsqueeze(0), yq[t].unsqueeze(0)))
            scores = torch.cat(scores)
        return scores, _active_fraction(masks)


def _active_fraction(masks):
    if masks is None:
        return 1.0
    with torch.no_grad():
        active = sum(float((m != 0).sum()) for m in masks)
        return active / sum(m.numel() for m in masks)


# ---- NeuronML -----------------------------------------------------------------------------


def _standardize(x, eps=1e-8):
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=False) + eps)


def frugality(probabilities, target_active):
    """Expected active fraction above the target (0 at or below it)."""
    return F.relu(torch.cat(probabilities, -1).mean() - target_active)


def plasticity(probabilities):
    """Mean cosine similarity between the soft masks of different tasks (0 for one task)."""
    terms = []
    for p in probabilities:
        tasks = p.shape[0]
        if tasks < 2:
            terms.append(p.sum() * 0)
            continue
        unit = F.normalize(p, dim=-1)
        similarity = unit @ unit.T
        terms.append((similarity.sum() - similarity.diagonal().sum()) / (tasks * (tasks - 1)))
    return torch.stack(terms).mean()


def sensitivity_disagreement(probabilities, importances):
    """Mean of ``1 - pearson(mask probabilities, Taylor importance)`` over tasks and layers."""
    terms = [1 - (_standardize(p) * _standardize(i)).mean(-1) for p, i in zip(probabilities, importances)]
    return torch.cat(terms).mean()


class NeuronML(MAML):
    """MAML with a learned, task-conditioned, frugal neuron structure (Wang et al., TPAMI 2024).

    Adds to the model a `NeuronGate` per structured layer (``model.structure_gates``, hard
    masks with straight-through gradients) and the importance scales ``model.structure_scale``.
    See the module docstring for the terms.
    """

    name = "neuronml"

    def __init__(self, model, kind="classification", inner_lr=0.4, inner_steps=1, first_order=False, backend="fused",
                 lambda_frugality=1.0, lambda_plasticity=0.1, lambda_sensitivity=0.1, target_active=0.5,
                 temperature=1.0):
        super().__init__(model, kind, inner_lr, inner_steps, first_order, backend)
        if not 0 < target_active <= 1:
            raise ValueError(f"target_active: expected a fraction in (0, 1], got {target_active!r}")
        for name, value in (("lambda_frugality", lambda_frugality), ("lambda_plasticity", lambda_plasticity),
                            ("lambda_sensitivity", lambda_sensitivity)):
            if not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        self.lambdas = (float(lambda_frugality), float(lambda_plasticity), float(lambda_sensitivity))
        self.target_active = float(target_active)
        reference = next(model.parameters())
        if not hasattr(model, "structure_gates"):
            model.structure_gates = nn.ModuleList(
                NeuronGate(neurons, mode="hard", temperature=temperature, init_logit=0.0)
                for neurons, _ in model.structure).to(device=reference.device, dtype=reference.dtype)
            with torch.no_grad():
                # Start from a random structure with target_active of the neurons on (logit +1) and
                # the rest off (-1), shared by all tasks (beta = 0): the weights first learn on a
                # stable sub-network, and the plasticity term then grows the task conditioning.
                for gate in model.structure_gates:
                    on = torch.rand(gate.logits.shape, device=reference.device).argsort() < round(
                        target_active * gate.logits.numel())
                    gate.logits.copy_(torch.where(on, 1.0, -1.0))
            model.structure_scale = nn.Parameter(torch.zeros(len(model.structure), device=reference.device,
                                                             dtype=reference.dtype))

    def importance(self, batch):
        """Taylor importance ``[T, C]`` per structured layer on the support sets, every neuron active."""
        xs, ys = batch[0], batch[1]
        tasks = xs.shape[0]
        names = [name for _, pair in self.model.structure for name in pair]
        if self.batched:
            params = self._initial(tasks)
            out = self.model.functional(params, xs, None, True)
            grads = torch.autograd.grad(task_losses(self.kind, out, ys).sum(), [params[n] for n in names])
            grads = dict(zip(names, grads))
            result = []
            for neurons, (w, b) in self.model.structure:
                rows = tasks * neurons
                result.append(neuron_sensitivity(params[w].reshape(rows, -1), grads[w].reshape(rows, -1),
                                                 params[b].reshape(rows), grads[b].reshape(rows)).view(tasks, neurons))
            return result
        per_task = []
        for t in range(tasks):
            params = self._initial(tasks)
            loss = _task_loss(self.kind, self.model.functional(params, xs[t], None, False), ys[t])
            grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
            per_task.append([neuron_sensitivity_reference(params[w].reshape(neurons, -1), grads[w].reshape(neurons, -1),
                                                          params[b], grads[b])
                             for neurons, (w, b) in self.model.structure])
        return [torch.stack(layer) for layer in zip(*per_task)]

    def structure(self, batch, regularize=True):
        importances = [i.detach() for i in self.importance(batch)]
        gates, scales = self.model.structure_gates, self.model.structure_scale
        shifts = [scales[l] * _standardize(importances[l]) for l in range(len(gates))]
        masks = [gate(shift) for gate, shift in zip(gates, shifts)]
        if not regularize:
            return masks, None
        probabilities = [gate.probabilities(shift) for gate, shift in zip(gates, shifts)]
        # The terms couple the tasks of the whole meta-batch: computed on every task, also those of
        # other ranks (task_gather carries their gradients back to them).
        every = self.task_gather(probabilities + importances)
        probabilities, importances = every[:len(gates)], every[len(gates):]
        lf, lp, ls = self.lambdas
        regularizer = (lf * frugality(probabilities, self.target_active) + lp * plasticity(probabilities)
                       + ls * sensitivity_disagreement(probabilities, importances))
        return masks, regularizer


# ---- plastic head -------------------------------------------------------------------------


class PlasticHead:
    """Miconi et al.'s Omniglot set-up: a conv embedding and a Hebbian output layer.

    No inner gradient steps: the support set is presented as a sequence, each image with its
    label clamped onto the output (``drive = clamp * one_hot``), and the Hebbian trace of the
    `PlasticLinear` head stores the associations. The queries are then read out through
    ``weight + alpha * hebb`` with the trace frozen (``eta = 0``). Learned: the embedding, the
    head's weight, alpha and eta.
    """

    name = "plastic"

    def __init__(self, model, ways, backend="fused", clamp=1.0, eta=0.1):
        _check_choice("backend", backend, BACKENDS)
        self.model, self.backend, self.ways, self.clamp = model, backend, ways, float(clamp)
        reference = next(model.parameters())
        self.head = PlasticLinear(model.features, ways, activation="identity", rule="hebb", eta=eta,
                                  device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            self.head.alpha.fill_(1.0)
        self.module = nn.ModuleDict({"embedding": model, "head": self.head})
        self.kind = "classification"

    @property
    def batched(self):
        return self.backend == "fused"

    def _embedding_parameters(self, tasks):
        params = {name: p for name, p in self.model.named_parameters() if not name.startswith("head.")}
        return _expand(params, tasks) if self.batched else params

    def logits(self, batch):
        """Query logits ``[T, Q, ways]``."""
        xs, ys, xq, _ = batch
        tasks = xs.shape[0]
        head = self.head
        drive = self.clamp * F.one_hot(ys, self.ways).to(xs.dtype)  # [T, S, ways]
        if self.batched:
            params = self._embedding_parameters(tasks)
            support = self.model.embed(params, xs, None, True).transpose(0, 1)  # [S, T, D]
            query = self.model.embed(params, xq, None, True).transpose(0, 1)
            _, hebb = plastic_linear(support, head.weight, head.alpha, head.eta, None, head.bias,
                                     drive.transpose(0, 1), "hebb", "identity")
            out, _ = plastic_linear(query, head.weight, head.alpha, torch.zeros_like(head.eta), hebb, head.bias,
                                    None, "hebb", "identity")
            return out.transpose(0, 1)
        params = self._embedding_parameters(tasks)
        outs = []
        for t in range(tasks):
            support = self.model.embed(params, xs[t], None, False).unsqueeze(1)  # [S, 1, D]
            query = self.model.embed(params, xq[t], None, False).unsqueeze(1)
            _, hebb = plastic_linear_reference(support, head.weight, head.alpha, head.eta, None, head.bias,
                                               drive[t].unsqueeze(1), "hebb", "identity")
            # Each query is read out with the same frozen trace: one sequence per query.
            hebb = hebb.expand(query.shape[0], *hebb.shape[1:])
            out, _ = plastic_linear_reference(query.transpose(0, 1), head.weight, head.alpha,
                                              torch.zeros_like(head.eta), hebb, head.bias, None, "hebb", "identity")
            outs.append(out.squeeze(0))
        return torch.stack(outs)

    def meta_backward(self, batch):
        yq = batch[3]
        if self.batched:
            out = self.logits(batch)
            loss = task_losses(self.kind, out, yq).mean()
            loss.backward()
            return {"loss": float(loss.detach()), "score": float(_score(self.kind, out.detach(), yq).mean()),
                    "active_fraction": 1.0}
        total, scores = 0.0, []
        for t in range(batch[0].shape[0]):
            task = tuple(part[t:t + 1] for part in batch)
            out = self.logits(task)
            loss = task_losses(self.kind, out, task[3]).mean() / batch[0].shape[0]
            loss.backward()
            total += float(loss.detach())
            scores.append(_score(self.kind, out.detach(), task[3]))
        return {"loss": total, "score": float(torch.cat(scores).mean()), "active_fraction": 1.0}

    def evaluate(self, batch, steps=None):
        with torch.no_grad():
            return _score(self.kind, self.logits(batch), batch[3]), 1.0


def ci95(scores):
    """Half-width of the normal 95% confidence interval of the mean."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.numel() < 2:
        return float("nan")
    return float(1.96 * scores.std() / math.sqrt(scores.numel()))
