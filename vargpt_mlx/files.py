"""Output paths and file modes: one rule for every command and writer.

The rule: an output (a file, or a directory such as a converted model or an adapter directory) is
created, but the directory it goes into must already exist; missing parents are an error, never
created (a mistyped path should not silently make directories, even at the file-system root).
Every check is a real write test (permissions, read-only file systems, the immutable attribute:
it also holds for root). Files and directories written atomically through a temporary name get the
mode a plain ``open`` / ``mkdir`` would give them (the umask), not ``tempfile``'s 0600 / 0700.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from .errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~_umask()


def check_writable_dir(d: str | Path, what: str) -> Path:
    """``d`` exists, is a directory and accepts a new file (a real probe), else ``InputError``."""
    d = Path(d) if str(d) else Path(".")
    if not d.exists():
        raise InputError(f"{what} {d} does not exist")
    if not d.is_dir():
        raise InputError(f"{what} {d} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vargpt-probe-", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"cannot write to {what} {d}: {e.strerror or e}") from None
    return d


def check_new_file(path: str | Path, what: str = "output") -> Path:
    """``path`` can be written: its directory exists and is writable, it is not a directory and,
    if it exists, it may be replaced."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory")
    check_writable_dir(path.parent, f"{what} directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path} exists and is not writable")
    return path


def check_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """``path`` may become (or already is) an output directory: if it exists it is a writable
    directory; if not, its parent exists and is writable (the directory itself is created later)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return check_writable_dir(path, what)
    check_writable_dir(path.parent, f"{what} {path}: parent directory")
    return path


def check_input_file(path: str | Path, what: str) -> Path:
    """``path`` is an existing, readable regular file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return path


def check_safetensors(path: str | Path, what: str) -> Path:
    """``path`` is a readable safetensors file (its header parses), without reading the tensors."""
    path = check_input_file(path, what)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(100 * 2**20, path.stat().st_size - 8):
                raise ValueError
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{what} {path} is not a safetensors file") from None
    return path


__all__ = ["check_input_file", "check_new_file", "check_output_dir", "check_safetensors", "check_writable_dir",
           "dir_mode", "file_mode"]
