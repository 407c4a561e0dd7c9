"""The ``vargpt-mlx`` command line (a thin layer over the ``vargpt_mlx`` library)."""

from __future__ import annotations

import sys

from cli.blas import ensure_fast_blas

from cli import verify_cmd  # noqa: F401  (each module registers its commands on ``app``)
from cli import convert_cmd  # noqa: F401
from cli import generate_cmd  # noqa: F401
from cli import train_cmd  # noqa: F401
from cli import chat_cmd  # noqa: F401
from cli import reference_cmd  # noqa: F401
from cli import serve_cmd  # noqa: F401
from cli.app import app

__all__ = ["app", "main"]


def main():
    """The console entry point: fast BLAS first (re-executes once on Linux), then the app."""
    ensure_fast_blas()
    return app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
