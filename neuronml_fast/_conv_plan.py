"""Device-side planning shared by the GPU launchers (Triton and CUDA) of the masked conv.

Everything here runs on the device with torch ops: no host synchronization, so a launch never
waits for the mask to be read back.
"""

import torch


def compaction(mask, groups, skip_zero):
    """Per (task, group): its channels ordered active first ``[T*G, C/G]`` int32, and the active
    count ``[T*G]`` int32. Blocks of slots past the count skip their GEMM entirely."""
    T, C = mask.shape
    keep = mask != 0 if skip_zero else torch.ones_like(mask, dtype=torch.bool)
    keep = keep.reshape(T * groups, C // groups)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()
    return order, keep.sum(1, dtype=torch.int32)


def output_hw(x, weight, stride, padding, dilation):
    return tuple(
        (x.shape[-2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[-2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


def weight_grad_splits(pixels, block, max_splits=64, pixels_per_program=4096):
    """Split the pixel reduction of the weight gradient so that enough programs run:
    returns (splits, pixels per split), the latter a multiple of ``block``."""
    pixels = max(pixels, 1)
    splits = max(1, min(max_splits, -(-pixels // pixels_per_program)))
    per_split = -(-(-(-pixels // splits)) // block) * block
    return -(-pixels // per_split), per_split


# A linear layer is the 1x1 convolution of a 1x1 image: GPU backends serve it with their conv
# kernels through these two adapters.


def linear_forward(conv2d_forward, x, weight, mask, bias, skip_zero):
    out, pre = conv2d_forward(x[..., None, None], weight[..., None, None], mask, bias, (1, 1), (0, 0), (1, 1), 1,
                              skip_zero)
    return out.view(out.shape[:3]), pre.view(pre.shape[:3])


def linear_backward(conv2d_backward, grad_out, grad_pre, x, weight, mask, pre, skip_zero, need_input_grad,
                    need_weight_grad):
    image = lambda t: None if t is None else t[..., None, None]  # noqa: E731
    gx, gw, gb, gm = conv2d_backward(image(grad_out), image(grad_pre), image(x), image(weight), mask, image(pre),
                                     (1, 1), (0, 0), (1, 1), 1, skip_zero, need_input_grad, need_weight_grad)
    return (gx.view(x.shape) if need_input_grad else gx), (gw.view(weight.shape) if need_weight_grad else gw), gb, gm
