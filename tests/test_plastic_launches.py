"""The launch budget of the GPU plastic backends: a forward + backward of plastic_rnn or
plastic_linear is at most 8 launches, whatever T, for every rule, activation, clip, given and
endogenous modulation, N from 1 to 1024, B from 1 to 64, in every dtype (16-bit: the same three
kernels; an initial trace given in 16-bit is converted to float32 and its gradient back, by the
CUDA C++ launcher and autograd, two more ops).

Counted on CPU tensors, on the launch path a GPU runs: Triton launches are recorded where every
Triton launch goes (`_triton_launch.intercepted`) and not run; CUDA C++ kernel launches are counted
by the emulation, which checks each launch and runs no block (``count_only``); and the ATen ops
around them that would launch a device kernel are counted by a TorchDispatchMode (fills, copies,
elementwise ops, reductions, matrix products, device-to-host reads; views and empty allocations
launch nothing). The kernels' results are not looked at here: tests/test_oracle.py and
tests/test_plastic.py run the same paths for real against the reference. bench/launches.py
counts the issue's cases with its own counter; this grid covers every option at the extremes of
the sizes.
"""

import contextlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import neuronml_fast as nf
from neuronml_fast import _alloc, _extensions
from neuronml_fast.ops import _triton_launch
from neuronml_fast.ops.plastic import trace_dtype

from conftest import gpu_backends

BUDGET = 8
# ATen ops that allocate without writing, and a view whose schema does not say so: no kernel on a GPU.
_NO_KERNEL = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
              torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
              torch.ops.aten._unsafe_view.default}


def launches_a_kernel(func):
    """Whether an ATen op would launch device work: not an allocation, not a view (every result
    an alias of an input that the op does not write)."""
    if func in _NO_KERNEL:
        return False
    returns = func._schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class AtenLaunches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "neuronml_fast":  # the package's custom ops: count what their implementation runs
            with self:
                return torch._library.custom_ops.OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if launches_a_kernel(func):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def triton_launches_recorded():
    launches = []
    with _triton_launch.intercepted(lambda kernel, grid, args, kwargs: launches.append(kernel.__name__)):
        yield launches


@contextlib.contextmanager
def cuda_launches_counted():
    module = _extensions.cuda()
    before = module.emulation_state()
    module.configure_emulation(count_only=True)
    launches = []
    try:
        yield launches
    finally:
        module.configure_emulation(count_only=before["count_only"])
        launches.extend(["cuda kernel"] * (module.emulation_state()["launches"] - before["launches"]))


def count_launches(backend, call):
    """(kernel launches, ATen kernel ops) of `call` on `backend`, outputs unpoisoned (a poisoned
    allocation is a fill the real launch path does not have)."""
    recorder = triton_launches_recorded() if backend == "triton" else cuda_launches_counted()
    with _alloc.poisoned(False), nf.use_backend(backend), recorder as kernels, AtenLaunches() as aten:
        call()
    return kernels, aten.ops


def _leaf(*shape, dtype, scale=0.3):
    return (scale * torch.randn(shape, dtype=dtype)).requires_grad_()


def _rnn_call(T, B, N, dtype, rule="hebb", modulation=None, clip=None, activation="tanh", alpha_scalar=False,
              y0=True, hebb=True, mod_activation="tanh"):
    args = dict(input=_leaf(T, B, N, dtype=dtype), weight=_leaf(N, N, dtype=dtype),
                alpha=_leaf(*(() if alpha_scalar else (N, N)), dtype=dtype),
                eta=torch.tensor(0.1, dtype=dtype, requires_grad=True))
    if y0:
        args["y0"] = _leaf(B, N, dtype=dtype)
    if hebb:
        args["hebb"] = _leaf(B, N, N, dtype=dtype)
    if modulation == "sequence":
        args["modulation"] = _leaf(T, B, dtype=dtype)
    elif modulation == "neuron":
        args["modulation"] = _leaf(T, B, N, dtype=dtype)
    elif modulation == "endogenous":
        args.update(mod_weight=_leaf(N, dtype=dtype), mod_bias=_leaf(dtype=dtype), mod_fanout=_leaf(N, dtype=dtype),
                    mod_activation=mod_activation)
    leaves = [v for v in args.values() if torch.is_tensor(v)]
    upstream = (torch.randn(T, B, N, dtype=dtype), torch.randn(B, N, N, dtype=trace_dtype(dtype)))

    def call():
        out, trace = nf.plastic_rnn(**args, clip=clip, rule=rule, activation=activation)
        torch.autograd.grad((out, trace), leaves, upstream, allow_unused=True)

    return call


