"""What runs on the model's thread: a chat reply (``ChatSession``) and an image request
(``api.generate_image`` / ``api.edit_image``). Both check for a gone client at every token and
every scale (``job.check()``), so a disconnect frees the model there."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import api
from ..chat import ChatSession, ImageEvent
from ..text_generation import hf_logits_processors
from .inputs import StopMatcher, data_uri

_FINISH = {"eos": "stop", "image": "stop", "length": "length"}


@dataclass
class ChatJob:
    history: list[dict]
    history_images: list[Any]  # PIL images
    text: str
    images: list[Any]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float | None = None


def run_chat(job, pipe, req: ChatJob, out_dir: Path, keep_images: bool) -> dict:
    """Events: ``start`` (input accepted), ``text`` pieces, ``image`` dicts (a drawn image as a data
    URI), ``image_error``; returns finish reason and token counts."""

    def guard(history, logits):  # runs before every token is chosen
        job.check()
        return logits

    scales = [0]

    def on_scale(k, n):
        scales[0] += 1
        job.check()
        job.emit("progress", (k + 1, n))

    procs = [guard] + (hf_logits_processors(req.repetition_penalty) if req.repetition_penalty else [])
    session = ChatSession(pipe, system=None, max_tokens=req.max_tokens, temp=req.temperature, top_p=req.top_p,
                          seed=req.seed, out_dir=out_dir, logits_processors=procs, on_image_scale=on_scale)
    session.start_from(req.history, req.history_images)
    reply = session.send(req.text, req.images)  # input errors (ChatError / ImageError) raise here
    job.emit("start")
    matcher = StopMatcher(req.stop)
    finish = None
    n_images = 0
    try:
        for piece in reply:
            if isinstance(piece, ImageEvent):
                if piece.error:
                    job.emit("image_error", piece.error)
                    continue
                png = piece.path.read_bytes()
                if not keep_images:
                    piece.path.unlink(missing_ok=True)
                h, w = piece.image.shape[:2]
                n_images += 1
                job.emit("image", {"type": "image_url", "image_url": {"url": data_uri(png)},
                                   "seed": piece.seed, "width": w, "height": h})
                continue
            out = matcher.feed(piece)
            if out:
                job.emit("text", out)
            if matcher.stopped:
                finish = "stop"
                break
    finally:
        reply.close()
    rest = matcher.flush() if finish is None else ""
    if rest:
        job.emit("text", rest)
    stats = session.last_turn
    return {"finish_reason": finish or _FINISH.get(stats.finish, "stop"), "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.generated_tokens, "images": n_images, "scales": scales[0]}


@dataclass
class ImageJob:
    prompt: str
    n: int
    settings: dict  # generate_image / edit_image keyword arguments (seed, cfg, tau, top_k, top_p, pn, aspect)
    image: Any = None  # PIL image to edit; None: text to image
    batch_size: int | None = None


def run_images(job, pipe, req: ImageJob) -> dict:
    """Draw (or edit); returns the PIL images (``.info`` holds prompt, seed, settings) and scale count."""
    scales = [0]

    def on_scale(k, n):
        scales[0] += 1
        job.check()

    t0 = time.perf_counter()
    opts = dict(n=req.n, on_scale=on_scale, batch_size=req.batch_size, **req.settings)
    if req.image is None:
        images = api.generate_image(pipe, req.prompt, **opts)
    else:
        images = api.edit_image(pipe, req.image, req.prompt, **opts)
    return {"images": images, "scales": scales[0], "seconds": time.perf_counter() - t0}
