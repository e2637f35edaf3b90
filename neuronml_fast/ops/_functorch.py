"""The custom ops under torch.func's transforms (grad, vjp, jacrev, vmap of grad: MAML the functorch way).

``CustomOpDef.register_autograd`` wraps the formula in an autograd.Function without a
``setup_context`` staticmethod, which torch.func refuses ("it must override the setup_context
staticmethod", pytorch/pytorch#168393), so ``torch.func.grad`` cannot differentiate a custom op
registered that way. `TransformableOp` registers the same formula both ways: on the op (what eager
autograd, torch.compile, torch.export and opcheck use) and on an autograd.Function with the same
``setup_context``, ``backward`` and vmap rule, which a call goes through while a torch.func
transform is active.
"""

import torch


class TransformableOp:
    """A custom op with its autograd formula and vmap rule, callable under any torch.func transform.

    ``vmap_rule(call)`` builds the vmap rule from the callable it must use for the op itself (this
    object), so that a transform below the vmap (grad of vmap) sees the op too.
    """

    def __init__(self, op, setup_context, backward, vmap_rule):
        self.op = op
        rule = vmap_rule(self)
        op.register_autograd(backward, setup_context=setup_context)
        op.register_vmap(rule)

        def forward(*args):
            return op(*args)

        self._function = type(f"{op._name}_transformable", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward), "vmap": staticmethod(rule)})

    def __call__(self, *args):
        # The op's own registration everywhere torch.func is not in play (the same formula).
        if torch._C._are_functorch_transforms_active():
            return self._function.apply(*args)
        return self.op(*args)
