"""The ``vargpt-mlx`` command line (a thin layer over the ``vargpt_mlx`` library)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

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


@app.command()
def verify(
    model: Path = typer.Option(..., "--model", help="Upstream checkpoint directory."),
    refs: Path = typer.Option(..., "--refs", help="Reference outputs (refs.json must lie beside it)."),
):
    """Compare a checkpoint with upstream PyTorch reference outputs, component by component."""
    from vargpt_mlx.verify import Verifier, verify as run_verify

    if not refs.is_file():
        fail(f"refs file {refs} does not exist")

    def run():
        with err.status("verifying...") as status:
            return run_verify(model, refs, on_family=lambda f: status.update(f"verifying {Verifier.FAMILIES[f]}..."))

    results = guarded(run)
    table = Table(title=f"parity: {model} vs {refs.name} (image generation teacher-forced)")
    for col in ("component", "reference", "max abs err", "bound", "result", "note"):
        table.add_column(col)
    n_fail = 0
    for fam, c in results:
        n_fail += not c.ok
        table.add_row(Verifier.FAMILIES[fam], c.name, f"{c.max_abs_err:.3g}", f"{c.bound:.3g}",
                      "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.note)
    Console(width=max(out.width, 150)).print(table)
    out.print(f"{len(results) - n_fail} passed, {n_fail} failed")
    if n_fail or not results:
        raise typer.Exit(1)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
