"""Python API: ``load`` a model once, then generate or edit images with it (chat: ``vargpt_mlx.chat``).

``generate_image`` / ``edit_image`` also take a path or repo id instead of a ``Pipeline`` (loaded
for the call). Weights are memory-mapped safetensors, read when first used.

How prompts are built (upstream ``inference_v1_1/generation_vargpt_v1_1.py``)
---------------------------------------------------------------------------
* **Text to image.** One user turn holding the text, rendered with the model's own chat template
  (the Qwen2-VL template adds the default system prompt), then the generation prompt
  ``<|im_start|>assistant\\n``, then ``assistant_prefix`` (default empty), then
  ``<|image_gen_start|>``. Upstream lets the model choose ``<|image_gen_start|>`` itself; its
  training answers read ``"I have designed a drawing of ...<image_gen>"``, so the model usually
  writes such a sentence first. Here the start token is forced right after the prefix (the
  ``chat`` command is where the model decides on its own); pass that sentence as
  ``assistant_prefix`` to reproduce the context of such an answer.
* **Edit.** One user turn: the instruction text with the input image where the text says
  ``<image>`` (LLaMA-Factory's layout of the upstream edit data, ``"Transform this image <image>
  to match ..."``), or after the text when it has no ``<image>`` marker (upstream's example order);
  then ``<|im_start|>assistant\\n`` + ``"The output image is: "`` (the answer every upstream edit
  sample starts with) + ``<|image_gen_start|>``. The input image is first capped at 512*512 pixels
  with a nearest-neighbour resize, as LLaMA-Factory's ``image_resolution`` does in upstream's
  edit inference, then goes through the Qwen2-VL image processor and the vision tower.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__, schedules
from .config import VARGPTConfig
from .errors import InputError
from .files import check_new_file, file_mode
from .hub import resolve_model_path
from .image_processor import ImageError, ImageProcessor, load_image
from .loading import load_model
from .options import (ASPECT_RANGE, MAX_SEED, aspect_label, check_aspect, check_count, check_sampling,  # noqa: F401
                      normalize_pn)
from .models.vargpt import VARGPT
from .pipelines import image_generation as ig
from .tokenizer import check_token_ids, load_tokenizer

IMAGE_MARKER = "<image>"
EDIT_ASSISTANT_PREFIX = "The output image is: "
EDIT_MAX_PIXELS = 512 * 512  # LLaMA-Factory ``image_resolution`` default used by upstream edit inference


@dataclass
class Pipeline:
    """A loaded model with its tokenizer and image processor."""

    model: VARGPT
    tokenizer: object  # mlx_lm TokenizerWrapper
    processor: ImageProcessor
    path: Path
    adapter_path: Path | None = None

    @property
    def config(self) -> VARGPTConfig:
        return self.model.config


def apply_adapters(model: VARGPT, adapter_path: str | Path) -> None:
    """Apply LoRA adapters in place (``vargpt_mlx.training.lora.load_adapters``)."""
    from .training import lora

    path = Path(adapter_path)
    if not path.exists():
        raise InputError(f"adapter path {path} does not exist")
    lora.load_adapters(model, path)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at error level for the duration (restored afterwards)."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    previous = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(previous)


def load(model: str | Path, *, dtype: mx.Dtype | None = None, tokenizer: str | Path | None = None,
         adapter_path: str | Path | None = None) -> Pipeline:
    """Load a checkpoint directory (upstream or converted) or a Hugging Face repo id.

    ``tokenizer``: a directory with tokenizer files, when the model directory has none.
    ``adapter_path``: LoRA adapters (``vargpt-mlx train``) applied to the model.
    """
    if adapter_path is not None and not Path(adapter_path).exists():
        raise InputError(f"adapter path {adapter_path} does not exist")
    path = resolve_model_path(model)
    m = load_model(path, dtype=dtype)
    with _quiet_transformers():  # it warns that config.json's model type is not one it knows
        tok = load_tokenizer(Path(tokenizer) if tokenizer else path,
                             eos_token_ids=[m.config.tokens.eos_token_id])
    check_token_ids(tok, m.config)
    if adapter_path is not None:
        apply_adapters(m, adapter_path)
    return Pipeline(model=m, tokenizer=tok, processor=ImageProcessor.from_dir(path), path=path,
                    adapter_path=Path(adapter_path) if adapter_path is not None else None)


# ----------------------------------------------------------------------------------- settings
def make_settings(*, seed: int | None = None, cfg: float = 3.0, tau: float = 0.5, top_k: int = 900,
                  top_p: float = 0.97, pn: str | None = None, aspect: float | str = "1:1",
                  argmax: bool = False) -> ig.GenerationSettings:
    """Validated ``GenerationSettings``; ``seed=None`` draws a random seed (recorded in the result)."""
    seed = check_sampling(seed=seed, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
    key = check_aspect(aspect)
    return ig.GenerationSettings(cfg=float(cfg), tau=float(tau), top_k=int(top_k), top_p=float(top_p),
                                 argmax=argmax, seed=int(seed), pn=normalize_pn(pn), aspect=key)


# ----------------------------------------------------------------------------------- prompts
def _render(tokenizer, content: list[dict], assistant_prefix: str) -> list[int]:
    """One user turn through the model's chat template (+ generation prompt + prefix) -> ids."""
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text + assistant_prefix, add_special_tokens=False))


