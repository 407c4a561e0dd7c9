"""``vargpt-mlx convert`` and ``vargpt-mlx quantize``: write MLX model directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .app import UserError, app, err, guarded, out

_HELP_DTYPE = "Stored float dtype: float16, bfloat16 or float32 (default: as stored in the source)."
_HELP_SHARD = "Largest output shard, e.g. 5GB, 500MB (a bigger single tensor gets a shard of its own)."


def _quant_spec(quantize: bool, bits: Optional[int], group_size: Optional[int], quantize_all: bool):
    from ..convert.convert import QuantSpec

    if not (quantize or bits is not None or group_size is not None or quantize_all):
        return None
    return QuantSpec(bits=4 if bits is None else bits, group_size=64 if group_size is None else group_size,
                     scope="all" if quantize_all else "default")


def _light_checks(source: str, out_dir: Path, dtype: Optional[str], shard_size: str, tokenizer: Optional[Path],
                  quant: bool, bits: Optional[int], group_size: Optional[int]) -> None:
    """Every option, before MLX and the converter are imported."""
    from vargpt_mlx.files import check_output_dir

    from ..convert.options import check_dtype, check_quant, parse_size

    p = Path(source).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"source {source} is not a directory")
    check_output_dir(out_dir, "output directory")
    check_dtype(dtype)
    parse_size(shard_size)
    if tokenizer is not None and not tokenizer.is_dir():
        raise UserError(f"--tokenizer {tokenizer} is not a directory")
    if quant or bits is not None or group_size is not None:
        check_quant(4 if bits is None else bits, 64 if group_size is None else group_size)


def _run(plan_fn, out_dir: Path, force: bool):
    """Plan (validation, nothing written), then write with a progress bar over output bytes."""
    from ..convert.convert import human_bytes, write_conversion

    with err.status("checking the source..."):
        plan = guarded(plan_fn)
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    what = f"{plan.n_tensors} tensors, {human_bytes(plan.total_bytes)} in {len(plan.shards)} shard(s)"
    if plan.quant:
        what += f", {len(plan.quantized)} layers {plan.quant.bits}-bit (group {plan.quant.group_size})"
    err.print(f"{plan.source} ({human_bytes(plan.source_bytes)}) -> {out_dir}: {what}", highlight=False,
              soft_wrap=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("converting", total=plan.total_bytes)
        result = guarded(lambda: write_conversion(
            plan, out_dir, force=force, on_tensor=lambda name, n: progress.advance(task, n)))
    out.print(f"wrote {result.out_dir} ({result.n_tensors} tensors, {human_bytes(result.total_bytes)}, "
              f"{len(result.shards)} shard(s))", highlight=False, soft_wrap=True)


@app.command("convert")
def convert_command(
    source: str = typer.Argument(..., metavar="SOURCE", help="Upstream checkpoint directory or Hugging Face repo id "
                                           "(VARGPT-family/VARGPT-v1.1, VARGPT-family/VARGPT-v1.1-edit)."),
    out_dir: Path = typer.Option(..., "-o", "--output", "--out", metavar="OUT_DIR",
                                 help="Output MLX model directory (created; its parent must exist)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize (MLX affine, mlx-lm layout)."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Bits per weight: 2, 3, 4, 5, 6 or 8 "
                                                                 "(default 4; implies -q)."),
    q_group_size: Optional[int] = typer.Option(None, "--q-group-size", help="Quantization group size: 32, 64 "
                                                                            "or 128 (default 64; implies -q)."),
    quantize_all: bool = typer.Option(False, "--quantize-all", help="Also quantize lm_head, embed_tokens, the "
                                                                    "projectors and Infinity's small layers "
                                                                    "(implies -q)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=_HELP_DTYPE),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Take the tokenizer files from this "
                                                                       "directory (default: the source's)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help=_HELP_SHARD),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it holds an earlier conversion."),
):
    """Convert an upstream VARGPT-v1.1 checkpoint into an MLX model directory (optionally quantized)."""
    guarded(lambda: _light_checks(source, out_dir, dtype, shard_size, tokenizer, quantize or quantize_all, q_bits,
                                  q_group_size))
    from ..convert.convert import check_output_dir, local_source, plan_conversion

    spec = guarded(lambda: _quant_spec(quantize, q_bits, q_group_size, quantize_all))
    guarded(lambda: check_output_dir(out_dir, force, local_source(source)))  # before any download
    _run(lambda: plan_conversion(source, dtype=dtype, quant=spec, tokenizer=tokenizer, shard_bytes=shard_size),
         out_dir, force)


@app.command("quantize")
def quantize_command(
    source: str = typer.Argument(..., metavar="IN_MLX_DIR", help="A float MLX directory written by `vargpt-mlx convert`."),
    out_dir: Path = typer.Option(..., "-o", "--output", "--out", metavar="OUT_DIR",
                                 help="Output MLX model directory (created; its parent must exist)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight: 2, 3, 4, 5, 6 or 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size: 32, 64 or 128."),
    quantize_all: bool = typer.Option(False, "--quantize-all", help="Also quantize lm_head, embed_tokens, the "
                                                                    "projectors and Infinity's small layers."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=_HELP_DTYPE),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Take the tokenizer files from this "
                                                                       "directory (default: the source's)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help=_HELP_SHARD),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it holds an earlier conversion."),
):
    """Quantize a converted (float) MLX directory."""
    guarded(lambda: _light_checks(source, out_dir, dtype, shard_size, tokenizer, True, q_bits, q_group_size))
    from ..convert.convert import check_output_dir, local_source, plan_conversion

    spec = guarded(lambda: _quant_spec(True, q_bits, q_group_size, quantize_all))
    guarded(lambda: check_output_dir(out_dir, force, local_source(source)))
    _run(lambda: plan_conversion(source, dtype=dtype, quant=spec, tokenizer=tokenizer, shard_bytes=shard_size,
                                 expect="mlx"), out_dir, force)
