"""C++ CPU launchers of the masked conv2d / linear layers (SPEC section 2).

Design: compute only the active neurons. The weights of active neurons are compacted
(per task, padded to the largest active count of the batch), the dense core runs in
ATen/oneDNN on the compact weights, and the C++ kernels in ``csrc/cpu/masked.cpp`` fuse
everything around it in one pass over memory: bias, mask, the scatter back into the full
layout with zeros for pruned neurons (forward), and the gathered ``grad_out * mask``, the bias
gradient and the mask gradient (the sensitivity source) in the backward. The conv launchers are
C++ (``masked_conv2d_forward`` / ``masked_conv2d_backward`` in csrc/cpu/bindings/masked.cpp: they
run once per layer and step, where Python glue cost a tenth of a small layer); the linear
layers, one ``bmm`` each, are launched from here.

Tasks: a task-batched call is one grouped convolution (``groups = T``) or one ``bmm``.
Grouped convolutions (``groups > 1``) are not compacted, as compaction would break the group
structure; their pruned neurons are still exact zeros with zero gradients.

Every tensor is in the canonical task-batched form of the custom ops: ``x [T, N, C_in, ...]``,
``weight [T, C_out, ...]``, ``mask [T, C_out]``, ``bias [T, C_out]``.
"""

import dataclasses

import torch

from ... import _alloc, _extensions


@dataclasses.dataclass
class Compaction:
    slot: torch.Tensor  # [T, C] int64: compact slot of each channel, -1 if pruned
    width: int  # slots per task (A in the shapes below)
    compacted: bool  # weights gathered (else width == C and slot is the identity on kept channels)
    complete: bool  # every slot of every task holds a channel (no zero padding needed)


def compaction(mask, skip_zero, may_gather):
    """The plan of csrc/cpu/masked.h `plan_compaction` (one C++ call: as torch ops it cost a tenth
    of a small layer's time). ``may_gather``: whether the active rows may be gathered into compact
    weights (not for grouped convolutions, whose groups would mix)."""
    return Compaction(*_extensions.cpu().masked_compaction(mask, skip_zero, may_gather))


def _compact_rows(weight, plan):
    """[T, C, ...] -> [T, A, ...]: the rows of active neurons, zero-padded per task, in weight's
    storage order (csrc/cpu/bindings/masked.cpp `compact_weight_rows`)."""
    if not plan.compacted:
        return weight
    return _extensions.cpu().compact_weight_rows(weight, plan.slot, plan.width)


def _expand_rows(compact, plan, full_shape):
    """Inverse of `_compact_rows` for a linear weight gradient [T, A, in] -> [T, C, in]: pruned
    rows are zero. (A conv weight gradient is expanded in C++: `expand_weight_grad`.)"""
    if not plan.compacted:
        return compact
    rows = compact.contiguous()
    full = _alloc.empty((rows.shape[0], full_shape[1], rows.shape[2]), dtype=compact.dtype, device=compact.device)
    _extensions.cpu().scatter_rows_out(rows, plan.slot, full)
    return full


def _epilogue(y_compact, plan, mask, bias, out_shape, dtype):
    """Linear layers: y_compact [T, N, A] -> (out, pre) [T, N, C]: each sample is a one-pixel
    image for the channels-last epilogue (contiguous channels, 8 per AVX2 permute)."""
    out = _alloc.empty(out_shape, dtype=dtype, device="cpu")
    pre = _alloc.empty(out_shape, dtype=dtype, device="cpu")
    if out.numel():
        _extensions.cpu().masked_forward_epilogue_out(
            y_compact.unsqueeze(2), plan.slot, mask.contiguous(), None if bias is None else bias.contiguous(),
            out.unsqueeze(2), pre.unsqueeze(2))
    return out, pre


def _prologue(grad_out, grad_pre, pre, plan, mask, gy_compact):
    """Linear layers: the channels-last prologue over one-pixel images; gy_compact [T, N, A]."""
    T, N, C = grad_out.shape
    if grad_out.numel() == 0:  # no samples (or no channels): nothing to sum
        zeros = _alloc.zeros((T, C), dtype=grad_out.dtype, device="cpu")
        return zeros, zeros.clone()
    grad_bias = _alloc.empty((T, C), dtype=grad_out.dtype, device="cpu")
    grad_mask = _alloc.empty((T, C), dtype=grad_out.dtype, device="cpu")
    pixels = lambda t: None if t is None else t.contiguous().unsqueeze(2)  # noqa: E731
    _extensions.cpu().masked_backward_prologue_out(
        pixels(grad_out), pixels(grad_pre), pixels(pre), plan.slot, mask.contiguous(), gy_compact.unsqueeze(2),
        grad_bias, grad_mask)
    return grad_bias, grad_mask