def t2i_prompt_ids(tokenizer, prompt: str, assistant_prefix: str = "") -> np.ndarray:
    """Token ids of a text-to-image prompt (``<|image_gen_start|>`` is appended at prefill)."""
    return np.asarray(_render(tokenizer, [{"type": "text", "text": prompt}], assistant_prefix), dtype=np.int64)


def edit_prompt_ids(tokenizer, config: VARGPTConfig, prompt: str, n_image_tokens: int,
                    assistant_prefix: str = EDIT_ASSISTANT_PREFIX) -> np.ndarray:
    """Token ids of an edit prompt: the image where ``prompt`` says ``<image>`` (else after the text),
    its ``<|image_pad|>`` expanded to ``n_image_tokens`` copies."""
    parts = prompt.split(IMAGE_MARKER)
    if len(parts) > 2:
        raise InputError(f"the prompt may mark the input image's place with {IMAGE_MARKER} at most once")
    before, after = parts if len(parts) == 2 else (parts[0], "")
    content = [{"type": "text", "text": before}, {"type": "image"}]
    if after:
        content.append({"type": "text", "text": after})
    ids = _render(tokenizer, content, assistant_prefix)
    pad = config.tokens.image_token_id
    if ids.count(pad) != 1:
        raise InputError(f"the chat template gave {ids.count(pad)} image slots, expected 1")
    i = ids.index(pad)
    return np.asarray(ids[:i] + [pad] * n_image_tokens + ids[i + 1:], dtype=np.int64)


def prepare_edit_image(image: str | Path | Image.Image | np.ndarray, max_pixels: int = EDIT_MAX_PIXELS) -> Image.Image:
    """Open (EXIF orientation applied), convert to RGB and cap the area at ``max_pixels`` with
    LLaMA-Factory's nearest-neighbour resize (``int(side * sqrt(max / area))``)."""
    if isinstance(image, np.ndarray):
        from .image_processor import _array_to_pil

        image = _array_to_pil(image)
    img = load_image(image)
    if img.width * img.height > max_pixels:
        f = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(int(img.width * f), 1), max(int(img.height * f), 1)), resample=Image.Resampling.NEAREST)
    return img


# ----------------------------------------------------------------------------------- running
def _as_pipeline(pipeline_or_path, tokenizer, adapter_path) -> Pipeline:
    if isinstance(pipeline_or_path, Pipeline):
        if adapter_path is not None:
            raise InputError("adapter_path applies when loading: pass it to load() or give a path")
        return pipeline_or_path
    return load(pipeline_or_path, tokenizer=tokenizer, adapter_path=adapter_path)


