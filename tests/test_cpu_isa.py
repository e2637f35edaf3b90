"""The C++ CPU backend's run-time choice of vector kernels (csrc/cpu/isa.h): the AVX2/FMA kernels and
the portable loops agree, NEURONML_FAST_CPU_ISA=baseline forces the portable loops, and the compiled
extension holds AVX instructions only in the functions compiled for them (a portable build)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import _extensions
from neuronml_fast.ops.masked import masked_conv2d_reference, masked_linear_reference
from neuronml_fast.ops.batch_norm import batch_norm_rows_double_backward, batch_norm_rows_double_backward_reference
from neuronml_fast.ops.plastic import plastic_linear_reference, plastic_rnn_reference
from neuronml_fast.ops.sensitivity import neuron_sensitivity_reference

ext = _extensions.cpu()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ CPU extension not built")


def _cpu_flags():
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def _has_avx2_fma():
    flags = _cpu_flags()
    return flags is not None and {"avx2", "fma"} <= flags


needs_avx2 = pytest.mark.skipif(not _has_avx2_fma(), reason="this CPU lacks AVX2 or FMA")


@pytest.fixture
def set_isa():
    yield ext.set_vector_isa
    ext.set_vector_isa("auto")


def _both_paths(set_isa, run):
    """run() under the AVX2 kernels, then under the portable loops."""
    set_isa("avx2")
    fast = run()
    set_isa("baseline")
    portable = run()
    return fast, portable


def _assert_close(fast, portable, reference, atol, rtol):
    for a, b, r in zip(fast, portable, reference):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        torch.testing.assert_close(a.double(), r, atol=atol, rtol=rtol)
        torch.testing.assert_close(b.double(), r, atol=atol, rtol=rtol)


def test_the_choice_follows_the_cpu():
    if _cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    forced = os.environ.get("NEURONML_FAST_CPU_ISA") == "baseline"
    expected = "avx2" if _has_avx2_fma() and not forced else "baseline"
    assert ext.vector_isa() == expected
    assert ext.conv_grad_available() == (expected == "avx2")


def test_the_environment_forces_the_portable_loops():
    code = "from neuronml_fast import _extensions as e; c = e.cpu(); print(c.vector_isa(), c.conv_grad_available())"
    env = dict(os.environ, NEURONML_FAST_CPU_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["baseline", "False"]


def test_set_vector_isa_checks_its_argument(set_isa):
    with pytest.raises(RuntimeError, match="expected 'auto', 'avx2' or 'baseline'"):
        set_isa("avx512")
    set_isa("baseline")
    assert ext.vector_isa() == "baseline" and not ext.conv_grad_available()
    set_isa("auto")
    assert ext.vector_isa() == ("avx2" if _has_avx2_fma() and os.environ.get("NEURONML_FAST_CPU_ISA") != "baseline"
                                else "baseline")


def _conv_inputs(layout, c_in, c_out, active, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (2,) if layout == "tasks" else ()
    x = torch.randn(*lead, 3, c_in, 9, 10, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(*lead, c_out, c_in, 3, 3, generator=gen) * 0.1
    b = torch.randn(*lead, c_out, generator=gen)
    m = (torch.rand(*lead, c_out, generator=gen) < active).float() * torch.rand(*lead, c_out, generator=gen)
    g = torch.randn(*lead, 3, c_out, 9, 10, generator=gen)  # stride 1, padding 1: the input's size
    return x, w, b, m, g


def _conv_step(fn, x, w, b, m, g):
    x, w, b, m = (t.clone().requires_grad_() for t in (x, w, b, m))
    out = fn(x, w, m, b, 1, 1)
    out.backward(g)
    return out.detach(), x.grad, w.grad, b.grad, m.grad


@needs_avx2
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tasks"])
@pytest.mark.parametrize("c_in,c_out", [(32, 16), (16, 24), (8, 8)])
@pytest.mark.parametrize("active", [1.0, 0.4])
def test_masked_conv2d_avx2_and_portable_agree(set_isa, layout, c_in, c_out, active):
    nf.set_backend("cpu")
    args = _conv_inputs(layout, c_in, c_out, active)
    fast, portable = _both_paths(set_isa, lambda: _conv_step(nf.masked_conv2d, *args))
    reference = _conv_step(masked_conv2d_reference, *(t.double() for t in args))
    _assert_close(fast, portable, reference, atol=1e-4, rtol=1e-4)
    assert fast[0].stride() == portable[0].stride()


@needs_avx2
@pytest.mark.parametrize("tasks", [None, 3])
@pytest.mark.parametrize("active", [1.0, 0.4])
def test_masked_linear_avx2_and_portable_agree(set_isa, tasks, active):
    nf.set_backend("cpu")
    gen = torch.Generator().manual_seed(1)
    lead = () if tasks is None else (tasks,)
    x, w = torch.randn(*lead, 7, 24, generator=gen), torch.randn(*lead, 40, 24, generator=gen)
    b = torch.randn(*lead, 40, generator=gen)
    m = (torch.rand(*lead, 40, generator=gen) < active).float() * torch.rand(*lead, 40, generator=gen)
    g = torch.randn(*lead, 7, 40, generator=gen)

    def step(fn, x, w, b, m):
        x, w, b, m = (t.clone().requires_grad_() for t in (x, w, b, m))
        out = fn(x, w, m, b)
        out.backward(g.to(out.dtype))
        return out.detach(), x.grad, w.grad, b.grad, m.grad

    fast, portable = _both_paths(set_isa, lambda: step(nf.masked_linear, x, w, b, m))
    reference = step(masked_linear_reference, *(t.double() for t in (x, w, b, m)))
    _assert_close(fast, portable, reference, atol=1e-4, rtol=1e-4)


@needs_avx2
@pytest.mark.parametrize("shape", [(2, 3, 16, 5, 7), (1, 2, 13, 3, 2)])
def test_grouped_nhwc_copy_avx2_and_portable_agree(set_isa, shape):
    x = torch.randn(shape)
    out = lambda: torch.empty(shape[1], shape[3], shape[4], shape[0], shape[2])  # noqa: E731

    def run():
        dst = out()
        ext.to_grouped_nhwc_out(x, dst)
        return dst

    fast, portable = _both_paths(set_isa, run)
    assert torch.equal(fast, portable)
    assert torch.equal(fast, x.permute(1, 3, 4, 0, 2))


_PLASTIC_CASES = [  # (layer, rule, modulation per neuron, clip, scalar alpha)
    ("rnn", "hebb", None, None, False),
    ("rnn", "oja", None, None, True),
    ("rnn", "hebb", None, 0.3, False),
    ("rnn", "modulated", True, None, False),
    ("rnn", "modulated", False, 0.2, True),
    ("rnn", "endogenous", True, None, False),
    ("rnn", "endogenous", True, 0.2, True),
    ("linear", "hebb", None, None, False),
    ("linear", "oja", None, None, False),
]


def _plastic_step(layer, rule, per_neuron, clip, scalar_alpha, dtype, fn_rnn, fn_linear):
    """Outputs, final trace and every gradient of one plastic call on fixed inputs (odd sizes: 13
    neurons and 21 inputs leave vector tails)."""
    gen = torch.Generator().manual_seed(7)
    T, B, N, I = 9, 3, 13, 21
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    alpha = r(()) * 0.3 if scalar_alpha else r(N, N if layer == "rnn" else I) * 0.3
    eta = torch.tensor(0.2, dtype=dtype)
    if layer == "rnn" and rule == "endogenous":  # backpropamine's modulator neuron
        leaves = [t.clone().requires_grad_() for t in (r(T, B, N), r(N, N) * 0.3, alpha, eta, r(N) * 0.5, r(()), r(N))]
        out, hebb = fn_rnn(*leaves[:4], clip=clip, mod_weight=leaves[4], mod_bias=leaves[5], mod_fanout=leaves[6])
    elif layer == "rnn":
        args = [r(T, B, N), r(N, N) * 0.3, alpha, eta]
        modulation = None if rule != "modulated" else r(T, B, N) if per_neuron else r(T, B)
        leaves = [t.clone().requires_grad_() for t in args + ([modulation] if modulation is not None else [])]
        kwargs = dict(rule="hebb" if modulation is not None else rule, clip=clip)  # modulation replaces the rule
        if modulation is not None:
            kwargs["modulation"] = leaves[4]
        out, hebb = fn_rnn(*leaves[:4], **kwargs)
    else:
        leaves = [t.clone().requires_grad_() for t in (r(T, B, I), r(N, I) * 0.3, alpha, eta, r(N))]
        out, hebb = fn_linear(*leaves[:4], bias=leaves[4], rule=rule)
    (out * r(*out.shape)).sum().add((hebb * r(*hebb.shape)).sum()).backward()
    # eta has no effect under modulation: the reference leaves it out of the graph (None), the op's
    # gradient is 0.
    return [out.detach(), hebb.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", _PLASTIC_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_plastic_avx2_and_portable_agree(set_isa, case, dtype):
    nf.set_backend("cpu")
    fast, portable = _both_paths(set_isa, lambda: _plastic_step(*case, dtype, nf.plastic_rnn, nf.plastic_linear))
    reference = _plastic_step(*case, torch.float64, plastic_rnn_reference, plastic_linear_reference)
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    _assert_close(fast, portable, reference, atol=tol, rtol=tol)


def _functions_with_avx(library):
    """Names of the functions in `library` holding VEX- or EVEX-encoded (AVX) instructions."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                             check=True, timeout=600).stdout
    found, current = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
        elif current and re.match(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s", line):
            found.add(current)
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not found")
@pytest.mark.skipif(ext is None or ext.compiled_with_avx, reason="built with NEURONML_FAST_MARCH for an AVX CPU")
def test_avx_instructions_lie_only_in_the_avx2_kernels():
    # A portable build runs on any x86-64 CPU only if every AVX instruction sits in a function that
    # is called after the run-time check: those of namespace neuronml_fast::cpu::avx2.
    outside = sorted(f for f in _functions_with_avx(ext.__file__) if "neuronml_fast::cpu::avx2::" not in f)
    assert not outside, f"AVX instructions outside the dispatched kernels: {outside[:10]}"
    if _has_avx2_fma():
        assert _functions_with_avx(ext.__file__), "no AVX2 kernels found in the extension"


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 129), (700, 61)])  # vector tails; the second is parallel
def test_sensitivity_avx2_and_portable_agree(set_isa, shape, dtype):
    nf.set_backend("cpu")
    gen = torch.Generator().manual_seed(2)
    w, gw = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    b, gb = (torch.randn(shape[0], generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    fast, portable = _both_paths(set_isa, lambda: nf.neuron_sensitivity(w, gw, b, gb))
    reference = neuron_sensitivity_reference(w.double(), gw.double(), b.double(), gb.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    _assert_close(fast, portable, reference, atol=tol, rtol=tol)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows,channels", [(9, 13), (700, 64)])  # vector tails; the second is parallel
def test_batch_norm_double_backward_avx2_and_portable_agree(set_isa, rows, channels, dtype):
    nf.set_backend("cpu")
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    x, g, u = r(rows, channels), r(rows, channels), r(rows, channels)
    gamma, u_gamma, u_beta = r(channels), r(channels), r(channels)
    mean, invstd = x.mean(0), (x.var(0, unbiased=False) + 1e-5).rsqrt()
    args = (u, u_gamma, u_beta, g, x, gamma, mean, invstd)
    fast, portable = _both_paths(set_isa, lambda: batch_norm_rows_double_backward(*args))
    reference = batch_norm_rows_double_backward_reference(*(t.double() for t in args))
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    _assert_close(fast, portable, reference, atol=tol, rtol=tol)
