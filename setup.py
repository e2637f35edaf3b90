"""Build script for neuronml_fast.

Two compiled extensions, both optional at install time but never silently broken:

* ``neuronml_fast._C_cpu``  - C++ CPU kernels (OpenMP).  Built whenever a C++ compiler exists.
* ``neuronml_fast._C_cuda`` - CUDA C++ kernels.  Built whenever nvcc and a CUDA build of torch
  exist, with no GPU needed (default arch list sm_80 + sm_90 when no GPU is visible).
* ``neuronml_fast._C_cuda_emulated`` - the same CUDA C++ kernels compiled as C++ against the
  CUDA emulation in csrc/emu; ``NEURONML_FAST_CUDA_EMULATE=1`` runs them on CPU tensors (tests).

Kernel sources (``csrc/cpu/*.cpp``, ``csrc/cuda/*.cu``) take raw pointers and sizes and never
include torch headers, so they compile in seconds; only the bindings (``csrc/cpu/bindings/*.cpp``,
one per op family, and ``csrc/cuda/bindings.cpp``) include ``torch/extension.h``.

Environment switches:
  NEURONML_FAST_CPU_EXT=0|1    skip / require the CPU extension (default: build if a compiler exists)
  NEURONML_FAST_CUDA_EXT=0|1   skip / require the CUDA extension (default: build if nvcc + CUDA torch)
  NEURONML_FAST_CUDA_EMULATED_EXT=0|1  skip / require the emulated CUDA extension (default: build)
  TORCH_CUDA_ARCH_LIST         GPU archs (default "8.0;9.0+PTX" when no GPU is visible: machine code
                               for A100 and H100/H200, and PTX that newer GPUs compile at load)
  NEURONML_FAST_MARCH          -march for the CPU kernels (default: none, the compiler's portable
                               baseline; the AVX2/FMA kernels are chosen at run time). "native"
                               tunes the whole extension for the build machine, which then must
                               be the machine that runs it
  MAX_JOBS                     parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _switch(name):
    """Tri-state environment switch: None (auto), True (require) or False (skip)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")


def _note(message):
    print(f"neuronml_fast setup: {message}", file=sys.stderr)


def _sources(folder, pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", folder, pattern)))


def _has_cxx_compiler():
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.isdir("/usr/local/cuda"):
        home = "/usr/local/cuda"
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


EMULATED_SOURCES = os.path.join("build", "cuda_emulated")


def _emulated_cuda_extension(cpp_extension):
    """The CUDA kernels compiled as C++ against the emulation in csrc/emu: with
    NEURONML_FAST_CUDA_EMULATE=1 the ``cuda`` backend runs them on CPU tensors (for testing)."""
    sys.path.insert(0, os.path.join(ROOT, "csrc", "emu"))
    from translate import translate_file

    sources = []
    for cu in _sources("cuda", "*.cu") + _sources("emu", "*.cu"):  # the kernels and the emulator's own
        translated = os.path.join(EMULATED_SOURCES, os.path.basename(cu)[: -len(".cu")] + ".cpp")
        translate_file(os.path.join(ROOT, cu), os.path.join(ROOT, translated))
        sources.append(translated)
    bindings = os.path.join(EMULATED_SOURCES, "bindings.cpp")
    text = '// The CUDA bindings, built against the emulation (setup.py writes this file).\n#include "cuda/bindings.cpp"\n'
    if not os.path.exists(os.path.join(ROOT, bindings)) or open(os.path.join(ROOT, bindings)).read() != text:
        with open(os.path.join(ROOT, bindings), "w") as f:
            f.write(text)
    return cpp_extension.CppExtension(
        "neuronml_fast._C_cuda_emulated",
        sources=sources + [bindings] + _sources("emu", "*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc", "emu", "include"), os.path.join(ROOT, "csrc")],
        define_macros=[("NEURONML_FAST_CUDA_EMULATION", None)],
        # The kernels' `#pragma unroll` and unsigned thread indices are CUDA idiom, not defects here.
        extra_compile_args={"cxx": ["-O2", "-Wno-unknown-pragmas", "-Wno-sign-compare"]},
    )


EXTENSION_SWITCHES = ("NEURONML_FAST_CPU_EXT", "NEURONML_FAST_CUDA_EXT", "NEURONML_FAST_CUDA_EMULATED_EXT")


