"""What the CUDA extension's kernels compile to (bench/sass.py), read from the built
``neuronml_fast/_C_cuda*.so``; nothing is compiled here. The checks of the SASS skip where the
extension is not built (no nvcc at build time) or no cuobjdump/nvdisasm is found.

The GEMM kernels are the masked convolution's forward, input gradient and weight gradient. Each is
compiled per dtype and multiply (its second template argument): Hmma (float16, bfloat16), Tf32
and Ffma (float32 under torch's TF32 switch on and off), Dmma (float64). All but the exact
float32 one run on the tensor cores."""

import pytest

from bench import sass

GEMM_ROLES = {"forward": "conv_forward", "input gradient": "conv_input_grad", "weight gradient": "conv_weight_grad"}
# The exact float32 GEMMs (torch's TF32 switch off): CUDA-core FMA by design.
EXACT_FP32 = "<float, Ffma"


# ---- parsing, on excerpts of the tools' output ---------------------------------------------------

RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z4gemmPf:
  REG:64 STACK:16 SHARED:8704 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z4copyPf:
  REG:30 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

NVDISASM = """
	.section	.text._Z4gemmPf,"ax",@progbits
	.sectioninfo	@"SHI_REGISTERS=64"
_Z4gemmPf:
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/               @P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   DMMA.884 R4, R8, R12, R4 ;
        /*0040*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0050*/                   CALL.REL.NOINC `($__internal_1_$__cuda_sm20_rem_u64) ;
        /*0060*/               @P1 CALL.REL.NOINC `(.L_x_19) ;
        /*0070*/                   CALL.REL.NOINC `($__internal_2_$__cuda_sm70_shflsync_bfly_p) ;
        /*0080*/                   STL [R1], R7 ;
        /*0090*/                   LDL R7, [R1] ;
        /*00a0*/                   FFMA R2, R3, R4, R2 ;
        /*00b0*/                   HFMA2.MMA R6, -RZ, RZ, 0, 0 ;
        .type           $__internal_0_$__cuda_sm20_div_s64,@function
$__internal_0_$__cuda_sm20_div_s64:
        /*00c0*/                   I2F.U64.RP R5, R4 ;
	.section	.text._Z4copyPf,"ax",@progbits
_Z4copyPf:
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0010*/                   STG.E desc[UR4][R4.64], R2 ;
	.section	.nv.constant0._Z4copyPf,"a",@progbits
        /*0000*/ 	.zero		560
"""


def test_resource_usage_is_read_per_kernel():
    usage = sass.parse_resource_usage(RESOURCE_USAGE)
    assert usage == {"_Z4gemmPf": {"REG": 64, "STACK": 16, "SHARED": 8704, "LOCAL": 0},
                     "_Z4copyPf": {"REG": 30, "STACK": 0, "SHARED": 0, "LOCAL": 0}}


def test_sass_counts_tensor_cores_division_calls_and_local_memory_per_kernel():
    code = sass.parse_sass(NVDISASM)
    assert set(code) == {"_Z4gemmPf", "_Z4copyPf"}
    gemm = code["_Z4gemmPf"]
    assert gemm["opcodes"]["HMMA"] == 2 and gemm["opcodes"]["DMMA"] == 1
    assert gemm["opcodes"]["FFMA"] == 1 and "HFMA2" not in gemm["opcodes"]  # HFMA2.MMA is a move
    assert gemm["opcodes"]["I2F"] == 1  # the subroutine's instructions count towards its kernel
    assert gemm["local"] == 2
    divisions = [c for c in gemm["calls"] if sass.DIVISION.search(c)]
    assert divisions == ["$__internal_0_$__cuda_sm20_div_s64", "$__internal_1_$__cuda_sm20_rem_u64"]
    assert code["_Z4copyPf"] == {"opcodes": {"LDG": 1, "STG": 1}, "calls": [], "local": 0}


def test_a_kernel_spills_with_a_stack_frame_or_local_memory_instructions():
    assert not sass.Kernel("k", "s", 90).spills
    assert sass.Kernel("k", "s", 90, stack=8).spills
    assert sass.Kernel("k", "s", 90, local_instructions=1).spills


