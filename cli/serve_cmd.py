"""``vargpt-mlx serve``: an OpenAI-compatible local server with a chat page (``vargpt_mlx.server``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from vargpt_mlx.options import MAX_REPLY_TOKENS

from .app import app, err, fail, guarded, model_option, need_model
from .options import Loading

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_bind(host: str, port: int) -> None:
    """Fail with one line if ``host:port`` cannot be listened on (in use, no such address)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        fail(f"cannot resolve --host {host}: {e.strerror or e}")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


@app.command()
def serve(
    model: Optional[str] = model_option(),
    tokenizer: Optional[Path] = Loading.tokenizer,
    adapter_path: Optional[Path] = Loading.adapter_path,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VARGPT_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on the API (/v1/...); /health and the "
                                               "page's static files stay open (the page asks for the key)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue",
                                            help="Most requests waiting for the model; more get 503 (default: no limit)."),
    allow_local_files: bool = typer.Option(False, "--allow-local-files",
                                           help="Accept local file paths as chat image URLs."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="Largest request body accepted (MiB)."),
    max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels", help="Largest input image (pixels)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Reply length for chat requests without max_tokens "
                                                             f"(at most {MAX_REPLY_TOKENS})."),
    temp: float = typer.Option(0.0, "--temp", help="Temperature for chat requests without one (0: greedy)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir",
                                           help="Also keep images the model draws in chat in this existing directory "
                                                "(default: not kept)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size",
                                             help="Images drawn together per request (default: all n)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
):
    """Serve the model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/.

    Routes: /v1/models, /v1/chat/completions, /v1/images/generations, /v1/images/edits, /health.
    """
    model = need_model(model)
    if not 0 < port < 65536:
        fail("--port must be in 1..65535")
    if max_queue is not None and max_queue < 0:
        fail("--max-queue must be >= 0")
    if (not 0 < max_body_mb < float("inf") or max_image_pixels <= 0 or max_tokens < 1
            or (batch_size is not None and batch_size < 1)):
        fail("--max-body-mb, --max-image-pixels, --max-tokens and --batch-size must be positive")
    if max_tokens > MAX_REPLY_TOKENS:
        fail(f"--max-tokens must be at most {MAX_REPLY_TOKENS}, got {max_tokens}")
    if not 0 <= temp <= 2:  # (nan fails too)
        fail("--temp must be in [0, 2]")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail("--log-level must be debug, info, warning or error")
    if out_dir is not None:
        from vargpt_mlx.files import check_writable_dir

        guarded(lambda: check_writable_dir(out_dir, "--out-dir"))
    if tokenizer is not None and not tokenizer.is_dir():
        fail(f"--tokenizer {tokenizer} is not a directory")
    if adapter_path is not None and not adapter_path.is_dir():
        fail(f"adapter path {adapter_path} does not exist or is not a directory")

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (for /v1/images/edits)
        import uvicorn  # noqa: F401
    except ImportError as e:
        fail(f"the server needs its extra packages ({e.name} is missing): pip install 'vargpt-mlx[server]'")
    _check_bind(host, port)  # before the model loads

    from vargpt_mlx.server import ServerSettings, build_app, model_id, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = ServerSettings(model_id=model_id(model), api_key=api_key or None, allow_local_files=allow_local_files,
                              max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=max_image_pixels,
                              max_tokens=max_tokens, temperature=temp, out_dir=out_dir, batch_size=batch_size)

    def setup():
        with err.status(f"loading {model}..."):
            return build_app(model, settings, tokenizer=tokenizer, adapter_path=adapter_path, max_queue=max_queue)

    asgi, worker = guarded(setup)
    if host not in LOOPBACK and not api_key:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this port "
                  "can use the model", highlight=False)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving {settings.model_id} on http://{shown}:{port}/ (OpenAI API at http://{shown}:{port}/v1)",
              highlight=False, soft_wrap=True)
    try:
        run(asgi, host=host, port=port, log_level=log_level.lower())
    finally:
        worker.stop()