def _metadata(pipe: Pipeline, mode: str, prompt: str, s: ig.GenerationSettings, seed: int, index: int, n: int,
              schedule, assistant_prefix: str, extra: dict | None = None) -> dict[str, str]:
    H, W = schedules.image_size(schedule)
    meta = {
        "prompt": prompt,
        "mode": mode,
        "seed": seed,
        "cfg": s.cfg,
        "tau": s.tau,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "argmax": s.argmax,
        "pn": s.pn or pipe.config.pn,
        "aspect": aspect_label(float(s.aspect)),
        "aspect_h_div_w": float(s.aspect),
        "width": W,
        "height": H,
        "scales": len(schedule),
        "assistant_prefix": assistant_prefix,
        "index": index,
        "n": n,
        "model": str(pipe.path),
        "software": f"vargpt-mlx {__version__}",
    }
    if pipe.adapter_path is not None:
        meta["adapter_path"] = str(pipe.adapter_path)
    meta.update(extra or {})
    out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    out["parameters"] = json.dumps(meta, ensure_ascii=False)
    return out


def image_metadata(pipe: Pipeline, mode: str, prompt: str, settings: ig.GenerationSettings, seed: int,
                   assistant_prefix: str = "") -> dict[str, str]:
    """The PNG text chunks ``generate_image`` writes, for one image drawn with ``settings`` and
    ``seed`` (used for the images drawn in a chat)."""
    pn = settings.pn or pipe.config.pn
    schedule = schedules.get_schedule(pn, settings.aspect)
    return _metadata(pipe, mode, prompt, settings, seed, 0, 1, schedule, assistant_prefix)


def _to_pil(results: list[ig.GenerationResult], metas: list[dict[str, str]]) -> list[Image.Image]:
    images = []
    for r, meta in zip(results, metas):
        im = Image.fromarray(r.image)
        im.info.update(meta)
        images.append(im)
    return images


def _run(pipe: Pipeline, ids: np.ndarray, s: ig.GenerationSettings, n: int, batch_size: int | None,
         on_scale, pixel_values=None, grid=None) -> list[ig.GenerationResult]:
    if (msg := ig.context_error(pipe.model, len(ids), "prompt")) is not None:
        raise InputError(f"{msg}: use a shorter prompt")
    cache, hidden = ig.prefill_prompt(pipe.model, ids, pixel_values, grid)
    return ig.draw_images(pipe.model, cache, hidden, s, n=n, batch_size=batch_size, on_scale=on_scale)


def generate_image(pipeline_or_path: Pipeline | str | Path, prompt: str, *, n: int = 1, seed: int | None = None,
                   cfg: float = 3.0, tau: float = 0.5, top_k: int = 900, top_p: float = 0.97,
                   pn: str | None = None, aspect: float | str = "1:1",
                   on_scale: Callable[[int, int], None] | None = None, batch_size: int | None = None,
                   assistant_prefix: str = "", argmax: bool = False, tokenizer: str | Path | None = None,
                   adapter_path: str | Path | None = None) -> list[Image.Image]:
    """Draw ``n`` images for ``prompt``; returns RGB PIL images whose ``.info`` holds the prompt,
    seed and every setting (``save_image`` writes them as PNG text chunks).

    ``seed``: image ``i`` uses ``seed + i`` (``None``: a random seed, recorded in ``.info``).
    ``cfg``, ``tau``, ``top_k``, ``top_p``: upstream's sampling settings (defaults = upstream's).
    ``pn``: resolution ("0.06M", "0.25M", "0.60M", "1M"; default: the checkpoint's).
    ``aspect``: "W:H" (e.g. "16:9") or h/w; snapped to the nearest tabulated ratio.
    ``on_scale(k, n_scales)``: called after each scale (for each batch of images).
    ``batch_size``: images drawn together (default: all ``n``; the prompt is prefilled once either way).
    ``assistant_prefix``: text after ``<|im_start|>assistant\\n`` and before ``<|image_gen_start|>``.
    ``argmax``: pick each bit by argmax instead of sampling (deterministic, no seed dependence).
    """
    if not prompt or not prompt.strip():
        raise InputError("empty prompt")
    check_count(n, batch_size)
    s = make_settings(seed=seed, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, pn=pn, aspect=aspect, argmax=argmax)
    pipe = _as_pipeline(pipeline_or_path, tokenizer, adapter_path)
    ids = t2i_prompt_ids(pipe.tokenizer, prompt, assistant_prefix)
    results = _run(pipe, ids, s, n, batch_size, on_scale)
    seeds = ig.image_seeds(s.seed, n)
    metas = [_metadata(pipe, "text-to-image", prompt, s, seeds[i], i, n, r.schedule, assistant_prefix)
             for i, r in enumerate(results)]
    return _to_pil(results, metas)


