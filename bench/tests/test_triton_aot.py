"""The Triton AOT check (bench/triton_aot.py): what a GPU launch of each kernel would compile, compiled
for sm_80 and sm_90 without a GPU. The `aot` tests compile (ptxas, minutes on 2 cores for the full
default list): deselect them with `-m "not aot"`."""

import json
import os
import subprocess
import sys

import pytest

from bench import triton_aot

from neuronml_fast.ops._triton_launch import MAX_GRID

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tensors of the plastic kernels that grow with steps or sequences: their addresses need 64 bits.
PLASTIC_LARGE = {
    "_forward_resident_kernel": {"x_ptr", "drive_ptr", "y0_ptr", "mod_ptr", "hebb_ptr", "trace_ptr", "out_ptr",
                                 "ckpt_ptr", "activity_ptr", "narrow_ptr"},
    "_forward_kernel": {"x_ptr", "drive_ptr", "y0_ptr", "mod_ptr", "hebb_ptr", "trace_ptr", "out_ptr", "ckpt_ptr",
                        "activity_ptr", "narrow_ptr"},
    "_backward_kernel": {"x_ptr", "y0_ptr", "out_ptr", "gout_ptr", "mod_ptr", "activity_ptr", "ckpt_ptr", "final_ptr",
                         "ghebb_ptr", "h_ptr", "seg_ptr", "g_ptr", "gz_ptr", "gpre_ptr", "gmod_ptr", "dm_ptr",
                         "galpha_ptr", "geta_ptr", "gmw_ptr", "gmb_ptr", "gfanout_ptr", "gz_out_ptr", "gpre_out_ptr"},
    # the weight gradient's (t, b) rows; alpha's partial sums are walked by 64-bit pointer increments
    "_reduce_kernel": {"x_ptr", "y0_ptr", "out_ptr", "gz_ptr"},
}


