"""Output paths checked before the work that fills them, for the command lines (`check`, the meta
CLI, the examples): a path that cannot be written is a usage error at once, not a traceback after
minutes of work. Each function returns the message (naming the option, the expected and the
given) or None."""

import os


def _nearest_existing(path):
    """The longest prefix of ``path`` that exists (``path`` itself, one of its parents, or '.')."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _writable_folder(folder):
    return os.access(folder, os.W_OK | os.X_OK)


def file_problem(option, path):
    """``path`` must be a file this process can create or replace, in a folder that exists."""
    if os.path.isdir(path):
        return f"{option}: expected a file to write, got {path!r}, a folder"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        blocker = _nearest_existing(folder)
        reason = f"no folder {folder}" if os.path.isdir(blocker) else f"{blocker} is a file"
        return f"{option}: expected a file in an existing folder, got {path!r} ({reason})"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{option}: expected a file this process may write, got {path!r} (not writable)"
    if not _writable_folder(folder):
        return f"{option}: expected a file in a folder this process may write, got {path!r} ({folder} is not writable)"
    return None


def folder_problem(option, path):
    """``path`` must be a folder, or a folder this process can create (its parents made as needed)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{option}: expected a folder, got {path!r}, a file"
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        return f"{option}: expected a folder, got {path!r} ({existing} is a file)"
    if not _writable_folder(existing):
        return f"{option}: expected a folder this process may write, got {path!r} ({existing} is not writable)"
    return None
