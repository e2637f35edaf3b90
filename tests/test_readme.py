"""The README is a user's first hour: its examples must run and its commands and links must exist.

* every ```python block of README.md runs verbatim, each in a fresh interpreter, as a user would
  run it (without the test suite's interpreter/emulation switches);
* every `make TARGET` in a ```bash block names a target of the Makefile, and every
  `python -m MODULE` names an importable module;
* every relative link of README.md, CHANGELOG.md and docs/*.md points to an existing file (and,
  for a `#fragment` into a Markdown file, to one of its headings);
* the user documents do not narrate development history (dates, sessions);
* the README's table of the dtypes each backend's kernels take is the registry's
  (neuronml_fast/backends.py, KERNELS).
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README, os.path.join(ROOT, "CHANGELOG.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK_TIMEOUT_S = 300
# Switches the test suite sets for itself (tests/conftest.py); a user's shell does not have them.
TEST_ONLY_ENV = ("TRITON_INTERPRET", "NEURONML_FAST_CUDA_EMULATE", "NEURONML_FAST_BACKEND")
HISTORY = re.compile(r"this session|earlier session|previous session|no GPU lent|(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]",
                     re.IGNORECASE)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _blocks(text, language):
    """(label, code) of every fenced block of the given language; the label names the block's
    line in the file and its first line of code."""
    pattern = re.compile(r"^```" + re.escape(language) + r"[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
    out = []
    for match in pattern.finditer(text):
        code = match.group(1)
        first = next((line.strip() for line in code.splitlines() if line.strip()), "")
        line = text.count("\n", 0, match.start(1)) + 1
        out.append((f"line {line}: {first!r}", code))
    return out


PYTHON_BLOCKS = _blocks(_read(README), "python")
BASH_BLOCKS = _blocks(_read(README), "bash")


def test_the_readme_has_python_and_bash_examples():
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    assert BASH_BLOCKS, "README.md has no ```bash block"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    label, code = PYTHON_BLOCKS[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    try:
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md python block at {label} ran past {BLOCK_TIMEOUT_S} s")
    assert run.returncode == 0, (f"README.md python block at {label} failed with exit code "
                                 f"{run.returncode}:\n{run.stderr[-4000:]}")


def _commands(code):
    """The shell commands of a block: continuation lines joined, comments dropped."""
    code = code.replace("\\\n", " ")
    for line in code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def _make_targets():
    text = _read(os.path.join(ROOT, "Makefile"))
    targets = set()
    for match in re.finditer(r"^([A-Za-z0-9_.\- ]+):(?!=)", text, re.MULTILINE):
        targets.update(match.group(1).split())
    return targets


def test_readme_make_targets_exist():
    targets = _make_targets()
    named = set()
    for _, code in BASH_BLOCKS:
        for command in _commands(code):
            words = command.split()
            for i, word in enumerate(words):
                if word == "make":
                    rest = [w for w in words[i + 1:] if "=" not in w and not w.startswith("-")]
                    named.update(rest[:1] or ["<default>"])
    assert named, "no `make` command in the README's bash blocks"
    missing = sorted(t for t in named if t not in targets and t != "<default>")
    assert not missing, f"README names make targets the Makefile lacks: {missing} (targets: {sorted(targets)})"


def test_readme_python_modules_exist():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    named = set()
    for _, code in BASH_BLOCKS:
        for command in _commands(code):
            named.update(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", command))
    assert named, "no `python -m` command in the README's bash blocks"
    missing = sorted(m for m in named if importlib.util.find_spec(m) is None)
    assert not missing, f"README runs modules that cannot be imported: {missing}"


def _slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path):
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _read(path), re.MULTILINE)}


def _links(text):
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # no links inside code blocks
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_to_existing_files(doc):
    assert os.path.exists(doc), f"{os.path.relpath(doc, ROOT)} is missing"
    broken = []
    for link in _links(_read(doc)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE):
            continue  # http:, https:, mailto:
        target, _, fragment = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
        if not os.path.exists(path):
            broken.append(f"{link} (no {os.path.relpath(path, ROOT)})")
        elif fragment and path.endswith(".md") and fragment not in _anchors(path):
            broken.append(f"{link} (no heading #{fragment})")
    assert not broken, f"broken links in {os.path.relpath(doc, ROOT)}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_user_documents_do_not_narrate_history(doc):
    hits = [f"{n}: {line.strip()[:100]}" for n, line in enumerate(_read(doc).splitlines(), 1) if HISTORY.search(line)]
    assert not hits, f"{os.path.relpath(doc, ROOT)} speaks of dates or sessions: {hits}"


def test_citation_file_matches_the_package_version():
    import neuronml_fast

    text = _read(os.path.join(ROOT, "CITATION.cff"))
    assert re.search(r"^cff-version: 1\.2\.0$", text, re.MULTILINE)
    version = re.search(r"^version: (\S+)$", text, re.MULTILINE)
    assert version and version.group(1).strip("\"'") == neuronml_fast.__version__, \
        f"CITATION.cff version {version and version.group(1)} != neuronml_fast.__version__ {neuronml_fast.__version__}"


def test_the_readme_dtype_table_is_the_registrys():
    import torch

    from neuronml_fast import backends

    names = {"all four": {torch.float16, torch.bfloat16, torch.float32, torch.float64},
             "float32, float64": {torch.float32, torch.float64}, "-": set()}
    families = {"masked, sensitivity": ("masked", "sensitivity"), "plastic": ("plastic",),
                "batch norm rows (double backward)": ("batch_norm",)}
    rows = re.findall(r"^\| (masked, sensitivity|plastic|batch norm rows \(double backward\)) \| (.*) \|$",
                      _read(README), re.MULTILINE)
    assert {label for label, _ in rows} == set(families), rows
    for label, cells in rows:
        reference, *kernels = (names[c.strip()] for c in cells.split(" | "))
        assert reference == set(names["all four"]), label
        for family in families[label]:
            registered = [set(backends.KERNELS[family].get(b, ())) for b in ("cpu", "triton", "cuda")]
            assert kernels == registered, (label, family)