def _aot(*args, timeout=900):
    """Runs `python -m bench.triton_aot` in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench.triton_aot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _report(tmp_path, *args):
    run = _aot("--report-dir", str(tmp_path), *args)
    report_file = tmp_path / "triton-aot.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    return run, report


# ---- capture (no compile) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def captured():
    run = _aot("--list", "--cases", "conv-f16-k7", "rnn-f32-large-hebb", "sensitivity-f32-conv", timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _specs_of(captured, kernel):
    return [s for s in captured["specs"].values() if s["kernel"].endswith(":" + kernel)]


def test_capture_records_what_the_launchers_launch(captured):
    kernels = {s["kernel"].split(":")[1] for s in captured["specs"].values()}
    assert kernels == {"_conv_forward_kernel", "_conv_input_grad_kernel", "_conv_weight_grad_kernel",
                       "_forward_kernel", "_backward_kernel", "_reduce_kernel", "_neuron_sensitivity_kernel"}
    (grad,) = _specs_of(captured, "_conv_input_grad_kernel")
    assert grad["dtype"] == "fp16" and grad["signature"]["go_ptr"] == "*fp16"
    assert grad["constexprs"]["KH"] == grad["constexprs"]["KW"] == 7
    assert grad["constexprs"]["ACC"] == {"dtype": "fp32"} and grad["constexprs"]["USE_DOT"] is True
    assert grad["attrs"]["go_ptr"] == [["tt.divisibility", 16]]  # what a GPU launch specializes on
    assert grad["options"]["num_warps"] == 8
    for name, grid, _ in captured["launches"]:
        assert all(size <= limit for size, limit in zip(grid, MAX_GRID)), (name, grid)


def test_plastic_kernels_compile_once_for_every_length(captured):
    # The time loop runs inside the kernels: T is an argument, not a specialization.
    for kernel in ("_forward_kernel", "_backward_kernel"):
        (spec,) = _specs_of(captured, kernel)
        assert spec["signature"]["T"] == "i32" and "T" not in spec["constexprs"]


def test_pointer_offset_widths_from_ttir():
    ttir = """
  tt.func public @k(%a_ptr: !tt.ptr<f32> loc("a"), %b_ptr: !tt.ptr<f32> loc("b"), %c_ptr: !tt.ptr<f32>, %n: i32) {
    %0 = tt.addptr %a_ptr, %n : !tt.ptr<f32>, i32 loc(#loc1)
    %big = arith.extsi %n : i32 to i64 loc(#loc2)
    %1 = tt.addptr %b_ptr, %big : !tt.ptr<f32>, i64 loc(#loc3)
    %2 = tt.splat %1 : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>> loc(#loc4)
    %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32> loc(#loc5)
    %3 = tt.addptr %2, %r : tensor<16x!tt.ptr<f32>>, tensor<16xi32> loc(#loc6)
    %4 = tt.splat %c_ptr : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>> loc(#loc7)
    %5 = tt.addptr %4, %r : tensor<16x!tt.ptr<f32>>, tensor<16xi32> loc(#loc8)
"""
    # a: 32-bit; b: a 64-bit base, then a 32-bit offset within it; c: 32-bit through a splat.
    assert triton_aot.pointer_offset_widths(ttir) == {"a_ptr": "i32", "b_ptr": "i64", "c_ptr": "i32"}


def test_report_failures_and_tensor_core_detection():
    ok = {"ok": True, "arch": 80, "shared": triton_aot.SHARED_LIMIT[80]}
    assert triton_aot.failures_of(ok) == []
    assert "over the sm_80 per-block limit" in triton_aot.failures_of({**ok, "shared": ok["shared"] + 1})[0]
    assert triton_aot.failures_of({"ok": False, "error": "compile exceeded 120 s"}) == ["compile exceeded 120 s"]
    assert triton_aot.tensor_core_instructions("wgmma.mma_async.sync.aligned.m64n64k16") == ["wgmma"]
    assert triton_aot.tensor_core_instructions("mma.sync.aligned.m16n8k16.row.col") == ["mma"]
    assert triton_aot.tensor_core_instructions("fma.rn.f32") == []


def test_masked_gemm_variants_fail_without_tensor_cores_or_with_spills():
    row = {"ok": True, "arch": 90, "shared": 1024, "spill_bytes": 0, "tensor_cores": [], "dots": 1}
    gemm = dict(row, kernel="_conv_forward_kernel")
    for dtype, constexprs in (("fp16", "DOT_PRECISION=ieee"), ("bf16", "DOT_PRECISION=ieee"),
                              ("fp32", "KH=3 DOT_PRECISION=tf32")):
        failures = triton_aot.failures_of(dict(gemm, dtype=dtype, constexprs=constexprs))
        assert failures == ["a GEMM without tensor-core instructions (no mma/wgmma in the PTX)"], dtype
        assert triton_aot.failures_of(dict(gemm, dtype=dtype, constexprs=constexprs, tensor_cores=["mma"])) == []
    # float64 has no Triton tensor-core dot; exact float32 (torch's TF32 switch off) is FMA by design
    assert triton_aot.failures_of(dict(gemm, dtype="fp64", constexprs="")) == []
    assert triton_aot.failures_of(dict(gemm, dtype="fp32", constexprs="KH=3 DOT_PRECISION=ieee")) == []
    assert triton_aot.failures_of(dict(gemm, dtype="fp64", constexprs="", spill_bytes=8)) == [
        "a GEMM that spills 8 B per thread"]
    # other kernels are not GEMMs held to tensor cores, but no kernel may spill
    other = dict(row, kernel="_forward_resident_kernel", dtype="fp32", constexprs="")
    assert triton_aot.failures_of(other) == []
    assert triton_aot.failures_of(dict(other, spill_bytes=60)) == ["a kernel that spills 60 B per thread"]


def test_float32_conv_cases_capture_tf32_and_their_ieee_twins():
    run = _aot("--list", "--cases", "conv-f32-k3", "linear-f32", timeout=300)
    assert run.returncode == 0, run.stderr
    captured = json.loads(run.stdout)
    precision = {}
    for case, ids in captured["cases"].items():
        for spec_id in ids:
            spec = captured["specs"][spec_id]
            if spec["kernel"].split(":")[1] in triton_aot.GEMM_KERNELS:
                precision.setdefault(case, set()).add(spec["constexprs"]["DOT_PRECISION"])
    assert precision["conv-f32-k3"] == precision["linear-f32"] == {"tf32"}
    assert precision["conv-f32-k3-ieee"] == precision["linear-f32-ieee"] == {"ieee"}


# ---- compiles (ptxas) ---------------------------------------------------------------------------


@pytest.mark.aot
def test_default_aot_check_passes(tmp_path):
    run, report = _report(tmp_path)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert report["summary"]["failures"] == 0
    assert report["summary"]["dot_kernels_without_tensor_cores"] == 0
    spilling = {(r["kernel"], r["constexprs"], r["arch"]) for r in report["results"] if r.get("spill_bytes")}
    assert not spilling, spilling


@pytest.mark.aot
def test_seven_by_seven_conv_compiles_within_the_bound(tmp_path):
    # 49 unrolled taps keep the software pipeliner busy for minutes (over 300 s): the kernels must
    # loop over the taps at run time.
    run, report = _report(tmp_path, "--cases", "k7", "--only", "conv", "--timeout", "120")
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    rows = [r for r in report["results"] if "KH=7 KW=7" in r["constexprs"]]
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in rows} >= {
        ("_conv_input_grad_kernel", dtype, arch) for dtype in ("fp16", "bf16", "fp32", "fp64") for arch in (80, 90)}
    assert all(r["ok"] and not r["failures"] for r in rows)


@pytest.mark.aot
def test_plastic_address_arithmetic_is_64_bit_across_steps_and_sequences(tmp_path):
    run, report = _report(tmp_path, "--cases", "rnn-f32", "linear-plastic-f32", "rnn-bf16-small-hebb",
                          "linear-plastic-bf16-small", "--only", "plastic", "--arch", "90")
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    seen = set()
    for row in report["results"]:
        narrow = set(row["pointers_32bit"])
        assert not narrow & PLASTIC_LARGE[row["kernel"]], (row["kernel"], row["constexprs"], narrow)
        seen.add(row["kernel"])
    assert seen == set(PLASTIC_LARGE)


def test_batch_norm_double_backward_launches_its_two_kernels():
    run = _aot("--list", "--full", "--cases", "batch-norm", timeout=300)
    assert run.returncode == 0, run.stderr
    captured = json.loads(run.stdout)
    launched = [name for name, _, _ in captured["launches"]]
    assert launched == ["_bn_rows_sums_kernel", "_bn_rows_grads_kernel"] * 4  # f32, f32 without u, f64, f64 without u
    has_u = {(s["kernel"].split(":")[1], s["dtype"], s["constexprs"]["HAS_U"]) for s in captured["specs"].values()}
    assert has_u == {(k, d, u) for k in ("_bn_rows_sums_kernel", "_bn_rows_grads_kernel") for d in ("fp32", "fp64")
                     for u in (True, False)}


@pytest.mark.aot
def test_batch_norm_kernels_compile_without_spills(tmp_path):
    run, report = _report(tmp_path, "--cases", "batch-norm", "--full")
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    rows = report["results"]
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in rows} == {
        (k, d, a) for k in ("_bn_rows_sums_kernel", "_bn_rows_grads_kernel") for d in ("fp32", "fp64") for a in (80, 90)}
    assert all(r["ok"] and not r["failures"] and r["spill_bytes"] == 0 for r in rows), rows
