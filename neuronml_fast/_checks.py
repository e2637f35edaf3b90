"""Argument checks shared by every op. Each error names the argument, the expected and the given."""

import torch


class ArgumentError(ValueError, RuntimeError):
    """A tensor argument of the wrong shape, size or device. A ValueError, and also the
    RuntimeError that torch's own ops raise for the same input, so that code written against
    ``nn.Conv2d`` / ``nn.Linear`` catches it unchanged."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A tensor argument of the wrong dtype: a TypeError, and the RuntimeError torch raises."""

# The floating dtypes the ops take (each backend supports a subset: backends.py).
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _shape(t):
    return list(t.shape)


def floating_tensor(name, value, *, min_ndim=0, ndim=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
                                f"got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ArgumentError(f"{name}: expected a {ndim}-d tensor, got shape {_shape(value)}")
    if value.dim() < min_ndim:
        raise ArgumentError(f"{name}: expected at least {min_ndim} dimensions, got shape {_shape(value)}")
    return value


def like(name, value, ref_name, ref, *, shape=None):
    """``value`` must be a tensor with ``ref``'s dtype and device, and ``shape`` (default: ref's)."""
    floating_tensor(name, value)
    if value.dtype != ref.dtype:
        raise ArgumentTypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {value.dtype}")
    if value.device != ref.device:
        raise ArgumentError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {value.device}")
    expected = ref.shape if shape is None else shape
    if value.shape != expected:
        raise ArgumentError(f"{name}: expected shape {list(expected)}, got {_shape(value)}")
    return value


def both_or_neither(name_a, a, name_b, b):
    if (a is None) != (b is None):
        given = name_a if a is not None else name_b
        raise ValueError(f"{name_a} and {name_b}: expected both or neither, got only {given}")


def like_in_dtypes(name, value, ref_name, ref, dtypes, *, shape=None):
    """`like`, where ``value``'s dtype may be any of ``dtypes``: {dtype: what it is}."""
    floating_tensor(name, value)
    if value.dtype not in dtypes:
        expected = " or ".join(f"{dtype} ({what})" for dtype, what in dtypes.items())
        raise ArgumentTypeError(f"{name}: expected dtype {expected}, got {value.dtype}")
    same_dtype = ref.new_empty((0,), dtype=value.dtype)  # only its dtype and device are read
    return like(name, value, ref_name, same_dtype, shape=ref.shape if shape is None else shape)
