"""``vargpt-mlx generate`` and ``vargpt-mlx edit``: draw images (a thin layer over ``vargpt_mlx.api``)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer

from .app import UserError, app, check_aspect_option, err, fail, guarded, model_option, need_model, out
from .options import Drawing, Loading


class _Progress:
    """Rich progress bar on stderr over every scale of every batch of images."""

    def __init__(self, n_groups: int):
        self.n_groups = n_groups
        self.progress = None
        self.task = None
        self.done = 0

    def __call__(self, k: int, n_scales: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if not err.is_terminal:  # a bar only on a terminal (a pipe or log file gets no blank line)
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("scales"), TimeElapsedColumn(), console=err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("drawing", total=n_scales * self.n_groups)
        self.done += 1
        desc = "decoding" if k + 1 == n_scales else "drawing"
        self.progress.update(self.task, completed=self.done, description=desc)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _run(mode: str, prompt: str, image: Optional[Path], model: Optional[str], output: Path, n: int,
         seed: Optional[int], cfg: float, tau: float, top_k: int, top_p: float, pn: Optional[str], aspect: str,
         tokenizer: Optional[Path], adapter_path: Optional[Path], batch_size: Optional[int],
         assistant_prefix: Optional[str]) -> None:
    from vargpt_mlx import files, options

    text = prompt.replace("<image>", "") if mode == "edit" else prompt
    if not text.strip():
        fail("empty prompt")
    model = need_model(model)

    def check():  # light checks first: nothing heavy is imported for a rejected option
        if not 1 <= n <= options.MAX_IMAGES:
            raise UserError(f"--n must be in 1..{options.MAX_IMAGES}, got {n}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        options.check_sampling(seed=seed if seed is not None else 0, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
        options.normalize_pn(pn)
        options.check_aspect(check_aspect_option(aspect))
        if output.suffix.lower() != ".png":
            raise UserError(f"output {output} must be a .png file (settings are stored in PNG text chunks)")
        if adapter_path is not None and not adapter_path.is_dir():
            raise UserError(f"adapter path {adapter_path} does not exist or is not a directory")
        if tokenizer is not None and not tokenizer.is_dir():
            raise UserError(f"--tokenizer {tokenizer} is not a directory")
        if image is not None and not image.is_file():
            raise UserError(f"image file not found: {image}")
        paths = [output] if n == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(n)]
        for p in paths:
            files.check_new_file(p, "output")
        from vargpt_mlx import api
        from vargpt_mlx.image_processor import smart_resize

        paths = api.output_paths(output, n)
        api.check_output_paths(paths)
        settings = api.make_settings(seed=seed, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, pn=pn, aspect=aspect)
        if image is not None:  # fail on a bad input image before loading the model
            src = api.prepare_edit_image(image)
            smart_resize(src.height, src.width)
        return settings, paths

    settings, paths = guarded(check)
    from vargpt_mlx import api, schedules

    def setup():
        with err.status(f"loading {model}..."):
            return api.load(model, tokenizer=tokenizer, adapter_path=adapter_path)

    pipe = guarded(setup)
    pn_used = settings.pn or pipe.config.pn
    schedule = schedules.get_schedule(pn_used, settings.aspect)
    height, width = schedules.image_size(schedule)
    prefix = assistant_prefix if assistant_prefix is not None else (
        api.EDIT_ASSISTANT_PREFIX if mode == "edit" else "")
    out.print(f"[bold]{mode}[/]: {prompt}", highlight=False, soft_wrap=True)
    if image is not None:
        out.print(f"input image: {image}", highlight=False)
    out.print(f"model: {pipe.path}" + (f" + adapters {adapter_path}" if adapter_path else ""), highlight=False)
    out.print(f"size: {width}x{height} (pn {pn_used}, aspect {api.aspect_label(float(settings.aspect))}, "
              f"{len(schedule)} scales)", highlight=False)
    out.print(f"settings: cfg {settings.cfg:g}, tau {settings.tau:g}, top_k {settings.top_k}, "
              f"top_p {settings.top_p:g}, seed {settings.seed}"
              + (f" (image i: seed {settings.seed}+i)" if n > 1 else ""), highlight=False)
    if prefix:
        out.print(f"assistant prefix: {prefix!r}", highlight=False)

    groups = math.ceil(n / (batch_size or n))
    progress = _Progress(groups)
    opts = dict(n=n, seed=settings.seed, cfg=settings.cfg, tau=settings.tau, top_k=settings.top_k,
                top_p=settings.top_p, pn=settings.pn, aspect=settings.aspect, on_scale=progress,
                batch_size=batch_size, assistant_prefix=prefix)

    def draw():
        t0 = time.perf_counter()
        try:
            if mode == "edit":
                images = api.edit_image(pipe, image, prompt, **opts)
            else:
                images = api.generate_image(pipe, prompt, **opts)
        finally:
            progress.stop()
        dt = time.perf_counter() - t0
        for im, path in zip(images, paths):
            api.save_image(im, path)
            out.print(f"wrote {path} ({im.width}x{im.height}, seed {im.info['seed']})", highlight=False)
        per = f", {dt / n:.2f} s per image" if n > 1 else ""
        out.print(f"{n} image{'s' if n > 1 else ''} in {dt:.2f} s{per}", highlight=False)

    guarded(draw)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    model: Optional[str] = model_option(),
    output: Path = Drawing.output("image.png"),
    n: int = Drawing.n,
    seed: Optional[int] = Drawing.seed,
    cfg: float = Drawing.cfg,
    tau: float = Drawing.tau,
    top_k: int = Drawing.top_k,
    top_p: float = Drawing.top_p,
    pn: Optional[str] = Drawing.pn,
    aspect: str = Drawing.aspect,
    tokenizer: Optional[Path] = Loading.tokenizer,
    adapter_path: Optional[Path] = Loading.adapter_path,
    batch_size: Optional[int] = Drawing.batch_size,
    assistant_prefix: Optional[str] = Drawing.assistant_prefix("none"),
):
    """Draw images from a text prompt (text-to-image). The PNGs carry the prompt, seed and settings."""
    _run("generate", prompt, None, model, output, n, seed, cfg, tau, top_k, top_p, pn, aspect, tokenizer,
         adapter_path, batch_size, assistant_prefix)


@app.command()
def edit(
    prompt: str = typer.Argument(..., help="Edit instruction; '<image>' marks where the input image goes "
                                           "(default: after the text)."),
    image: Path = typer.Option(..., "--image", "-i", help="Input image (any PIL format; EXIF rotation applied)."),
    model: Optional[str] = model_option(),
    output: Path = Drawing.output("edited.png"),
    n: int = Drawing.n,
    seed: Optional[int] = Drawing.seed,
    cfg: float = Drawing.cfg,
    tau: float = Drawing.tau,
    top_k: int = Drawing.top_k,
    top_p: float = Drawing.top_p,
    pn: Optional[str] = Drawing.pn,
    aspect: str = Drawing.aspect,
    tokenizer: Optional[Path] = Loading.tokenizer,
    adapter_path: Optional[Path] = Loading.adapter_path,
    batch_size: Optional[int] = Drawing.batch_size,
    assistant_prefix: Optional[str] = Drawing.assistant_prefix("'The output image is: ', as in upstream's edit data"),
):
    """Edit an image as the prompt instructs (VARGPT-v1.1-edit). The PNGs carry the prompt, seed and settings."""
    _run("edit", prompt, image, model, output, n, seed, cfg, tau, top_k, top_p, pn, aspect, tokenizer,
         adapter_path, batch_size, assistant_prefix)
