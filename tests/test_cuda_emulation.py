"""The CUDA emulation (csrc/emu) that runs the CUDA C++ kernels on CPU tensors.

Its own checks (csrc/emu/selftest.cu): the warp intrinsics' and the WMMA operations' results, the
races and misuse it must expose under every warp order, the launch and shared-memory limits it must
enforce, the 16-bit conversions; then the CUDA kernels' launch geometry against a device whose grid
limits are lowered, so that shapes too large for a test reach the same code paths.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast import _extensions
from neuronml_fast.ops.masked import masked_conv2d_reference
from neuronml_fast.ops.plastic import plastic_rnn_reference

pytestmark = pytest.mark.skipif(
    not _extensions.cuda_emulated() or _extensions.cuda() is None,
    reason="needs the emulated CUDA extension (NEURONML_FAST_CUDA_EMULATE=1 and a C++ compiler at build time)",
)

ORDERS = ["forward", "reverse", "random"]


@pytest.fixture
def emulator():
    module = _extensions.cuda()
    saved = module.emulation_state()
    yield module
    module.configure_emulation(order=saved["order"], seed=saved["seed"], max_grid_yz=saved["max_grid_yz"],
                               optin_shared_bytes=saved["optin_shared_bytes"],
                               multiprocessors=saved["multiprocessors"], count_only=saved["count_only"])


def _ints(n):
    return torch.full((n,), -7, dtype=torch.int32)


def _expected_warp_ops():
    rows = []
    values = [lane * 10 for lane in range(32)]
    ballot = sum(1 << lane for lane in range(32) if lane % 3 == 0)
    ballot = ballot - (1 << 32) if ballot >= 1 << 31 else ballot  # as the kernel's int
    for lane in range(32):
        segment, offset = lane // 8 * 8, lane % 8
        rows.append([
            values[3],
            values[lane - 2] if lane >= 2 else values[lane],
            values[lane + 5] if lane + 5 < 32 else values[lane],
            values[lane ^ 1],
            values[segment + offset + 1] if offset + 1 < 8 else values[lane],
            ballot,
            1 + 0,  # some lane is 7; not all lanes are < 31
            sum(range(32)),
        ])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("order", ORDERS)
def test_warp_intrinsics(emulator, order):
    emulator.configure_emulation(order=order)
    out = _ints(32 * 8)
    emulator.emulation_selftest("warp_ops", out)
    torch.testing.assert_close(out.view(32, 8), _expected_warp_ops())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("threads", [64, 256])
def test_a_missing_block_barrier_is_exposed(emulator, order, threads):
    emulator.configure_emulation(order=order)
    expected = (torch.arange(threads, dtype=torch.int32) + 32) % threads
    out = _ints(threads)
    emulator.emulation_selftest("barrier_race", out, threads, True)
    torch.testing.assert_close(out, expected)
    emulator.emulation_selftest("barrier_race", out, threads, False)
    assert not torch.equal(out, expected), "a read of another warp's slot before __syncthreads went unnoticed"


@pytest.mark.parametrize("order", ORDERS)
def test_a_missing_warp_barrier_is_exposed(emulator, order):
    emulator.configure_emulation(order=order)
    expected = (torch.arange(32, dtype=torch.int32) + 1) % 32
    out = _ints(32)
    emulator.emulation_selftest("lane_race", out, 0, True)
    torch.testing.assert_close(out, expected)
    emulator.emulation_selftest("lane_race", out, 0, False)
    assert not torch.equal(out, expected), "a read of another lane's slot before __syncwarp went unnoticed"


def test_a_shuffle_naming_exited_lanes_fails(emulator):
    with pytest.raises(RuntimeError, match="exited_lanes launch failed.*lane 16 has exited"):
        emulator.emulation_selftest("exited_lanes", _ints(32))


def test_a_shuffle_against_a_block_barrier_fails(emulator):
    with pytest.raises(RuntimeError, match="waits at __syncthreads"):
        emulator.emulation_selftest("shuffle_against_barrier", _ints(32))


def test_dynamic_shared_memory_needs_the_opt_in_past_48_kib(emulator):
    out = torch.zeros(1)
    emulator.emulation_selftest("dynamic_shared", out, 48 * 1024, False)
    assert out.item() == 48 * 1024 // 4 - 1
    with pytest.raises(RuntimeError, match="over the kernel's limit of 49152.*cudaFuncSetAttribute"):
        emulator.emulation_selftest("dynamic_shared", out, 64 * 1024, False)
    emulator.emulation_selftest("dynamic_shared", out, 200 * 1024, True)
    assert out.item() == 200 * 1024 // 4 - 1
    with pytest.raises(RuntimeError, match="opt-in maximum of 232448"):
        emulator.emulation_selftest("dynamic_shared", out, 228 * 1024, True)


def test_static_shared_memory_is_limited_to_48_kib(emulator):
    with pytest.raises(RuntimeError, match="static shared memory of 57344 bytes"):
        emulator.emulation_selftest("big_static_shared", torch.zeros(32, dtype=torch.float64))


def test_shared_memory_starts_poisoned(emulator):
    out = torch.zeros(64)
    emulator.emulation_selftest("unwritten_shared", out)
    assert torch.isnan(out).all()


def test_launch_limits(emulator):
    out = _ints(65536)
    emulator.emulation_selftest("grid", out, 65535)
    assert out[65534].item() == 65534 and out[65535].item() == -7
    with pytest.raises(RuntimeError, match=r"grid \(1, 65536, 1\) is outside the device's limits"):
        emulator.emulation_selftest("grid", out, 65536)
    with pytest.raises(RuntimeError, match="1025 threads"):
        emulator.emulation_selftest("too_many_threads", _ints(1))
    emulator.configure_emulation(max_grid_yz=4)
    with pytest.raises(RuntimeError, match=r"y and z in \[1, 4\]"):
        emulator.emulation_selftest("grid", out, 5)


@pytest.mark.parametrize("order", ORDERS)
def test_a_missing_grid_barrier_is_exposed(emulator, order):
    # A cooperative launch keeps every block resident and runs them by turns between grid
    # barriers: block k reads block k+1's slot, right only with the barrier between.
    emulator.configure_emulation(order=order)
    blocks = 5
    expected = (torch.arange(blocks, dtype=torch.int32) + 1) % blocks + 1
    out = _ints(2 * blocks)
    before = emulator.emulation_state()["grid_barriers"]
    emulator.emulation_selftest("grid_barrier", out, blocks)
    torch.testing.assert_close(out[:blocks], expected)
    assert emulator.emulation_state()["grid_barriers"] == before + 1
    out = _ints(2 * blocks)
    emulator.emulation_selftest("grid_barrier_skipped", out, blocks)
    assert not torch.equal(out[:blocks], expected), "a read of another block's slot before the grid barrier went unnoticed"


@pytest.mark.parametrize("name,message", [
    ("grid_barrier_not_cooperative", "outside a cooperative launch"),
    ("grid_barrier_after_exit", "can never complete: block .* has exited"),
    ("grid_barrier_against_block_barrier", "__syncthreads .* can never complete: other threads of its block wait at "
                                           "the grid barrier"),
])
def test_grid_barrier_misuse_fails(emulator, name, message):
    with pytest.raises(RuntimeError, match=message):
        emulator.emulation_selftest(name, _ints(8), 4)


def test_a_cooperative_grid_the_device_cannot_hold_fails(emulator):
    # 64-thread blocks: 32 a multiprocessor (its block limit), so 4 multiprocessors hold 128 of them.
    emulator.configure_emulation(multiprocessors=4)
    emulator.emulation_selftest("grid_barrier", _ints(256), 128)
    with pytest.raises(RuntimeError, match="cooperative launch of 129 blocks; the device holds at most 128"):
        emulator.emulation_selftest("grid_barrier", _ints(258), 129)


def test_a_cooperative_grid_after_a_larger_one(emulator):
    # The blocks a larger grid left resident are not this grid's.
    emulator.emulation_selftest("grid_barrier", _ints(16), 8)
    out = _ints(6)
    emulator.emulation_selftest("grid_barrier", out, 3)
    assert out[:3].tolist() == [2, 3, 1]


def test_atomics(emulator):
    f, d = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    emulator.emulation_selftest("atomic_sums", f, 3, out2=d)
    assert f.item() == 3 * 256 and d.item() == 3 * 256 * 0.5


def test_count_only_checks_and_counts_launches_but_runs_no_block(emulator):
    # What bench/launches.py counts the launches of problems too large to emulate with.
    out = _ints(8)
    emulator.configure_emulation(count_only=True)
    before = emulator.emulation_state()
    emulator.emulation_selftest("grid", out, 8)
    after = emulator.emulation_state()
    assert after["count_only"] and after["launches"] == before["launches"] + 1 and after["blocks"] == before["blocks"]
    assert torch.equal(out, _ints(8))  # no block wrote
    with pytest.raises(RuntimeError, match="too_many_threads launch failed"):  # still checked
        emulator.emulation_selftest("too_many_threads", _ints(1))
    emulator.configure_emulation(count_only=False)
    emulator.emulation_selftest("grid", out, 8)
    assert not torch.equal(out, _ints(8))


def test_a_failed_kernel_launch_is_an_error_naming_the_kernel(emulator, monkeypatch):
    from neuronml_fast.ops.plastic import cuda as launcher

    emulator.configure_emulation(max_grid_yz=2)  # the plastic kernels put a sequence's blocks on grid y
    monkeypatch.setattr(launcher.CudaKernels, "requested_parts", 3)
    x = torch.randn(3, 2, 16, dtype=torch.float64)
    weight, alpha = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    with nf.use_backend("cuda"), pytest.raises(RuntimeError, match="plastic_forward launch failed.*grid"):
        nf.plastic_rnn(x, 0.1 * weight, 0.1 * alpha, 0.1, clip=1.0)


def test_a_plan_the_device_cannot_run_names_it(emulator, monkeypatch):
    from neuronml_fast.ops.plastic import cuda as launcher

    emulator.configure_emulation(multiprocessors=1)  # 8 blocks of 256 threads at once
    monkeypatch.setattr(launcher.CudaKernels, "requested_parts", 5)
    x = torch.randn(3, 2, 16, dtype=torch.float64)
    weight = torch.randn(16, 16, dtype=torch.float64)
    with nf.use_backend("cuda"), pytest.raises(RuntimeError, match="5 blocks per sequence cannot run 2 sequences"):
        nf.plastic_rnn(x, 0.1 * weight, 0.1 * weight, 0.1)


def test_plastic_sizes_past_32_bit_step_and_row_indices_name_the_argument(emulator):
    # The kernels divide step and row indices in 32 bits: 2^31 steps or rows are refused by name
    # (expanded tensors: the check comes before any element is read).
    n, big = 4, 2**31
    weight, alpha = torch.zeros(n, n), torch.zeros(n, n)
    with pytest.raises(RuntimeError, match=r"input: expected at most 2147483647 steps"):
        emulator.plastic_plan(torch.zeros(1, 1, n).expand(big, 1, n), weight, alpha, True, 0, -1)
    wide = torch.zeros(1, 1).expand(big, 1)
    with pytest.raises(RuntimeError, match=r"weight: expected at most 2147483647 rows and columns"):
        emulator.plastic_plan(torch.zeros(1, 1, 1), wide, wide, False, 0, -1)


def test_plastic_16_bit_buffers_of_the_wrong_dtype_name_the_argument(emulator):
    # 16-bit inputs: the trace and the state the kernels read back are float32; a 16-bit buffer
    # there is refused by name.
    T, B, n = 2, 1, 4
    x = torch.zeros(T, B, n, dtype=torch.bfloat16)
    w, eta = torch.zeros(n, n, dtype=torch.bfloat16), torch.zeros((), dtype=torch.bfloat16)
    f32 = lambda *shape: torch.zeros(*shape)  # noqa: E731
    args = lambda trace: (x, w, w, eta, None, None, None, None, None, None, None, None, trace,  # noqa: E731
                          torch.zeros(T, B, n, dtype=torch.bfloat16), f32(T, B, n), f32(T, B, n, n), None, 0.0, 1,
                          True, 0, False, True, True, False, 1, True)
    emulator.plastic_forward(*args(f32(B, n, n)))
    with pytest.raises(RuntimeError, match=r"trace.*Float.*BFloat16|trace.*float32.*bfloat16"):
        emulator.plastic_forward(*args(torch.zeros(B, n, n, dtype=torch.bfloat16)))


# ---- 16-bit conversions ------------------------------------------------------------------------------


def test_bfloat16_conversions_round_as_cuda_does(emulator):
    values = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-20, -3.3e38, 3.39e38, 1e-40,
                           -7.25e-39, float("inf"), float("-inf"), float("nan"), 0.1, -2.7182817, 65504.0])
    values = torch.cat([values, torch.randn(64, generator=torch.Generator().manual_seed(3)) * 100])
    out = torch.full((3 * values.numel(),), -7.0)
    emulator.emulation_selftest("bf16_conversions", out, input=values)
    rn, rz, pair = out.view(3, -1)
    nearest = values.to(torch.bfloat16).float()  # torch rounds to nearest even, as __float2bfloat16_rn
    toward_zero = (values.view(torch.int32) & -65536).view(torch.float32)
    toward_zero[values.isnan()] = float("nan")
    torch.testing.assert_close(rn, nearest, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pair, nearest, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rz, toward_zero, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(rn[~values.isnan()], rz[~values.isnan()])


# ---- WMMA (csrc/emu/wmma.h) ------------------------------------------------------------------------

# fragment family: (multiplicand dtype, accumulator dtype, m, n, k)
WMMA = {"f16": (torch.float16, torch.float32, 16, 16, 16), "bf16": (torch.bfloat16, torch.float32, 16, 16, 16),
        "tf32": (torch.float32, torch.float32, 16, 16, 8), "f64": (torch.float64, torch.float64, 8, 8, 4)}
# (A, B, C, D column-major)
LAYOUTS = {"row": (False, False, False, False), "a-col": (True, False, True, False),
           "b-col": (False, True, False, True), "col": (True, True, True, True)}


def _tf32(x):
    """cvt.rna.tf32.f32 of float32 values: round to nearest, ties away from zero, to a 10-bit mantissa."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(torch.int32)  # wraps back to int32's range
    return rounded.view(torch.float32)


