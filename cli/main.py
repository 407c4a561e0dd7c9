"""The ``vargpt-mlx`` command line (a thin layer over the ``vargpt_mlx`` library)."""

from __future__ import annotations

import sys

from .blas import ensure_fast_blas

from . import verify_cmd  # noqa: F401  (each module registers its commands on ``app``)
from . import convert_cmd  # noqa: F401
from . import generate_cmd  # noqa: F401
from . import train_cmd  # noqa: F401
from . import chat_cmd  # noqa: F401
from . import reference_cmd  # noqa: F401
from . import serve_cmd  # noqa: F401
from .app import app

__all__ = ["app", "main"]


def main():
    """The console entry point: fast BLAS first (re-executes once on Linux), then the app."""
    ensure_fast_blas()
    return app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