def _not_requested(x):
    """The empty tensor that stands for a gradient the caller did not ask for. A new one for each
    such gradient: a custom op's outputs may not alias each other (one shared empty tensor for
    both the input and the weight gradient fails torch.library's aliasing check)."""
    return x.new_empty((0,))


def _new_compact(plan, shape, dtype):
    # Slots that hold no channel must be zero for the dense core; the prologue writes the rest.
    return (_alloc.empty if plan.complete else _alloc.zeros)(shape, dtype=dtype, device="cpu")


# ---- conv2d --------------------------------------------------------------------------------
# Convolutions run in NHWC (channels-last), where oneDNN is fastest on the CPU, with the tasks
# as conv groups. Every activation of this path is a [T, N, C, H, W] tensor stored as
# [N, H, W, T, C] ("grouped NHWC"): for one task that is plain channels_last, and for T tasks
# it is exactly the input layout of the grouped convolution. Outputs and input gradients come
# out in this layout, so a stack of masked convolutions never copies between layers; the
# exception is a single-task input that is not channels_last, whose outputs and input gradient
# are contiguous (PyTorch's conv2d layout rule), written so by the fused epilogue and the input
# gradient kernel, and whose output gradient the fused prologue reads as it comes.


def grouped_nhwc_empty(shape, empty):
    """An uninitialized [T, N, C, H, W] tensor stored as [N, H, W, T, C] (``empty(shape)`` allocates)."""
    T, N, C, H, W = shape
    return empty((N, H, W, T, C)).permute(3, 0, 4, 1, 2)


def is_grouped_nhwc(x):
    """Whether the [T, N, C, H, W] tensor ``x`` is stored as [N, H, W, T, C]."""
    return x.permute(1, 3, 4, 0, 2).is_contiguous()


def to_grouped_nhwc(x, pooled=True):
    """[T, N, C, H, W] in grouped NHWC storage: a view when it already is, else one copy (into a
    pooled buffer unless ``pooled=False``, for tensors that may be traced, vmapped or fake)."""
    storage = x.permute(1, 3, 4, 0, 2)
    if storage.is_contiguous():
        return x
    if not pooled:
        return storage.contiguous().permute(3, 0, 4, 1, 2)
    if x.is_contiguous():  # a user's NCHW input
        return _GroupedNHWCCopy.apply(x)
    return _alloc.empty(storage.shape, dtype=x.dtype, device=x.device).copy_(storage).permute(3, 0, 4, 1, 2)