# ---- the built extension -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extension():
    path = sass.find_extension()
    if path is None:
        pytest.skip("the CUDA extension is not built here (neuronml_fast/_C_cuda*.so)")
    if sass.find_tool("cuobjdump") is None or sass.find_tool("nvdisasm") is None:
        pytest.skip("no cuobjdump/nvdisasm (they ship with triton)")
    return path


@pytest.fixture(scope="module")
def kernels(extension):
    return sass.kernels_of(extension)


def _gemm_kernels(kernels, role):
    found = [k for k in kernels if k.source == "masked" and GEMM_ROLES[role] in k.short_name]
    assert found, f"no masked {role} kernel in the extension"
    return found


def test_every_kernel_is_read_with_its_resources(kernels):
    assert {k.source for k in kernels} >= {"masked", "plastic", "sensitivity"}
    archs = {k.arch for k in kernels}
    for name in {(k.source, k.short_name) for k in kernels}:
        assert {k.arch for k in kernels if (k.source, k.short_name) == name} == archs, name
    assert all(k.registers > 0 for k in kernels)
    # every GEMM kernel does its arithmetic somewhere: FMA or tensor cores
    for role in GEMM_ROLES:
        assert all(k.fma or k.tensor_cores for k in _gemm_kernels(kernels, role))


@pytest.mark.parametrize("role", GEMM_ROLES)
def test_gemm_kernels_run_on_tensor_cores(kernels, role):
    gemm = _gemm_kernels(kernels, role)
    without = [f"{k.short_name} sm_{k.arch}" for k in gemm if not k.tensor_cores and EXACT_FP32 not in k.short_name]
    assert not without, f"GEMM kernels without HMMA/HGMMA/DMMA: {without}"
    # every dtype has its kernels, the float32 ones on TF32 and exact
    names = {k.short_name for k in gemm}
    for dtype in ("__half, Hmma", "__nv_bfloat16, Hmma", "float, Tf32", "float, Ffma", "double, Dmma"):
        assert any(f"<{dtype}" in name for name in names), (dtype, names)
    exact = [k for k in gemm if EXACT_FP32 in k.short_name]
    assert all(k.fma.get("FFMA") and not k.tensor_cores for k in exact), exact


@pytest.mark.parametrize("role", GEMM_ROLES)
def test_gemm_kernels_call_no_64_bit_division(kernels, role):
    calling = [f"{k.short_name} sm_{k.arch}: {k.division_calls}" for k in _gemm_kernels(kernels, role)
               if k.division_calls]
    assert not calling, f"GEMM kernels calling 64-bit division subroutines: {calling}"


def test_plastic_kernels_are_compiled_for_every_dtype_with_its_accumulation_type(kernels):
    # float16 and bfloat16 with float accumulation beside float and double (the trace and every sum
    # in float32 for 16-bit inputs).
    names = {k.short_name for k in kernels if k.source == "plastic"}
    for kernel in ("forward_kernel", "backward_kernel", "reduce_kernel"):
        for types in ("float, float", "double, double", "__half, float", "__nv_bfloat16, float"):
            assert f"{kernel}<{types}>" in names, (kernel, types, sorted(names))


@pytest.mark.parametrize("source", ["masked", "plastic", "sensitivity"])
def test_no_kernel_spills(kernels, source):
    of_source = [k for k in kernels if k.source == source]
    assert of_source, f"no kernel compiled from {source}.cu"
    spilling = [f"{k.short_name} sm_{k.arch}: {k.stack} B stack, {k.local_instructions} STL/LDL"
                for k in of_source if k.spills]
    assert not spilling, f"kernels that spill: {spilling}"


def test_the_report_is_a_markdown_table_of_every_kernel(kernels, extension, tmp_path, monkeypatch):
    monkeypatch.setattr(sass, "kernels_of", lambda path: kernels)
    out = tmp_path / "sass.md"
    assert sass.main(["--extension", extension, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# SASS of the CUDA extension")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(kernels)
