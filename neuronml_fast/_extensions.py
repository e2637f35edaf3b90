"""Loading of the compiled extensions, remembering why one is missing.

Import failures are recorded, never raised here: the backend registry turns them into the
`not built: <reason>` lines of `python -m neuronml_fast` and into clear errors when a user asks
for a backend that cannot run.
"""

import importlib

_modules = {}
_errors = {}


def load(name):
    """Return the extension module ``neuronml_fast.<name>`` or None (reason kept for `error`)."""
    if name not in _modules and name not in _errors:
        try:
            _modules[name] = importlib.import_module(f"neuronml_fast.{name}")
        except ImportError as exc:  # not built, or built against another torch
            _errors[name] = str(exc) or type(exc).__name__
    return _modules.get(name)


def error(name):
    """Why ``load(name)`` returned None, or None if it loaded."""
    load(name)
    return _errors.get(name)


def cpu():
    return load("_C_cpu")


def cuda():
    return load("_C_cuda")
