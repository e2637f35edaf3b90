"""`python -m bench.sass`: what the CUDA extension's kernels compile to, read from the built
``neuronml_fast/_C_cuda*.so`` without a GPU.

Per kernel and architecture: registers, static shared memory, stack frame and local memory (from
``cuobjdump --dump-resource-usage``), local-memory instructions, tensor-core instructions and
calls of the 64-bit integer division subroutines (from the SASS). The tools are the ``cuobjdump``
and ``nvdisasm`` that ship with triton (or the CUDA toolkit's): ``cuobjdump --dump-sass`` lists no
call targets, so the SASS is read through ``nvdisasm`` of each cubin ``cuobjdump`` extracts,
which names the subroutine each ``CALL`` enters (``$__internal_3_$__cuda_sm20_div_s64``).

* **spills**: ptxas puts a kernel's spilled registers in its stack frame, so a stack frame or a
  local-memory instruction (``STL``/``LDL``) means registers went to memory (or a local array did,
  as slow). For the kernels here ``ptxas -v`` reports spill stores exactly where there is a stack
  frame (its byte counts are per instruction: 24 B of spill stores into a 16 B frame).
* **tensor cores**: ``HMMA`` (fp16, bf16, tf32), ``HGMMA`` (sm_90 warpgroup), ``DMMA`` (fp64),
  ``IMMA``/``BMMA`` (integers), counted per opcode.
* **FMA**: ``FFMA``, ``DFMA`` and ``HFMA2`` (without ``HFMA2.MMA``, which moves constants into
  registers), the CUDA-core arithmetic a GEMM runs on without tensor cores.
* **64-bit division**: ``CALL``s of ``__cuda_sm20_{div,rem}_{s,u}64``, the software routines
  nvcc emits for a 64-bit ``/`` or ``%`` (a few dozen instructions each).

Shared memory is the static allocation as the cubin records it (on sm_90 it includes the 1 KiB
the system reserves per block); a kernel's dynamic shared memory is set at launch and not shown.
"""

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "neuronml_fast")

TENSOR_CORE_OPCODES = ("HMMA", "HGMMA", "DMMA", "IMMA", "BMMA")
DIVISION = re.compile(r"__cuda_sm\d+_(?:div|rem)_[su]64")
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")
_CALL_TARGET = re.compile(r"CALL\.[A-Z.]*\s+`?\(?(\$?[\w$.]+)\)?")


@dataclasses.dataclass
class Kernel:
    """One kernel of one cubin."""

    name: str  # mangled
    source: str  # the cubin's source file, without .cu
    arch: int
    registers: int = 0
    shared: int = 0
    stack: int = 0
    local: int = 0
    local_instructions: int = 0
    tensor_cores: dict = dataclasses.field(default_factory=dict)  # opcode -> count
    division_calls: int = 0
    fma: dict = dataclasses.field(default_factory=dict)  # FFMA, DFMA, HFMA2 -> count

    @property
    def spills(self):
        return self.stack > 0 or self.local > 0 or self.local_instructions > 0

    @property
    def short_name(self):
        return short_name(self.name)


# ---- tools and the extension ---------------------------------------------------------------------


def find_tool(name):
    """The path of cuobjdump / nvdisasm: triton's bundled copy, the CUDA toolkit's, or PATH's; None."""
    spec = importlib.util.find_spec("triton")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(p, "backends", "nvidia", "bin", name) for p in spec.submodule_search_locations]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    found = shutil.which(name)
    candidates += [found] if found else []
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_extension(package_dir=PACKAGE):
    """The built CUDA extension (``_C_cuda*.so``, not the emulated one), or None."""
    paths = [p for p in glob.glob(os.path.join(package_dir, "_C_cuda.*so")) if "emulated" not in os.path.basename(p)]
    return sorted(paths)[0] if paths else None