def _truncated_tf32(x):
    return (x.view(torch.int32) & -8192).view(torch.float32)


def _buffer(matrix, col_major):
    return (matrix.t() if col_major else matrix).contiguous().view(-1)


def _matrix(buffer, rows, cols, col_major):
    return buffer.view(cols, rows).t() if col_major else buffer.view(rows, cols)


def _wmma_problem(kind, seed=0):
    in_dtype, acc_dtype, m, n, k = WMMA[kind]
    gen = torch.Generator().manual_seed(seed)
    shapes = ((2 * m, 2 * k), (2 * k, n), (2 * m, n))
    if kind == "f64":  # quarter-integers: every product and sum exact, whatever the order
        return [(torch.randint(-16, 17, s, generator=gen) / 4).double() for s in shapes]
    a, b = (torch.randn(s, generator=gen).to(in_dtype) for s in shapes[:2])
    return a, b, torch.randn(shapes[2], generator=gen).to(acc_dtype)


def _accumulate(a, b, c, alpha):
    """D = alpha * (A B + C), the products added to C one k at a time in the accumulator's precision
    (exact for float: a product of two 16-bit or tf32 values fits in float)."""
    d = c.clone()
    for i in range(a.shape[1]):
        d = d + a[:, i:i + 1].to(c.dtype) * b[i:i + 1, :].to(c.dtype)
    return d * torch.tensor(alpha, dtype=c.dtype)


