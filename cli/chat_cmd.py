"""``vargpt-mlx chat``: streaming multimodal chat, one-shot or interactive, with a kept KV cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from vargpt_mlx.options import MAX_REPLY_TOKENS

from .app import _user_error_types, app, err, fail, guarded, is_env_os_error, model_option, need_model
from .options import Loading

HELP_LINES = (
    "/image PATH  attach an image to your next message (repeat for several)",
    "/reset       start a new conversation (clears the KV cache and pending images)",
    "/help        show this help",
    "/exit        quit (as does end of input, Ctrl-D)",
)


def _emit(text: str) -> None:
    typer.echo(text, nl=False)  # click.echo flushes: tokens show as they come


def _check_images(paths: list[Path]) -> None:
    """Fail early (before loading the model) on missing or unreadable images."""
    from vargpt_mlx.image_processor import load_image

    for p in paths:
        load_image(p)


class _ScaleProgress:
    """Rich progress bar on stderr for the scales of an image being drawn."""

    def __init__(self):
        self._progress = None
        self._task = None

    def __call__(self, k: int, n: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if not err.is_terminal:  # a bar only on a terminal (a pipe or log file gets no blank line)
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("drawing image"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=err, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("scales", total=n)
        self._progress.update(self._task, completed=k + 1)
        if k + 1 >= n:
            self.stop()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _run_turn(session, text: str, images: list[Path], verbose: bool, progress: _ScaleProgress) -> None:
    """Stream one reply to stdout; images the model draws are announced on their own line."""
    from vargpt_mlx.chat import ImageEvent

    line_open = False  # whether stdout's current line has reply text on it
    reply = session.send(text, images)
    try:
        for piece in reply:
            if isinstance(piece, ImageEvent):
                progress.stop()
                if piece.error:
                    err.print(f"[yellow]no image:[/] {piece.error}", highlight=False, soft_wrap=True)
                else:
                    h, w = piece.image.shape[:2]
                    _emit(("\n" if line_open else "") + f"[image {w}x{h} saved to {piece.path}]")
                    line_open = True
            else:
                _emit(piece)
                line_open = True
    finally:
        reply.close()  # an interrupted reply still ends the turn cleanly
        progress.stop()
        _emit("\n")
    if verbose and session.last_turn is not None:
        s = session.last_turn
        err.print(f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tokens/s; "
                  f"generation: {s.generated_tokens} tokens, {s.generation_tps:.1f} tokens/s; "
                  f"finish: {s.finish}" + (f"; image: {s.image_s:.1f} s" if s.images else ""),
                  highlight=False, soft_wrap=True)


def _interactive(session, images: list[Path], verbose: bool, progress: _ScaleProgress) -> None:
    """Read messages from stdin until /exit or end of input; the KV cache is kept between turns."""
    pending = list(images)
    tty = sys.stdin.isatty()
    if tty:
        err.print("interactive chat: " + ", ".join(h.split("  ")[0].strip() for h in HELP_LINES), highlight=False)
    while True:
        if tty:  # the prompt marker goes to stderr so stdout carries only the replies
            sys.stderr.write(f">> {'[' + str(len(pending)) + ' image(s)] ' if pending else ''}")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # end of input
            if tty:
                sys.stderr.write("\n")
            return
        line = line.rstrip("\r\n")
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "/exit" or cmd == "/quit":
            return
        if cmd == "/reset":
            session.reset()
            pending.clear()
            err.print("conversation cleared", highlight=False)
            continue
        if cmd == "/help":
            err.print("\n".join(HELP_LINES), highlight=False)
            continue
        if cmd == "/image":
            arg = arg.strip().strip("'\"")
            path = Path(arg).expanduser()
            if not arg:
                err.print("[bold red]error:[/] usage: /image PATH", highlight=False)
                continue
            try:
                _check_images([path])
            except _user_error_types() as e:
                err.print(f"[bold red]error:[/] {str(e).splitlines()[0]}", highlight=False, soft_wrap=True)
                continue
            pending.append(path)
            continue
        if cmd.startswith("/") and len(cmd) > 1:
            err.print(f"[bold red]error:[/] unknown command {cmd} (try /help)", highlight=False)
            continue
        if not line.strip() and not pending:
            continue
        try:
            _run_turn(session, line, pending, verbose, progress)
        except KeyboardInterrupt:
            err.print("[interrupted: the reply so far stays in the conversation]", highlight=False)
        except _user_error_types() as e:
            err.print(f"[bold red]error:[/] {str(e).splitlines()[0]}", highlight=False, soft_wrap=True, markup=False)
        except OSError as e:
            if not is_env_os_error(e):
                raise
            err.print(f"error: {e.strerror or e}: {e.filename}", highlight=False, soft_wrap=True, markup=False)
        pending.clear()


@app.command()
def chat(
    prompt: Optional[str] = typer.Argument(
        None, help="Message to answer (one-shot). Without it: an interactive session on stdin."),
    model: Optional[str] = model_option(),
    image: list[Path] = typer.Option(
        [], "--image", help="Image for the (first) message; repeat for several. The text comes before the "
                            "images, as upstream's examples put it."),
    max_tokens: int = typer.Option(512, "--max-tokens", help=f"Most tokens per reply (at most {MAX_REPLY_TOKENS} and "
                                                             "the model's context)."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0: greedy, upstream's default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1] (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for text sampling and drawn images "
                                                            "(default: wall clock)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the chat template's, "
                                                                "'You are a helpful assistant.')."),
    adapter_path: Optional[Path] = Loading.adapter_path,
    tokenizer: Optional[Path] = Loading.tokenizer,
    out_dir: Path = typer.Option(Path("."), "--out-dir", help="Existing directory where images the model draws are "
                                                            "written (PNGs with prompt, seed and settings)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speeds per reply."),
):
    """Chat with the model: streams the reply; the model may also draw an image (saved as PNG).

    Interactive commands: /image PATH, /reset, /help, /exit.
    """
    if prompt is not None and not prompt.strip():
        fail("empty prompt")
    model = need_model(model)
    if not 1 <= max_tokens <= MAX_REPLY_TOKENS:
        fail(f"--max-tokens must be in 1..{MAX_REPLY_TOKENS}, got {max_tokens}")
    if not (0 <= temp < float("inf")):
        fail("--temp must be a finite number >= 0")
    if not 0 < top_p <= 1:
        fail("--top-p must be in (0, 1]")
    if seed is not None and not 0 <= seed < 2**63:
        fail(f"--seed must be in [0, 2**63), got {seed}")
    from vargpt_mlx.files import check_writable_dir

    guarded(lambda: check_writable_dir(out_dir, "--out-dir"))  # else drawn images would be lost
    if tokenizer is not None and not tokenizer.is_dir():
        fail(f"--tokenizer {tokenizer} is not a directory")
    if adapter_path is not None and not adapter_path.is_dir():
        fail(f"adapter path {adapter_path} does not exist or is not a directory")
    guarded(lambda: _check_images(image))

    from vargpt_mlx.api import load
    from vargpt_mlx.chat import ChatSession

    def setup():
        with err.status(f"loading {model}..."):
            pipe = load(model, tokenizer=tokenizer, adapter_path=adapter_path)
        progress = _ScaleProgress()
        session = ChatSession(pipe, system=system, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                              out_dir=out_dir, on_image_scale=progress)
        return session, progress

    session, progress = guarded(setup)
    if prompt is not None:
        guarded(lambda: _run_turn(session, prompt, image, verbose, progress))
    else:
        _interactive(session, image, verbose, progress)

