"""Whether float32 GEMMs may run on TF32 tensor cores: torch's own switches, read the way torch's
CUDA convolution and matmul read them, so that a drop-in layer computes as the eager layer would.

* Convolutions follow ``torch.backends.cudnn.conv.fp32_precision`` (torch >= 2.9; it falls back
  to ``torch.backends.cudnn.fp32_precision``, then to ``torch.backends.fp32_precision``, and the
  legacy ``torch.backends.cudnn.allow_tf32`` sets it). Its default is "tf32": an fp32
  ``nn.Conv2d`` on a GPU runs on TF32 tensor cores unless the user says otherwise.
* Matrix products (the linear layers) follow ``torch.backends.cuda.matmul.fp32_precision``
  (which ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.set_float32_matmul_precision``
  set). Its default is IEEE.

The getters of the new API return the resolved value (an operator's own setting, else its
backend's, else the generic one), so "tf32" there is exactly torch's test (``allowTF32CuDNN(conv)``,
``allowTF32CuBLAS()``). The legacy getters raise when the two APIs were mixed, so they are read
only where the new API does not exist (torch < 2.9).
"""

import contextlib

import torch

CONV = "conv"
MATMUL = "matmul"
OPS = (CONV, MATMUL)


def _switch(op):
    """The object whose ``fp32_precision`` governs op on CUDA, None before torch 2.9."""
    if op == CONV:
        return getattr(torch.backends.cudnn, "conv", None)
    return torch.backends.cuda.matmul if hasattr(torch.backends.cuda.matmul, "fp32_precision") else None


def tf32_allowed(op):
    """Whether torch lets an fp32 ``op`` ("conv" or "matmul") on CUDA run on TF32 tensor cores."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    switch = _switch(op)
    if switch is not None:
        return switch.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32 if op == CONV else torch.backends.cuda.matmul.allow_tf32)


def _set(op, tf32):
    switch = _switch(op)
    if switch is not None:
        switch.fp32_precision = "tf32" if tf32 else "ieee"
    elif op == CONV:
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _saved(op):
    switch = _switch(op)
    if switch is not None:
        return switch, switch.fp32_precision
    return None, tf32_allowed(op)


def _restore(op, saved):
    switch, value = saved
    if switch is not None:
        switch.fp32_precision = value
    else:
        _set(op, value)


@contextlib.contextmanager
def fp32_precision(conv_tf32, matmul_tf32):
    """Inside the block, fp32 convolutions and matrix products run on TF32 (True) or in IEEE fp32
    (False); the switches are restored on exit."""
    saved = {op: _saved(op) for op in OPS}
    try:
        _set(CONV, conv_tf32)
        _set(MATMUL, matmul_tf32)
        yield
    finally:
        for op in OPS:
            _restore(op, saved[op])


def full_float32():
    """float32 means IEEE float32 inside the block, for convolutions and matrix products alike."""
    return fp32_precision(False, False)