def _run_wmma(emulator, kind, a, b, c, layout, alpha, convert=False):
    a_col, b_col, c_col, d_col = LAYOUTS[layout]
    rows, cols = c.shape
    d = torch.full((rows * cols,), float("nan"), dtype=c.dtype)
    emulator.emulation_wmma_gemm(kind, _buffer(a, a_col), _buffer(b, b_col), None if c is None else _buffer(c, c_col),
                                 d, a_col, b_col, c_col, d_col, alpha, convert)
    return _matrix(d, rows, cols, d_col)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", WMMA)
def test_wmma_gemm_matches_the_tensor_cores_arithmetic(emulator, kind, layout, order):
    emulator.configure_emulation(order=order)
    a, b, c = _wmma_problem(kind)
    got = _run_wmma(emulator, kind, a, b, c, layout, alpha=0.75)
    operands = (_tf32(a), _tf32(b)) if kind == "tf32" else (a, b)
    torch.testing.assert_close(got, _accumulate(*operands, c, 0.75), rtol=0, atol=0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", WMMA)
def test_wmma_fill_fragment_starts_an_accumulator(emulator, kind, order):
    emulator.configure_emulation(order=order)
    a, b, c = _wmma_problem(kind, seed=1)
    d = torch.full((c.numel(),), float("nan"), dtype=c.dtype)
    emulator.emulation_wmma_gemm(kind, _buffer(a, False), _buffer(b, True), None, d, False, True, False, False, 2.0,
                                 False)
    operands = (_tf32(a), _tf32(b)) if kind == "tf32" else (a, b)
    torch.testing.assert_close(d.view(c.shape), _accumulate(*operands, torch.zeros_like(c), 2.0), rtol=0, atol=0)


def test_wmma_tf32_operands_are_rounded_to_nearest_as_float_to_tf32(emulator):
    a, b, c = _wmma_problem("tf32", seed=2)
    converted = _run_wmma(emulator, "tf32", a, b, c, "row", alpha=1.0, convert=True)
    unconverted = _run_wmma(emulator, "tf32", a, b, c, "row", alpha=1.0, convert=False)
    torch.testing.assert_close(converted, _accumulate(_tf32(a), _tf32(b), c, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(unconverted, converted, rtol=0, atol=0)
    # the check can tell: truncated operands, or full float32 ones, give other results
    assert not torch.equal(converted, _accumulate(_truncated_tf32(a), _truncated_tf32(b), c, 1.0))
    assert not torch.equal(converted, _accumulate(a, b, c, 1.0))


def test_wmma_fragment_mapping_moves_with_the_warp_order(emulator):
    # lane l's x[i] = l * 8 + i, stored row-major: where each value lands is the fragment mapping.
    stored = {}
    for order in ORDERS:
        emulator.configure_emulation(order=order)
        out = torch.full((256,), float("nan"))
        emulator.emulation_selftest("wmma_mapping", out)
        assert torch.equal(out.sort().values, torch.arange(256.0)), "each element belongs to one lane and slot"
        stored[order] = out
    element = torch.arange(256)  # row-major index = slot * 32 + lane in forward order (csrc/emu/wmma.h)
    assert torch.equal(stored["forward"], ((element % 32) * 8 + element // 32).float())
    assert not torch.equal(stored["forward"], stored["reverse"])
    assert not torch.equal(stored["forward"], stored["random"])
    assert not torch.equal(stored["reverse"], stored["random"])


@pytest.mark.parametrize("variant,message", [
    (0, r"wmma::mma_sync \(selftest\.cu:\d+\) at block \(0,0,0\) warp 0 lane \d+: lane 16 has exited; every lane "
        r"of the warp must reach the same call"),
    (1, r"wmma::mma_sync \(selftest\.cu:\d+\) .*: lane \d+ waits at wmma::mma_sync \(selftest\.cu:\d+\); every lane"),
    (2, r"the warp has 16 threads, and a warp-collective matrix operation needs all 32"),
    (3, r"wmma::store_matrix_sync .*the pointer 0x[0-9a-f]+ is not 256-bit \(32-byte\) aligned"),
    (4, r"the leading dimension 18 is not a multiple of 16 bytes \(4 elements\)"),
    (5, r"lanes 0 and 16 pass different arguments"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_wmma_misuse_fails_the_launch(emulator, order, variant, message):
    emulator.configure_emulation(order=order)
    with pytest.raises(RuntimeError, match="wmma_misuse launch failed.*" + message):
        emulator.emulation_selftest("wmma_misuse", torch.zeros(1024), variant)


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = os.path.join(home, "bin", "nvcc")
    return found if os.path.exists(found) else shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="no nvcc")
def test_the_selftest_compiles_for_a_gpu_with_tensor_core_instructions(tmp_path):
    # The emulation's WMMA stands in for the toolkit's: the same source must build for sm_80 and sm_90,
    # its matrix operations on the tensor cores (HMMA for fp16/bf16/tf32, DMMA for fp64).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    obj = tmp_path / "selftest.o"
    build = subprocess.run([_nvcc(), "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
                            "arch=compute_90,code=sm_90", "-I", os.path.join(root, "csrc"), "-c",
                            os.path.join(root, "csrc", "emu", "selftest.cu"), "-o", str(obj)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-5000:]
    cuobjdump = os.path.join(os.path.dirname(_nvcc()), "cuobjdump")
    if not os.path.exists(cuobjdump):
        import triton

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
    for instruction in ("HMMA.16816.F32 ", "HMMA.16816.F32.BF16", "HMMA.1684.F32.TF32", "DMMA."):
        assert instruction in sass, f"no {instruction.strip()} in the selftest's SASS"


# ---- the CUDA kernels' launch geometry on a device with small grid limits ----------------------


@pytest.mark.parametrize("order", ORDERS)
def test_masked_conv_splits_grid_z_past_the_device_limit(emulator, order):
    # grid z holds (task, group[, pixel split]): 3 tasks x 2 groups (x splits) against a limit of 2.
    emulator.configure_emulation(order=order, max_grid_yz=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 9, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 2.0, 1.5, 0.0, 1.0]] * 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    kwargs = dict(padding=(1, 1), groups=2)
    with nf.use_backend("cuda"):
        out = nf.masked_conv2d(x, weight, mask, bias, **kwargs)
    expected = masked_conv2d_reference(x, weight, mask, bias, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, weight, mask, bias), upstream)
    want = torch.autograd.grad(expected, (x, weight, mask, bias), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_plastic_batch_past_the_grid_y_limit(emulator, order):
    # The step kernels (clip forces them) once put the batch on grid y: 5 sequences against a limit of 2.
    emulator.configure_emulation(order=order, max_grid_yz=2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (0.2 * torch.randn(16, 16, generator=gen, dtype=torch.float64)).requires_grad_()
    alpha = (0.2 * torch.randn(16, 16, generator=gen, dtype=torch.float64)).requires_grad_()
    eta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    with nf.use_backend("cuda"):
        out, hebb = nf.plastic_rnn(x, weight, alpha, eta, clip=0.5)
    want_out, want_hebb = plastic_rnn_reference(x, weight, alpha, eta, clip=0.5)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(hebb, want_hebb, atol=1e-10, rtol=1e-10)
    leaves = (x, weight, alpha, eta)
    got = torch.autograd.grad(out.sum() + hebb.sum(), leaves)
    want = torch.autograd.grad(want_out.sum() + want_hebb.sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_the_report_names_the_emulated_backend():
    env = {**__import__("os").environ, "NEURONML_FAST_CUDA_EMULATE": "1"}
    report = subprocess.run([sys.executable, "-m", "neuronml_fast"], capture_output=True, text=True, env=env,
                            check=True).stdout
    assert "cuda       available  (emulated (NEURONML_FAST_CUDA_EMULATE=1)" in report
