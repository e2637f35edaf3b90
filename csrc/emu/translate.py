"""Translate a CUDA C++ source into C++ for the CUDA emulation (csrc/emu/cuda_emu.h).

Three constructs have no C++ spelling, so they are rewritten textually; everything else compiles
unchanged against the emulation's headers:

* ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` -> ``::nf_emu::Launcher(kernel, grid, block,
  smem, stream)(args)``;
* ``__shared__ [__align__(n)] T a[N][M], b[K];`` -> references into the block's shared-memory
  arena (aligned as declared, to at least 16 bytes), so that every thread of a block sees one
  copy, poisoned at the block's start;
* ``extern __shared__ T name[];`` -> a pointer to the launch's dynamic shared memory.

Usage: ``python translate.py SRC.cu OUT.cpp`` (the build runs it through `translate_file`).
"""

import os
import re
import sys

_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:\s*<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?)\s*<<<(?P<config>.*?)>>>\s*\(",
                     re.S)
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?(?P<type>[\w:<>\s\*]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\s*\(\s*(?P<align>\d+)\s*\)\s*)?(?P<type>[\w:<>]+(?:\s+[\w:<>]+)*?)\s+"
                            r"(?P<declarators>\w+\s*(?:\[[^\];]+\]\s*)*(?:,\s*\w+\s*(?:\[[^\];]+\]\s*)*)*);")
_DECLARATOR = re.compile(r"(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\]\s*)*)")


def _split_top_level(text, separator=","):
    """Split on separators outside brackets, parentheses and angle brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        elif ch == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _launch(match):
    config = _split_top_level(match.group("config"))
    if not 2 <= len(config) <= 4:
        raise ValueError(f"kernel launch: expected 2 to 4 launch parameters, got {match.group('config')!r}")
    return f"::nf_emu::Launcher({match.group('kernel').strip()}, {', '.join(config)})("


def _dynamic_shared(match):
    element = " ".join(match.group("type").split())
    return f"{element}* {match.group('name')} = ::nf_emu::dynamic_shared<{element}>();"


def _static_shared(match):
    element = " ".join(match.group("type").split())
    declarations = []
    for declarator in _split_top_level(match.group("declarators")):
        d = _DECLARATOR.fullmatch(declarator)
        if d is None:
            raise ValueError(f"__shared__ declaration: cannot translate {declarator!r}")
        dims = "".join(d.group("dims").split())
        align = f", {match.group('align')}" if match.group("align") else ""
        declarations.append(f"auto& {d.group('name')} = ::nf_emu::static_shared<{element}{dims}{align}>();")
    return " ".join(declarations)


def translate(source):
    """The emulation's C++ for one CUDA source text."""
    text = _DYNAMIC_SHARED.sub(_dynamic_shared, source)
    text = _STATIC_SHARED.sub(_static_shared, text)
    return _LAUNCH.sub(_launch, text)


def translate_file(src, dst):
    """Write the translation of ``src`` to ``dst`` (only when it changed, so builds stay incremental)."""
    with open(src) as f:
        header = f'// Generated from {os.path.basename(src)} by csrc/emu/translate.py for the CUDA emulation.\n'
        text = header + '#include "emu/cuda_emu.h"\n#line 1 "' + src + '"\n' + translate(f.read())
    if os.path.exists(dst):
        with open(dst) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with open(dst, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python translate.py SRC.cu OUT.cpp")
    translate_file(sys.argv[1], sys.argv[2])
