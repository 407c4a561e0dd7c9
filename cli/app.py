"""The shared typer app, console and error handling of the ``vargpt-mlx`` command line.

Each command lives in its own module (``cli/verify_cmd.py``, ...) and registers itself on ``app``;
``cli/main.py`` imports them all.
"""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="VARGPT-v1.1 on MLX: multimodal chat, image generation and editing.")
err = Console(stderr=True)
out = Console()

# Errors a user can cause (bad paths, bad checkpoints, bad images): one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, OSError)
_debug = False


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    global _debug
    _debug = debug


def fail(msg: str, code: int = 2):
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn):
    """Run ``fn``; user errors become one stderr line and exit 2 (``--debug`` re-raises)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except USER_ERRORS as e:
        if _debug:
            raise
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
