"""The shared typer app, console and error handling of the ``vargpt-mlx`` command line.

Each command lives in its own module (``cli/verify_cmd.py``, ...) and registers itself on ``app``;
``cli/main.py`` imports them all.

The error rule: a problem with what the user gave (a value, a path, a file) is checked before any
work starts and raised as a user error (``UserError`` here, ``vargpt_mlx.errors.InputError`` and its
subclasses in the library): one ``error: ...`` line on stderr, exit code 2, nothing written. A file
system refusal while writing (no space, read-only, permission) is also one line, exit 2. Anything
else is a bug: one ``internal error`` line, exit 1; ``--debug`` (or ``VARGPT_MLX_DEBUG=1``) shows
the traceback.
"""

from __future__ import annotations

import errno
import os
import sys

import typer
from rich.console import Console

from vargpt_mlx import __version__
from vargpt_mlx.errors import InputError, first_line

DEBUG_ENV = "VARGPT_MLX_DEBUG"


def _console(stderr: bool) -> Console:
    # not a terminal (a pipe, a file, a test): never wrap or cut lines at 80 columns
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty else 10_000)


def _plain_metavar(self, ctx) -> str | None:
    """Help shows click's plain metavars (TEXT, INTEGER, PATH; nothing for flags) instead of typer
    0.29's Python type labels (``<bool>``, ``<list[Path]>``)."""
    if self.metavar is not None:
        return self.metavar
    label = str(self.display_type(ctx) or "").strip("<>")
    if getattr(self, "is_flag", False) or label == "bool":
        return None
    many = label.startswith("list[")
    label = label.removeprefix("list[").removesuffix("]")
    name = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH"}.get(label, label.upper())
    return name + ("..." if many or getattr(self, "nargs", 1) != 1 else "")


for _cls in (typer.core.TyperOption, typer.core.TyperArgument):
    if hasattr(_cls, "display_type_rich"):
        _cls.display_type_rich = _plain_metavar

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="VARGPT-v1.1 on MLX: multimodal chat, image generation and editing.")
err = _console(stderr=True)
out = _console(stderr=False)


class UserError(InputError):
    """A bad value / path the command line itself rejects (exit 2, one line)."""


_debug = bool(os.environ.get(DEBUG_ENV))

# file-system refusals that are the environment's, not a bug (full disk, read-only, permissions):
# one line, exit 2. A missing file or a path of the wrong kind is checked up front instead.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _user_error_types() -> tuple[type[BaseException], ...]:
    """InputError plus the library's user-input errors that predate it (modules not imported here)."""
    types: list[type[BaseException]] = [InputError]
    for mod, name in (("vargpt_mlx.chat", "ChatError"), ("vargpt_mlx.training.trainer", "CheckpointMismatch")):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, name):
            types.append(getattr(m, name))
    return tuple(types)


def _version(value: bool):
    if value:
        typer.echo(f"vargpt-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug",
                                     help=f"Show the full traceback of an error (also: {DEBUG_ENV}=1)."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    global _debug
    _debug = debug or bool(os.environ.get(DEBUG_ENV))


def fail(msg: str, code: int = 2):
    """One ``error: msg`` line on stderr (``msg`` is plain text, never markup), then exit ``code``."""
    from rich.text import Text

    err.print(Text.assemble(("error:", "bold red"), " ", str(msg)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def os_error_line(e: OSError) -> str:
    """``cannot write PATH: reason`` naming the user's path (not a temp file inside it)."""
    name = getattr(e, "user_path", None) or e.filename
    reason = e.strerror or first_line(e)
    return f"{reason}: {name}" if name else reason


def is_env_os_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _ENV_ERRNOS


def internal_error(e: BaseException):
    """One line for a bug (exit 1); the traceback with --debug."""
    from rich.text import Text

    err.print(Text.assemble(("internal error", "bold red"), f" (a bug, please report it): {type(e).__name__}: "
                            f"{first_line(e)} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"),
              highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def guarded(fn):
    """Run ``fn``; user errors become one stderr line and exit 2 (``--debug`` re-raises). Other
    exceptions propagate to ``main`` (an internal error)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except _user_error_types() as e:
        if _debug:
            raise
        fail(first_line(e))
    except OSError as e:
        if _debug or not is_env_os_error(e):
            raise
        fail(os_error_line(e))


def require(ok: bool, msg: str) -> None:
    """An input check: ``UserError(msg)`` unless ``ok``."""
    if not ok:
        raise UserError(msg)


def check_aspect_option(value: str | None, opt: str = "--aspect") -> str | None:
    """``W:H`` only: a bare number is ambiguous (h/w in the library, W/H to a photographer)."""
    if value is None:
        return None
    text = value.strip()
    if ":" not in text:
        raise UserError(f"{opt} {value!r} must be W:H, e.g. 3:2 (landscape), 2:3 (portrait) or 1:1")
    return text


MODEL_HELP = ("Checkpoint directory, Hugging Face repo id or 'nano' (the shipped small model); default "
              "$VARGPT_MODEL. Nothing is downloaded unless you name a repo id.")


def model_option(required_help: str = MODEL_HELP):
    """``-m/--model`` (default ``$VARGPT_MODEL``), the same on every command."""
    return typer.Option(None, "--model", "-m", envvar="VARGPT_MODEL", help=required_help, show_envvar=False)


def need_model(model: str | None) -> str:
    """The ``--model`` value; a local path must be a checkpoint directory (checked without loading)."""
    if not model:
        fail("no model given: pass --model DIR_OR_REPO or set VARGPT_MODEL")
    from pathlib import Path

    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            fail(f"model path {model} is not a directory")
        if not (p / "config.json").is_file():
            fail(f"{model} is not a VARGPT checkpoint: no config.json")
    return model