def _run(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout


# ---- parsing ---------------------------------------------------------------------------------------


def parse_resource_usage(text):
    """{mangled kernel: {REG, STACK, SHARED, LOCAL}} from ``cuobjdump --dump-resource-usage`` of one cubin."""
    usage, function = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Function ") and line.endswith(":"):
            function = line[len("Function "):-1]
        elif line.startswith("REG:") and function is not None:
            fields = dict(item.split(":", 1) for item in line.split())
            usage[function] = {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}
            function = None
    return usage


def parse_sass(text):
    """{kernel: {"opcodes": {opcode: count}, "calls": [callee, ...], "local": n}} from nvdisasm's
    listing of one cubin. The subroutines a kernel calls are emitted inside its section; their
    instructions count towards the kernel."""
    kernels, current = {}, None
    for line in text.splitlines():
        section = re.match(r"\s*\.section\s+\.text\.([^,\s]+)", line)
        if section:
            current = kernels.setdefault(section.group(1), {"opcodes": {}, "calls": [], "local": 0})
            continue
        if re.match(r"\s*\.section\s", line):  # another section (not .sectioninfo)
            current = None
            continue
        if current is None:
            continue
        match = _OPCODE.match(line)
        if not match:
            continue
        opcode = match.group(1)
        if opcode == "HFMA2" and (match.group(2) or "").startswith(".MMA"):
            opcode = "HFMA2.MMA"  # the compiler's idiom for a register move, not arithmetic
        current["opcodes"][opcode] = current["opcodes"].get(opcode, 0) + 1
        if opcode == "CALL":
            target = _CALL_TARGET.search(line)
            current["calls"].append(target.group(1) if target else "?")
        if opcode in ("STL", "LDL"):
            current["local"] += 1
    return kernels


def kernels_of(extension, cuobjdump=None, nvdisasm=None):
    """Every kernel of every cubin in the extension, sorted by source, kernel and architecture."""
    cuobjdump = cuobjdump or find_tool("cuobjdump")
    nvdisasm = nvdisasm or find_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        raise FileNotFoundError("cuobjdump and nvdisasm not found (pip install triton, or set CUDA_HOME)")
    result = []
    with tempfile.TemporaryDirectory() as tmp:
        # One file per cubin, <source>.sm_<arch>.cubin (<object>.<n>.sm_<arch>.cubin in an object file).
        subprocess.run([cuobjdump, "--extract-elf", "all", os.path.abspath(extension)], cwd=tmp, capture_output=True,
                       text=True, check=True, timeout=600)
        for cubin in sorted(glob.glob(os.path.join(tmp, "*.cubin"))):
            source, arch = re.fullmatch(r"(.+?)(?:\.\d+)?\.sm_(\d+)a?\.cubin", os.path.basename(cubin)).groups()
            usage = parse_resource_usage(_run(cuobjdump, "--dump-resource-usage", cubin))
            sass = parse_sass(_run(nvdisasm, cubin))
            for name, resources in usage.items():
                if name not in sass:
                    raise RuntimeError(f"{name}: in the resource usage of {os.path.basename(cubin)} but not in its SASS")
                code = sass[name]
                result.append(Kernel(
                    name=name, source=source, arch=int(arch), registers=resources["REG"], shared=resources["SHARED"],
                    stack=resources["STACK"], local=resources["LOCAL"], local_instructions=code["local"],
                    tensor_cores={op: n for op, n in sorted(code["opcodes"].items()) if op in TENSOR_CORE_OPCODES},
                    division_calls=sum(1 for callee in code["calls"] if DIVISION.search(callee)),
                    fma={op: n for op, n in sorted(code["opcodes"].items()) if op in ("FFMA", "DFMA", "HFMA2")},
                ))
    return sorted(result, key=lambda k: (k.source, k.short_name, k.arch))


# ---- names -------------------------------------------------------------------------------------------

_DEMANGLED = {}


def _demangle(names):
    missing = [n for n in names if n not in _DEMANGLED]
    filt = shutil.which("c++filt")
    if missing and filt:
        out = subprocess.run([filt], input="\n".join(missing), capture_output=True, text=True, timeout=60).stdout
        _DEMANGLED.update(zip(missing, out.splitlines()))
    return [_DEMANGLED.get(n, n) for n in names]


def short_name(mangled):
    """``conv_forward_kernel<float, float>``: the demangled name without namespaces and parameters
    (the mangled one where c++filt is missing)."""
    (name,) = _demangle([mangled])
    if name == mangled:
        return mangled
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    return re.sub(r"\b\w+::", "", name).replace("void ", "", 1).strip()


# ---- report ------------------------------------------------------------------------------------------


def _counts(counts):
    return ", ".join(f"{op} {n}" for op, n in counts.items()) or "-"


def table(kernels):
    head = ["source", "kernel", "arch", "regs", "shared B", "stack B", "local B", "STL/LDL", "tensor cores",
            "64-bit div calls", "FMA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kernels:
        cells = [k.source, f"`{k.short_name}`", f"sm_{k.arch}", k.registers, k.shared, k.stack, k.local,
                 k.local_instructions, _counts(k.tensor_cores), k.division_calls, _counts(k.fma)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def summary(kernels):
    names = {(k.source, k.short_name) for k in kernels}
    return {
        "kernels": len(names),
        "architectures": ", ".join(f"sm_{a}" for a in sorted({k.arch for k in kernels})),
        "kernels with tensor-core instructions": len({(k.source, k.short_name) for k in kernels if k.tensor_cores}),
        "kernels calling 64-bit division": len({(k.source, k.short_name) for k in kernels if k.division_calls}),
        "kernels that spill on some architecture": len({(k.source, k.short_name) for k in kernels if k.spills}),
    }


def markdown(kernels, extension):
    s = summary(kernels)
    return "\n".join([
        "# SASS of the CUDA extension",
        "",
        f"Every kernel of `{os.path.basename(extension)}`, per architecture, read back from its cubins "
        "(`python -m bench.sass`; see its docstring for what each column counts).",
        "",
        *[f"- {k}: {v}" for k, v in s.items()],
        "",
        "stack B, local B: the stack frame and local memory per thread (`cuobjdump --dump-resource-usage`; "
        "a stack frame here is ptxas's spill space). STL/LDL: local-memory instructions. tensor cores, FMA: "
        "instructions by opcode. 64-bit div calls: `CALL`s of `__cuda_sm20_{div,rem}_{s,u}64`.",
        "",
        table(kernels),
        "",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--extension", help="the CUDA extension (default: the built neuronml_fast/_C_cuda*.so)")
    p.add_argument("--out", help="also write the table as markdown to this file")
    args = p.parse_args(argv)
    extension = args.extension or find_extension()
    if extension is None:
        print("no built CUDA extension (neuronml_fast/_C_cuda*.so): build it with nvcc present (make setup)",
              file=sys.stderr)
        return 2
    kernels = kernels_of(extension)
    print(table(kernels))
    print()
    for key, value in summary(kernels).items():
        print(f"{key}: {value}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(markdown(kernels, extension))
    return 0


if __name__ == "__main__":
    sys.exit(main())
