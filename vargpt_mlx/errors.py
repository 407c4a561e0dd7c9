"""The error type for bad input: what a user gave (a value, a path, a file) is not usable.

Library functions raise ``InputError`` (or a subclass: ``CheckpointError``, ``ImageError``,
``DataError``, ...) for problems the caller can fix; it is a ``ValueError``, so code that catches
``ValueError`` keeps working. The command line shows these as one ``error:`` line with exit code 2;
any other exception is treated as a bug.
"""

from __future__ import annotations


class InputError(ValueError):
    """Unusable input (value, path or file); the message names what is wrong and where."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["InputError", "first_line"]
