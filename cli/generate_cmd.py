"""``vargpt-mlx generate`` and ``vargpt-mlx edit``: draw images (a thin layer over ``vargpt_mlx.api``)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer

from .app import UserError, app, check_aspect_option, err, fail, guarded, model_option, need_model, out


def _model_opt():
    return model_option()


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
    model: Optional[str] = _model_opt(),
    output: Path = typer.Option(Path("image.png"), "--output", "-o",
                                help="PNG to write; with --n > 1: OUT_0.png, OUT_1.png, ... The directory "
                                     "must exist."),
    n: int = typer.Option(1, "--n", "-n", help="Number of images (one prompt prefill, drawn as a batch)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed; image i uses seed+i (default: random, printed)."),
    cfg: float = typer.Option(3.0, "--cfg", help="Classifier-free guidance scale (upstream: 3)."),
    tau: float = typer.Option(0.5, "--tau", help="Temperature of the bit logits (upstream: 0.5)."),
    top_k: int = typer.Option(900, "--top-k", help="Top-k per bit (upstream: 900, a no-op on two choices)."),
    top_p: float = typer.Option(0.97, "--top-p", help="Top-p per bit (upstream: 0.97)."),
    pn: Optional[str] = typer.Option(None, "--pn", help="Resolution: 0.016M (nano), 0.06M, 0.25M, 0.60M or 1M "
                                                        "(default: the checkpoint's, 0.25M = 512x512)."),
    aspect: str = typer.Option("1:1", "--aspect", help="Width:height (W:H), e.g. 1:1, 4:3, 16:9, 9:16; snapped to the "
                                                       "nearest of 15 ratios from 3:1 to 1:3."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="Directory with the tokenizer files, if the model has none."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA adapters to apply."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size",
                                             help="Images drawn together (default: all --n; less uses less memory)."),
    assistant_prefix: Optional[str] = typer.Option(
        None, "--assistant-prefix", help="Text the answer starts with before <|image_gen_start|> (default: none)."),
):
    """Draw images from a text prompt (text-to-image). The PNGs carry the prompt, seed and settings."""
    _run("generate", prompt, None, model, output, n, seed, cfg, tau, top_k, top_p, pn, aspect, tokenizer,
         adapter_path, batch_size, assistant_prefix)


@app.command()
def edit(
    prompt: str = typer.Argument(..., help="Edit instruction; '<image>' marks where the input image goes "
                                           "(default: after the text)."),
    image: Path = typer.Option(..., "--image", "-i", help="Input image (any PIL format; EXIF rotation applied)."),
    model: Optional[str] = _model_opt(),
    output: Path = typer.Option(Path("edited.png"), "--output", "-o",
                                help="PNG to write; with --n > 1: OUT_0.png, OUT_1.png, ... The directory "
                                     "must exist."),
    n: int = typer.Option(1, "--n", "-n", help="Number of images (one prompt prefill, drawn as a batch)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed; image i uses seed+i (default: random, printed)."),
    cfg: float = typer.Option(3.0, "--cfg", help="Classifier-free guidance scale (upstream: 3)."),
    tau: float = typer.Option(0.5, "--tau", help="Temperature of the bit logits (upstream: 0.5)."),
    top_k: int = typer.Option(900, "--top-k", help="Top-k per bit (upstream: 900, a no-op on two choices)."),
    top_p: float = typer.Option(0.97, "--top-p", help="Top-p per bit (upstream: 0.97)."),
    pn: Optional[str] = typer.Option(None, "--pn", help="Resolution: 0.016M (nano), 0.06M, 0.25M, 0.60M or 1M "
                                                        "(default: the checkpoint's, 0.25M = 512x512)."),
    aspect: str = typer.Option("1:1", "--aspect", help="Width:height (W:H) of the output, e.g. 1:1, 4:3, 16:9."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="Directory with the tokenizer files, if the model has none."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA adapters to apply."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size",
                                             help="Images drawn together (default: all --n; less uses less memory)."),
    assistant_prefix: Optional[str] = typer.Option(
        None, "--assistant-prefix",
        help="Text the answer starts with before <|image_gen_start|> (default: 'The output image is: ', "
             "as in upstream's edit data)."),
):
    """Edit an image as the prompt instructs (VARGPT-v1.1-edit). The PNGs carry the prompt, seed and settings."""
    _run("edit", prompt, image, model, output, n, seed, cfg, tau, top_k, top_p, pn, aspect, tokenizer,
         adapter_path, batch_size, assistant_prefix)
