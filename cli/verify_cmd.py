"""``vargpt-mlx verify``: parity against upstream reference outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import UserError, app, err, guarded, out


@app.command()
def verify(
    model: Path = typer.Option(..., "--model", "-m", help="Upstream checkpoint directory."),
    refs: Path = typer.Option(..., "--refs", help="Reference outputs: a refs*.safetensors file (refs.json must lie "
                                                  "beside it)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every check (family, name, max abs "
                                                                  "err, bound, result, rule, note) to this file."),
):
    """Compare a checkpoint with upstream PyTorch reference outputs, component by component."""
    def check():
        from vargpt_mlx.files import check_new_file, check_safetensors

        if not model.is_dir():
            raise UserError(f"model path {model} does not exist or is not a directory")
        check_safetensors(refs, "--refs")
        if not (refs.parent / "refs.json").is_file():
            raise UserError(f"--refs {refs}: no refs.json beside it ({refs.parent / 'refs.json'} does not exist)")
        if json_out is not None:
            check_new_file(json_out, "--json")

    guarded(check)  # before anything is loaded
    from vargpt_mlx.verify import Verifier, verify as run_verify

    def run():
        with err.status("verifying...") as status:
            return run_verify(model, refs, on_family=lambda f: status.update(f"verifying {Verifier.FAMILIES[f]}..."))

    results = guarded(run)
    table = Table(title=f"parity: {model} vs {refs.name} (image generation teacher-forced, and free-running)")
    for col in ("component", "reference", "max abs err", "bound", "result", "note"):
        table.add_column(col)
    n_fail = 0
    for fam, c in results:
        n_fail += not c.ok
        table.add_row(Verifier.FAMILIES[fam], c.name, f"{c.max_abs_err:.3g}", f"{c.bound:.3g}",
                      "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.note)
    Console(width=max(out.width, 150)).print(table)
    if json_out is not None:
        rows = [{"family": fam, "name": c.name, "max_abs_err": c.max_abs_err, "bound": c.bound, "ok": c.ok,
                 "kind": c.kind, "note": c.note} for fam, c in results]
        json_out.write_text(json.dumps(rows, indent=1) + "\n")
    out.print(f"{len(results) - n_fail} passed, {n_fail} failed")
    if n_fail or not results:
        raise typer.Exit(1)