def _linear_call(T, B, d_in, d_out, dtype, rule="hebb", activation="tanh", alpha_scalar=False, bias=True, drive=True,
                 hebb=True):
    args = dict(input=_leaf(T, B, d_in, dtype=dtype), weight=_leaf(d_out, d_in, dtype=dtype),
                alpha=_leaf(*(() if alpha_scalar else (d_out, d_in)), dtype=dtype),
                eta=torch.tensor(0.1, dtype=dtype, requires_grad=True),
                hebb=_leaf(B, d_out, d_in, dtype=dtype) if hebb else None, bias=_leaf(d_out, dtype=dtype) if bias else None,
                drive=_leaf(T, B, d_out, dtype=dtype) if drive else None)
    leaves = [v for v in args.values() if torch.is_tensor(v)]
    upstream = (torch.randn(T, B, d_out, dtype=dtype), torch.randn(B, d_out, d_in, dtype=trace_dtype(dtype)))

    def call():
        out, trace = nf.plastic_linear(**args, rule=rule, activation=activation)
        torch.autograd.grad((out, trace), leaves, upstream, allow_unused=True)

    return call


RNN_VARIANTS = {
    "hebb": dict(),
    "oja": dict(rule="oja"),
    "hebb-identity": dict(activation="identity"),
    "oja-clip": dict(rule="oja", clip=0.5),
    "modulated-sequence": dict(modulation="sequence"),
    "modulated-neuron-clip": dict(modulation="neuron", clip=0.5),
    "endogenous": dict(modulation="endogenous"),
    "endogenous-clip-identity": dict(modulation="endogenous", clip=0.5, activation="identity",
                                     mod_activation="identity"),
    "scalar-alpha-no-state": dict(alpha_scalar=True, y0=False, hebb=False),
}
SIZES = [(1, 1), (5, 3), (129, 2), (1024, 1), (64, 64)]  # (N, B)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["f16", "bf16", "f32", "f64"]


@pytest.mark.parametrize("backend,device", gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES, ids=[f"N{n}-B{b}" for n, b in SIZES])
@pytest.mark.parametrize("variant", sorted(RNN_VARIANTS))
def test_plastic_rnn_forward_backward_is_at_most_8_launches(backend, device, dtype, size, variant):
    N, B = size
    counts = set()
    for T in (1, 3, 40):
        torch.manual_seed(T)
        kernels, aten = count_launches(backend, _rnn_call(T, B, N, dtype, **RNN_VARIANTS[variant]))
        assert len(kernels) + len(aten) <= BUDGET, (T, kernels, aten)
        counts.add((len(kernels), len(aten)))
    assert len(counts) == 1, f"the launch count depends on T: {counts}"


@pytest.mark.parametrize("backend,device", gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rule,activation,alpha_scalar,state", list(itertools.product(
    ["hebb", "oja"], ["tanh", "identity"], [False, True], [True, False])))
def test_plastic_linear_forward_backward_is_at_most_8_launches(backend, device, dtype, rule, activation, alpha_scalar,
                                                               state):
    counts = set()
    for T, (d_in, d_out, B) in itertools.product((1, 7), [(1, 1, 1), (1024, 5, 2), (33, 1024, 64)]):
        torch.manual_seed(T)
        call = _linear_call(T, B, d_in, d_out, dtype, rule, activation, alpha_scalar, bias=state, drive=state,
                            hebb=state)
        kernels, aten = count_launches(backend, call)
        assert len(kernels) + len(aten) <= BUDGET, (T, d_in, d_out, B, kernels, aten)
        counts.add((len(kernels), len(aten)))
    assert len(counts) == 1, f"the launch count depends on the sizes: {counts}"


@pytest.mark.parametrize("backend,device", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_the_gpu_plastic_path_is_three_kernels_and_no_aten_op(backend, device, dtype):
    # The endogenous modulator, the clip and the weight gradient all inside the kernels: a
    # forward, a reverse walk and a reduction. eta is ignored by the modulated rule, so nothing
    # checks or reads it. 16-bit: the kernels write the output and the gradients in the caller's
    # dtype themselves, no conversion around them.
    kernels, aten = count_launches(backend, _rnn_call(12, 4, 20, dtype, modulation="endogenous", clip=1.0,
                                                      hebb=False))
    assert (len(kernels), aten) == (3, [])


def test_the_counter_sees_the_ops_that_launch():
    # The classification itself: views and allocations are free, anything that writes memory is not.
    x = torch.randn(4, 5)
    with AtenLaunches() as aten:
        y = x.reshape(20).view(4, 5)[1:].t()
        z = torch.empty(3)
    assert aten.ops == [] and y.shape == (5, 3) and z.shape == (3,)
    with AtenLaunches() as aten:
        x.zero_()
        x.t().contiguous()
        (x @ x.t()).sum()
        float(x[0, 0])
    assert len(aten.ops) == 5, aten.ops