def edit_image(pipeline_or_path: Pipeline | str | Path, image: str | Path | Image.Image | np.ndarray,
               prompt: str, *, n: int = 1, seed: int | None = None, cfg: float = 3.0, tau: float = 0.5,
               top_k: int = 900, top_p: float = 0.97, pn: str | None = None, aspect: float | str = "1:1",
               on_scale: Callable[[int, int], None] | None = None, batch_size: int | None = None,
               assistant_prefix: str = EDIT_ASSISTANT_PREFIX, argmax: bool = False,
               tokenizer: str | Path | None = None, adapter_path: str | Path | None = None,
               max_input_pixels: int = EDIT_MAX_PIXELS) -> list[Image.Image]:
    """Edit ``image`` as ``prompt`` instructs (the ``VARGPT-v1.1-edit`` checkpoint; any VARGPT
    checkpoint runs). ``prompt`` may mark the image's place with ``<image>``; otherwise the image
    follows the text. Options as ``generate_image``; ``max_input_pixels`` caps the input image's
    area before the image processor (upstream edit inference: 512*512). Returns PIL images with
    metadata in ``.info`` (``input_image``, ``input_size`` added).
    """
    if not prompt or not prompt.replace(IMAGE_MARKER, "").strip():
        raise InputError("empty prompt")
    check_count(n, batch_size)
    s = make_settings(seed=seed, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, pn=pn, aspect=aspect, argmax=argmax)
    src = prepare_edit_image(image, max_input_pixels)
    pipe = _as_pipeline(pipeline_or_path, tokenizer, adapter_path)
    pixel_values, grid = pipe.processor([src])
    n_tokens = pipe.processor.num_image_tokens(grid)[0]
    ids = edit_prompt_ids(pipe.tokenizer, pipe.config, prompt, n_tokens, assistant_prefix)
    pv = mx.array(pixel_values).astype(pipe.model.model.norm.weight.dtype)  # compute dtype; never quantized
    results = _run(pipe, ids, s, n, batch_size, on_scale, pixel_values=pv, grid=grid)
    seeds = ig.image_seeds(s.seed, n)
    name = str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"
    extra = {"input_image": name, "input_size": f"{src.width}x{src.height}", "input_image_tokens": n_tokens}
    metas = [_metadata(pipe, "edit", prompt, s, seeds[i], i, n, r.schedule, assistant_prefix, extra)
             for i, r in enumerate(results)]
    return _to_pil(results, metas)


# ----------------------------------------------------------------------------------- output files
def output_paths(output: str | Path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out_0.png``, ``out_1.png``, ... for ``n > 1``."""
    out = Path(output)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def check_output_paths(paths: Sequence[Path]) -> None:
    """Fail before any work if an output PNG could not be written.

    The directory must exist (it is not created: a mistyped path should not silently make
    directories) and be writable; an existing file is overwritten, an existing directory is an error.
    """
    for p in paths:
        if p.suffix.lower() != ".png":
            raise InputError(f"output {p} must be a .png file (settings are stored in PNG text chunks)")
        check_new_file(p, "output")


def png_info(image: Image.Image) -> PngInfo:
    """The PNG text chunks of ``image``: every string in its ``.info`` (prompt, seed, settings)."""
    info = PngInfo()
    for k, v in image.info.items():
        if isinstance(v, str):
            info.add_text(k, v)
    return info


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG with its ``.info`` strings as text chunks (as ``save_image`` writes)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(image))
    return buf.getvalue()


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG with its ``.info`` strings as text chunks, atomically (temp file in the
    same directory, then rename): a failed write never leaves a partial file at ``path``."""
    path = Path(path)
    info = png_info(image)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        os.fchmod(fd, file_mode())  # mkstemp creates 0600: give the file the mode open() would (umask)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:  # name the user's path, not the temporary file
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["EDIT_ASSISTANT_PREFIX", "ImageError", "Pipeline", "apply_adapters", "check_output_paths",
           "edit_image", "edit_prompt_ids", "generate_image", "image_metadata", "load", "make_settings", "output_paths",
           "png_bytes", "prepare_edit_image", "save_image", "t2i_prompt_ids"]
