"""``vargpt-mlx serve``: an OpenAI-compatible local server (chat with images, image generation and
editing) over one loaded model, with a small chat page at ``/``.

    from vargpt_mlx.server import ServerSettings, build_app, run

    app, worker = build_app("path/to/model", ServerSettings(api_key="secret"))
    run(app, host="127.0.0.1", port=8080)

Needs the ``server`` extra (``pip install 'vargpt-mlx[server]'``: FastAPI, uvicorn,
python-multipart).
"""

from __future__ import annotations

from pathlib import Path

from .app import ServerSettings, create_app
from .worker import ModelWorker


def model_id(model: str | Path) -> str:
    """The name ``/v1/models`` reports: a local directory's name, else the string given (repo id, ``nano``)."""
    p = Path(str(model)).expanduser()
    return p.resolve().name if p.exists() else str(model)


def build_app(model: str | Path, settings: ServerSettings | None = None, *, tokenizer: str | Path | None = None,
              adapter_path: str | Path | None = None, max_queue: int | None = None):
    """Load the model on its worker thread (errors raise here) and return ``(asgi_app, worker)``."""
    from .. import api

    settings = settings or ServerSettings(model_id=model_id(model))
    worker = ModelWorker(lambda: api.load(model, tokenizer=tokenizer, adapter_path=adapter_path), max_queue=max_queue)
    try:
        app = create_app(worker, settings)
    except BaseException:
        worker.stop()
        raise
    return app, worker


def run(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)


__all__ = ["ModelWorker", "ServerSettings", "build_app", "create_app", "model_id", "run"]
