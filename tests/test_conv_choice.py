"""The measured choice of the masked conv's dense core on the CPU (csrc/cpu/bindings/conv_choice.h):
every candidate, forced, matches the reference; `auto` measures a case once and remembers it; the
policy is validated and read from NEURONML_FAST_CPU_CONV."""

import os
import subprocess
import sys

import pytest
import torch

import neuronml_fast as nf
import neuronml_fast.cpu as nf_cpu
from neuronml_fast import _alloc, _extensions
from neuronml_fast.ops.masked import masked_conv2d_reference

ext = _extensions.load("_C_cpu")
pytestmark = pytest.mark.skipif(ext is None, reason="C++ CPU extension not built")


@pytest.fixture
def policy():
    """Sets the policy for one test and restores the environment's afterwards."""
    def set_(name):
        nf_cpu.set_conv_policy(name)
        nf_cpu.clear_conv_choices()
    yield set_
    nf_cpu.set_conv_policy(None)
    nf_cpu.clear_conv_choices()


def _inputs(tasks, dtype, c_in=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    t = () if tasks is None else (tasks,)
    x = torch.randn(*t, 4, c_in, 9, 9, generator=gen, dtype=dtype)
    w = torch.randn(*t, 10, c_in, 3, 3, generator=gen, dtype=dtype) * 0.1
    b = torch.randn(*t, 10, generator=gen, dtype=dtype)
    m = (torch.rand(*t, 10, generator=gen) > 0.4).to(dtype)
    return x, w, b, m


def _check_against_reference(tasks, dtype, need=(True, True, True, True), c_in=16):
    x, w, b, m = _inputs(tasks, dtype, c_in)
    leaves = [v.clone().requires_grad_(n) for v, n in zip((x, w, b, m), need)]
    with nf.use_backend("cpu"), _alloc.poisoned():
        out = nf.masked_conv2d(*leaves, stride=2, padding=1)
        wanted = [v for v, n in zip(leaves, need) if n]
        got = torch.autograd.grad(out, wanted, torch.ones_like(out))
    ref_leaves = [v.double().requires_grad_(n) for v, n in zip((x, w, b, m), need)]
    ref = masked_conv2d_reference(*ref_leaves, stride=2, padding=1)
    want = torch.autograd.grad(ref, [v for v in ref_leaves if v.requires_grad], torch.ones_like(ref))
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.double(), ref, **tol)
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("name", nf_cpu.CONV_POLICIES)
@pytest.mark.parametrize("tasks", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_policy_matches_the_reference(policy, name, tasks, dtype):
    policy(name)
    _check_against_reference(tasks, dtype)


@pytest.mark.parametrize("name", nf_cpu.CONV_POLICIES)
@pytest.mark.parametrize("need", [(True, False, True, False), (False, True, True, True), (True, True, True, False)],
                         ids=["input-only", "weight-and-mask", "no-mask-grad"])
def test_every_policy_gives_only_the_gradients_asked_for(policy, name, need):
    policy(name)
    _check_against_reference(3, torch.float32, need)


@pytest.mark.skipif(ext is None or not ext.conv_grad_available(), reason="no AVX2/FMA convolution-gradient kernels")
def test_forced_candidates_are_the_ones_that_run():
    # One task, every neuron active: the compact output gradient is grad_out itself, so the
    # gradients are exactly oneDNN's under 'onednn-grouped' and exactly the own kernels' under
    # 'own'. At this shape the two round differently, which tells the paths apart.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(8, 16, 3, 3, generator=gen) * 0.1).requires_grad_()
    g = torch.randn(3, 8, 7, 7, generator=gen)

    def layer_grads(name):
        nf_cpu.set_conv_policy(name)
        with nf.use_backend("cpu"):
            out = nf.masked_conv2d(x, w, torch.ones(8), torch.zeros(8), padding=1)
            return torch.autograd.grad(out, (x, w), g)

    try:
        own, onednn = layer_grads("own"), layer_grads("onednn-grouped")
    finally:
        nf_cpu.set_conv_policy(None)
    gx, gw, _ = torch.ops.aten.convolution_backward(g.contiguous(memory_format=torch.channels_last), x.detach(),
                                                    w.detach().contiguous(memory_format=torch.channels_last), None,
                                                    [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    assert torch.equal(onednn[0], gx) and torch.equal(onednn[1], gw)
    assert not (torch.equal(own[0], gx) and torch.equal(own[1], gw))
    torch.testing.assert_close(own[0], gx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(own[1], gw, atol=1e-4, rtol=1e-4)


def test_auto_measures_a_case_once_and_remembers_it(policy):
    policy("auto")
    assert nf_cpu.conv_choices() == []
    _check_against_reference(3, torch.float32)
    first = nf_cpu.conv_choices()
    # The forward (grouped or per task, T > 1) and the backward (own kernels too) each measured once.
    assert len(first) == 2, first
    assert {impl for _, impl in first} <= {"own", "onednn-grouped", "onednn-per-task"}
    _check_against_reference(3, torch.float32)
    assert nf_cpu.conv_choices() == first


def test_auto_keys_separate_threads_and_gradients(policy):
    policy("auto")
    _check_against_reference(3, torch.float32)
    _check_against_reference(3, torch.float32, need=(True, False, True, False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        _check_against_reference(3, torch.float32)
    finally:
        torch.set_num_threads(threads)
    backward_keys = {tuple(key) for key, _ in nf_cpu.conv_choices() if key[0] == 1}
    assert len(backward_keys) == 3, backward_keys


def test_single_candidate_is_not_measured(policy):
    # float64 has no own kernels and one task has no per-task form: nothing to choose between.
    policy("auto")
    _check_against_reference(None, torch.float64)
    assert nf_cpu.conv_choices() == []


def test_bad_policy_names_the_argument():
    with pytest.raises(RuntimeError, match="policy: expected .*got 'fastest'"):
        nf_cpu.set_conv_policy("fastest")
    assert nf_cpu.conv_policy() in nf_cpu.CONV_POLICIES


@pytest.mark.parametrize("value,expected", [("own", "own"), ("", "auto"), ("bogus", "error")])
def test_policy_comes_from_the_environment(value, expected):
    code = ("import neuronml_fast.cpu as c\n"
            "try:\n    print(c.conv_policy())\nexcept RuntimeError as e:\n    print('error', e)\n")
    env = dict(os.environ, NEURONML_FAST_CPU_CONV=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == expected, out
    if expected == "error":
        assert "NEURONML_FAST_CPU_CONV" in out and "bogus" in out


def test_a_choice_made_with_the_own_kernels_is_not_replayed_without_them(policy):
    # The own kernels leave the candidates when the portable loops are forced at run time: a winner
    # measured while they were in use must not be replayed then (it would call kernels not in use).
    ext.set_vector_isa("auto")
    if not ext.conv_grad_available():
        pytest.skip("the AVX2/FMA kernels are not in use on this CPU")
    policy("auto")
    try:
        _check_against_reference(3, torch.float32)
        backward = [impl for key, impl in nf_cpu.conv_choices() if key[0] == 1]
        ext.set_vector_isa("baseline")
        _check_against_reference(3, torch.float32)
        after = [impl for key, impl in nf_cpu.conv_choices() if key[0] == 1]
    finally:
        ext.set_vector_isa("auto")
    # measured again without the own kernels: a second backward choice, which cannot be them
    assert len(backward) == 1 and len(after) == 2, (backward, after)
    assert after.count("own") == backward.count("own"), (backward, after)
