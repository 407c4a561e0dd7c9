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
from . import app as app_mod
from .app import app

__all__ = ["app", "main"]


def main():
    """The console entry point: fast BLAS first (re-executes once on Linux), then the app.

    Whatever escapes a command ends here: a user error or a file-system refusal is one line with
    exit 2, anything else one ``internal error`` line with exit 1 (the traceback with --debug)."""
    try:  # typer >= 0.26 vendors click as typer._click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx

    ensure_fast_blas()
    try:
        rc = app(standalone_mode=False)
    except SystemExit:
        raise
    except cx.NoArgsIsHelpError as e:  # no arguments: the help (already printed)
        sys.exit(e.exit_code)
    except cx.ClickException as e:  # a usage error (unknown option, bad type): one line too
        where = f" (see '{e.ctx.command_path} --help')" if isinstance(e, cx.UsageError) and e.ctx else ""
        msg = " ".join(e.format_message().split())
        app_mod.err.print(f"error: {msg}{where}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (getattr(cx, "Abort", app_mod.typer.Abort), app_mod.typer.Abort):
        app_mod.err.print("error: aborted", highlight=False, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        app_mod.err.print("error: interrupted", highlight=False, markup=False)
        sys.exit(130)
    except BaseException as e:
        if app_mod._debug:
            raise
        try:
            if isinstance(e, app_mod._user_error_types()):
                app_mod.fail(app_mod.first_line(e))
            if app_mod.is_env_os_error(e):
                app_mod.fail(app_mod.os_error_line(e))
            app_mod.internal_error(e)
        except app_mod.typer.Exit as x:
            sys.exit(x.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