class _GroupedNHWCCopy(torch.autograd.Function):
    """Contiguous [T, N, C, H, W] -> a pooled grouped-NHWC copy, in 8 x 8 register transposes
    (csrc/cpu/layout.h; about 2.5x faster than torch's strided copy). The gradient passes through
    as it comes: the layer's backward already returns it in the caller's contiguous layout, so
    autograd adds it into ``x.grad`` without a transpose."""

    @staticmethod
    def forward(ctx, x):
        T, N, C, H, W = x.shape
        out = _alloc.empty((N, H, W, T, C), dtype=x.dtype, device=x.device)
        _extensions.cpu().to_grouped_nhwc_out(x, out)
        return out.permute(3, 0, 4, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        return grad


class GroupedNHWCLayout:
    """The masked conv2d layout protocol (`op.ContiguousConvLayout`) for
    this backend: inputs converted to grouped NHWC, task-batched outputs left in it (the layout a
    stack of layers runs in without copies), single-task outputs and the input gradient of a
    caller's tensor contiguous or channels_last as PyTorch's conv2d gives them."""

    def prepare(self, input, channels_last):
        # A no-op for channels_last input and the task-batched outputs of a previous masked conv.
        converted = not is_grouped_nhwc(input)
        if converted:
            input = to_grouped_nhwc(input, pooled=is_plain_tensor(input))
        if channels_last is None:  # task-batched: the input gradient in the caller's layout, outputs in ours
            return input, converted, False
        return input, not channels_last, not channels_last

    def fake_outputs(self, shape, input, contiguous_output):
        if contiguous_output:
            return input.new_empty(shape), input.new_empty(shape)
        return grouped_nhwc_empty(shape, input.new_empty), grouped_nhwc_empty(shape, input.new_empty)

    def fake_input_grad(self, input, contiguous_input_grad):
        return input.new_empty(input.shape) if contiguous_input_grad else grouped_nhwc_empty(input.shape,
                                                                                                input.new_empty)

    def fake_weight_grad(self, weight):
        return channels_last_weight(weight.new_empty(weight.shape))


conv2d_layout = GroupedNHWCLayout()


def is_plain_tensor(x):
    """Whether ``x`` is an eager tensor outside torch.compile, vmap and torch.func transforms:
    only then may the public functions copy it into a pooled buffer (an extension call)."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def channels_last_weight(w):
    """[T, C_out, C_in, kH, kW] stored as oneDNN's channels-last weights ``[T*C_out, kH, kW, C_in]``.

    Weight gradients come out of oneDNN in this layout and stay in it: fast weights built from
    them (MAML's inner step) then reach the next convolution without a transposing copy (two
    4.7 MB copies per Conv4 layer and meta-iteration otherwise). A view when w is stored so, else
    one copy (reshape, then contiguous, would copy an expanded weight twice).
    """
    T, C_out, C_in, KH, KW = w.shape
    return w.permute(0, 1, 3, 4, 2).reshape(T * C_out, KH, KW, C_in).contiguous().permute(0, 3, 1, 2).view(w.shape)


def conv2d_forward(x, weight, mask, bias, stride, padding, dilation, groups, skip_zero, contiguous_output=False):
    """(out, pre): contiguous if ``contiguous_output`` (the caller's input was not in grouped NHWC:
    PyTorch's conv2d gives a contiguous input a contiguous output), else in grouped NHWC. The fused
    epilogue writes either layout directly. The launcher is C++ (`masked_conv2d_forward` in
    csrc/cpu/bindings/masked.cpp): the compaction, the compact weights, one grouped oneDNN
    convolution over the active neurons and the fused epilogue."""
    return _extensions.cpu().masked_conv2d_forward(x, weight, mask, bias, list(stride), list(padding),
                                                   list(dilation), groups, skip_zero, contiguous_output,
                                                   _alloc.poisoning())


def conv2d_backward(grad_out, grad_pre, x, weight, mask, pre, stride, padding, dilation, groups, skip_zero,
                    need_input_grad, need_weight_grad, contiguous_input_grad=False):
    """(grad_input, grad_weight, grad_bias, grad_mask); grad_input contiguous [T, N, C_in, H, W] if
    ``contiguous_input_grad``, else grouped NHWC like the activations; grad_weight in
    `channels_last_weight` strides. The launcher is C++ (`masked_conv2d_backward` in
    csrc/cpu/bindings/masked.cpp): the fused prologue gathers the output gradient onto the active
    neurons and reduces the bias and mask gradients (the mask gradient only where ``pre`` is given,
    i.e. the mask needs one); the input and weight gradients of the compact convolution (only
    those asked for) come from csrc/cpu/conv_grad.cpp (float32, C_in a multiple of 16, no groups)
    or oneDNN, whichever was measured faster for the case (csrc/cpu/bindings/conv_choice.h)."""
    return _extensions.cpu().masked_conv2d_backward(grad_out, grad_pre, x, weight, mask, pre, list(stride),
                                                    list(padding), list(dilation), groups, skip_zero,
                                                    need_input_grad, need_weight_grad, contiguous_input_grad,
                                                    _alloc.poisoning())


# ---- linear --------------------------------------------------------------------------------


def linear_forward(x, weight, mask, bias, skip_zero):
    T, N = x.shape[:2]
    C = weight.shape[1]
    plan = compaction(mask, skip_zero, may_gather=True)
    w = _compact_rows(weight, plan)
    y = torch.bmm(x, w.transpose(1, 2))  # [T, N, A]
    return _epilogue(y, plan, mask, bias, (T, N, C), x.dtype)


def linear_backward(grad_out, grad_pre, x, weight, mask, pre, skip_zero, need_input_grad, need_weight_grad):
    T, N, C = grad_out.shape
    plan = compaction(mask, skip_zero, may_gather=True)
    slots = plan.width
    gy = _new_compact(plan, (T, N, slots), grad_out.dtype)
    grad_bias, grad_mask = _prologue(grad_out, grad_pre, pre, plan, mask, gy)
    grad_input, grad_weight = _not_requested(x), _not_requested(x)
    w = _compact_rows(weight, plan)
    if need_input_grad:
        grad_input = torch.bmm(gy, w)
    if need_weight_grad:
        grad_weight = _expand_rows(torch.bmm(gy.transpose(1, 2), x), plan, weight.shape)
    return grad_input, grad_weight, grad_bias, grad_mask