def _nvcc_release(cuda_home):
    """nvcc's CUDA release as "major.minor", or None when it cannot be read."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _cuda_major_mismatch(torch, cuda_home):
    """Why nvcc cannot build for this torch (another CUDA major version), or None."""
    release = _nvcc_release(cuda_home)
    if release is None or release.split(".")[0] == torch.version.cuda.split(".")[0]:
        return None
    return f"nvcc is CUDA {release} but torch was built with CUDA {torch.version.cuda} (set CUDA_HOME to a matching toolkit)"


def _extensions():
    want_cpu, want_cuda, want_emulated = (_switch(name) for name in EXTENSION_SWITCHES)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if want_cpu is False and want_cuda is False and want_emulated is False:
            _note("all extensions switched off: installing the pure-Python package (reference + Triton backends)")
            return [], {}
        # pip's default isolated build has no torch: installing without the extensions would
        # silently replace a working compiled install by a reference-only one.
        raise SystemExit(
            "neuronml_fast setup: torch is not importable in the build environment, so the C++/CUDA "
            "extensions cannot be built against the torch that will run them. Install torch first, then "
            "build with `pip install --no-build-isolation .` (or set " + "=0 ".join(EXTENSION_SWITCHES)
            + "=0 for a reference/Triton-only install).")

    if not _has_cxx_compiler():
        if want_cpu or want_cuda or want_emulated:
            raise SystemExit("neuronml_fast setup: a compiled extension was required but no C++ compiler was found")
        _note("no C++ compiler found: installing without compiled extensions "
              "(the reference and Triton backends still work; `python -m neuronml_fast` shows this).")
        return [], {}

    extensions = []
    openmp = ["-fopenmp"]
    # A built wheel runs on other machines under a generic platform tag: compile for the
    # architecture's baseline; the AVX2/FMA kernels carry their own target and are chosen at run
    # time (csrc/cpu/isa.h).
    march = os.environ.get("NEURONML_FAST_MARCH", "").strip()
    cxx_flags = ["-O3", *([f"-march={march}"] if march else []), *openmp]
    if want_cpu is not False:
        extensions.append(cpp_extension.CppExtension(
            "neuronml_fast._C_cpu",
            sources=_sources("cpu", "*.cpp") + _sources(os.path.join("cpu", "bindings"), "*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        ))
    else:
        _note("NEURONML_FAST_CPU_EXT=0: skipping the C++ CPU extension")

    if want_emulated is not False:
        extensions.append(_emulated_cuda_extension(cpp_extension))
    else:
        _note("NEURONML_FAST_CUDA_EMULATED_EXT=0: skipping the emulated CUDA extension")

    cuda_home = _find_cuda_home()
    if want_cuda is False:
        _note("NEURONML_FAST_CUDA_EXT=0: skipping the CUDA extension")
    elif torch.version.cuda is None or cuda_home is None or _cuda_major_mismatch(torch, cuda_home):
        reason = ("torch is a CPU-only build" if torch.version.cuda is None
                  else "nvcc not found (set CUDA_HOME)" if cuda_home is None
                  else _cuda_major_mismatch(torch, cuda_home))
        if want_cuda:
            raise SystemExit(f"neuronml_fast setup: NEURONML_FAST_CUDA_EXT=1 but {reason}")
        _note(f"skipping the CUDA extension: {reason}")
    else:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch resolved it at import time, possibly wrongly
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        extensions.append(cpp_extension.CUDAExtension(
            "neuronml_fast._C_cuda",
            sources=_sources("cuda", "*.cpp") + _sources("cuda", "*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            # A host-side slip the kernels' tests cannot see here (they run in the emulation, whose
            # bindings differ in a few lines) fails the build instead: an infinite recursion.
            extra_compile_args={"cxx": ["-O3", "-Werror=infinite-recursion"],
                                "nvcc": ["-O3", "-lineinfo"]},
        ))
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildAndRecord(build_ext):
        def run(self):
            _write_build_info(self.extensions)
            super().run()

    return extensions, {"build_ext": BuildAndRecord}


def _write_build_info(ext_modules):
    """neuronml_fast/_build_info.py: the torch the extensions are compiled against, for
    `python -m neuronml_fast` (an extension built against another torch does not load)."""
    try:
        import torch
    except ImportError:
        torch = None
    info = {"torch": torch.__version__ if torch else None, "torch_cuda": torch.version.cuda if torch else None,
            "extensions": sorted(e.name.rsplit(".", 1)[1] for e in ext_modules),
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST"), "march": os.environ.get("NEURONML_FAST_MARCH", "").strip() or "baseline"}
    text = '"""Written by setup.py at build time."""\n\nBUILD = ' + repr(info) + "\n"
    path = os.path.join(ROOT, "neuronml_fast", "_build_info.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


ext_modules, cmdclass = _extensions()

def _version():
    """The one place the version is written: neuronml_fast/__init__.py."""
    with open(os.path.join(ROOT, "neuronml_fast", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="neuronml_fast",
    version=_version(),
    description="Fused Triton and CUDA C++ kernels for brain-inspired meta-learning (NeuronML, differentiable plasticity)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",  # an SPDX expression (PEP 639); no license classifier beside it
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=["neuronml_fast", "neuronml_fast.ops", "neuronml_fast.ops.masked", "neuronml_fast.ops.plastic",
              "neuronml_fast.ops.sensitivity", "neuronml_fast.ops.batch_norm", "neuronml_fast.nn", "neuronml_fast.cpu",
              "neuronml_fast.meta", "neuronml_fast.kernels"],
    # The Triton kernels live in the top-level kernels/ folder but ship as neuronml_fast.kernels.
    package_dir={"neuronml_fast": "neuronml_fast", "neuronml_fast.kernels": "kernels"},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        # higher, torchopt, torchvision: the research workflows of tests/test_drop_in_workflows.py.
        "test": ["pytest", "hypothesis", "expecttest", "higher", "torchopt", "torchvision"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "meta": ["pillow", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
