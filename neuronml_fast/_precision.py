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

The switches are set through torch's legacy setters (``cudnn.allow_tf32`` sets cuDNN's
convolution and RNN switches together), and restored raw: torch's own code (``torch.export``,
``cudnn.flags``) still reads the legacy getters, which raise on a state only the new API can make.
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


# torch's legacy switch of each op; its setter keeps every new-API switch it governs consistent.
_LEGACY = {CONV: (torch.backends.cudnn, "allow_tf32"), MATMUL: (torch.backends.cuda.matmul, "allow_tf32")}
# The new API's raw (unresolved) switches behind each op's legacy one, as (backend, op) keys.
_RAW = {CONV: (("cuda", "conv"), ("cuda", "rnn")), MATMUL: (("cuda", "matmul"),)}


def _raw_api():
    return hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(torch._C, "_set_fp32_precision_setter")


def _set(op, tf32):
    holder, name = _LEGACY[op]
    setattr(holder, name, tf32)
    # The legacy "off" is the new API's "none", which a generic "tf32" still resolves to TF32.
    if tf32_allowed(op) != tf32:
        for switch in _switches(op):
            switch.fp32_precision = "tf32" if tf32 else "ieee"


def _switches(op):
    """The new API's objects behind op's legacy switch."""
    if _switch(op) is None:
        return ()
    return (torch.backends.cudnn.conv, torch.backends.cudnn.rnn) if op == CONV else (torch.backends.cuda.matmul,)


def _legacy(op):
    """op's legacy switch, None where torch's legacy getter refuses to read it."""
    holder, name = _LEGACY[op]
    try:
        return bool(getattr(holder, name))
    except RuntimeError:
        return None


def _saved(op):
    if _raw_api():
        return _legacy(op), [(key, torch._C._get_fp32_precision_getter(*key)) for key in _RAW[op]]
    return tf32_allowed(op)


def _restore(op, saved):
    if not isinstance(saved, tuple):
        _set(op, saved)
        return
    legacy, raw = saved
    if legacy is not None:  # torch remembers the legacy value apart: set it back first
        holder, name = _LEGACY[op]
        setattr(holder, name, legacy)
    for key, value in raw:
        if torch._C._get_fp32_precision_getter(*key) != value:
            torch._C._set_fp32_precision_setter(*key, value)


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
