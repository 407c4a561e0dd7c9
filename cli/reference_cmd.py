"""``vargpt-mlx reference random|record``: the reference path (the original PyTorch code)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app as app_mod
from .app import app, check_aspect_option, err, fail, guarded, out

reference_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Reference outputs from the original VARGPT-v1.1 PyTorch code "
                                 "(needs the \\[reference] extra in the reference interpreter).")
app.add_typer(reference_app, name="reference")

_HELP_UPSTREAM = "Directory holding the original VARGPT-v1.1 code (vargpt_qwen_v1_1/, patching_utils/)."
_HELP_PYTHON = ("Interpreter with the \\[reference] extra (torch, transformers 4.46.x); default "
                "$VARGPT_REFERENCE_PYTHON, else this one.")


def _run(args: list[str], python: Optional[str], upstream: Path) -> dict:
    from vargpt_mlx.reference import ReferenceError, check_upstream, run_worker

    try:
        check_upstream(upstream)
        return run_worker(args, python=python, debug=app_mod._debug,
                          on_line=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))
    except ReferenceError as e:
        fail(str(e), e.code)


def _check_python(python: Optional[str]) -> None:
    import shutil

    if python is not None and not (Path(python).is_file() or shutil.which(python)):
        fail(f"--python {python} does not exist")


@reference_app.command("random")
def random_cmd(
    upstream: Path = typer.Option(..., "--upstream", help=_HELP_UPSTREAM),
    sizes: str = typer.Option(..., "--sizes", help="Preset (tiny, 025m, real) and/or key=value overrides, "
                                                   "e.g. 'tiny,llm_kv_heads=1,llm_dim=96,mrope=4:4:4'."),
    seed: int = typer.Option(0, "--seed", help="Seed of every weight."),
    out_dir: Path = typer.Option(..., "-o", "--output", "--out",
                                 help="Checkpoint directory to write (new or empty; its parent must exist)."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32 or bfloat16."),
    python: Optional[str] = typer.Option(None, "--python", help=_HELP_PYTHON),
):
    """A random-weight upstream checkpoint of any size (save_pretrained + tiny_arch.json sidecar)."""
    from vargpt_mlx.reference.sizes import SizeError, parse_sizes

    try:
        parse_sizes(sizes)
    except SizeError as e:
        fail(str(e))
    if dtype not in ("float32", "bfloat16"):
        fail(f"--dtype must be float32 or bfloat16, got {dtype}")
    if not 0 <= seed < 2**63:
        fail(f"--seed must be in [0, 2**63), got {seed}")
    _check_python(python)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        fail(f"output directory {out_dir} exists and is not empty")
    from vargpt_mlx.files import check_output_dir

    guarded(lambda: check_output_dir(out_dir, "--output"))
    res = _run(["random", "--upstream", str(upstream), "--sizes", sizes, "--seed", str(seed),
                "--out", str(out_dir), "--dtype", dtype], python, upstream)
    out.print(f"wrote {res.get('out')} ({res.get('parameters', 0):,} parameters, {dtype}, seed {seed})",
              highlight=False)


@reference_app.command("record")
def record_cmd(
    upstream: Path = typer.Option(..., "--upstream", help=_HELP_UPSTREAM),
    model: str = typer.Option(..., "--model", "-m", help="Upstream checkpoint: a local directory or a hub repo id."),
    out_dir: Optional[Path] = typer.Option(None, "-o", "--output", "--out",
                                           help="Folder for refs.safetensors + refs.json (its parent must exist)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="Reference compute dtype: float32 or bfloat16."),
    image: Optional[Path] = typer.Option(None, "--image", help="Understanding image (also the VAE / training "
                                                               "image, resized and cropped)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (needs tokenizer files)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer files when the checkpoint has none."),
    seed: int = typer.Option(0, "--seed", help="Seed of every synthetic input."),
    aspect: str = typer.Option("1:1", "--aspect", help="Generation aspect W:H (upstream only draws 1:1; "
                                                       "others use its schedule table)."),
    inputs_from: Optional[Path] = typer.Option(None, "--inputs-from", help="Take the inputs of an existing "
                                                                           "bundle (its refs.safetensors)."),
    rerun: str = typer.Option("auto", "--rerun", help="Measure the reference's own rounding distance by a "
                                                      "higher-precision rerun: auto (< 2e9 parameters), on, off."),
    annotate: Optional[Path] = typer.Option(None, "--annotate", help="Instead of recording, add the rounding "
                                                                     "distance of an existing refs file to its "
                                                                     "refs.json (tensors unchanged)."),
    python: Optional[str] = typer.Option(None, "--python", help=_HELP_PYTHON),
):
    """Run the original code on a checkpoint and write the reference bundle `verify` reads."""
    from vargpt_mlx.schedules import resolve_aspect

    if out_dir is None and annotate is None:
        fail("--output is required (or --annotate REFS_FILE)")
    if out_dir is not None:
        from vargpt_mlx.files import check_output_dir

        guarded(lambda: check_output_dir(out_dir, "--output"))
    if not 0 <= seed < 2**63:
        fail(f"--seed must be in [0, 2**63), got {seed}")
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device}")
    if dtype not in ("float32", "bfloat16"):
        fail(f"--dtype must be float32 or bfloat16, got {dtype}")
    if rerun not in ("auto", "on", "off"):
        fail(f"--rerun must be auto, on or off, got {rerun}")
    if image is not None and not image.is_file():
        fail(f"image {image} does not exist")
    if prompt is not None and not prompt.strip():
        fail("--prompt is empty")
    if tokenizer is not None and not tokenizer.is_dir():
        fail(f"--tokenizer {tokenizer} is not a directory")
    from vargpt_mlx.files import check_safetensors
    from vargpt_mlx.image_processor import load_image

    for opt, f in (("--inputs-from", inputs_from), ("--annotate", annotate)):
        if f is not None:
            guarded(lambda: check_safetensors(f, opt))
    if image is not None:
        guarded(lambda: load_image(image))
    _check_python(python)
    h_div_w = guarded(lambda: resolve_aspect(check_aspect_option(aspect)))
    args = ["record", "--upstream", str(upstream), "--model", model, "--device", device, "--dtype", dtype,
            "--seed", str(seed), "--aspect", repr(h_div_w), "--rerun", rerun]
    for flag, val in (("--out", out_dir), ("--image", image), ("--prompt", prompt), ("--tokenizer", tokenizer),
                      ("--inputs-from", inputs_from), ("--annotate", annotate)):
        if val is not None:
            args += [flag, str(val)]
    res = _run(args, python, upstream)
    if annotate is not None:
        out.print(f"added the rounding distance of {res.get('tensors')} tensors of {annotate} to its refs.json",
                  highlight=False)
    else:
        out.print(f"wrote {res.get('tensors')} reference tensors to {res.get('out')} in {res.get('seconds')} s",
                  highlight=False)
