"""``vargpt-mlx train sft|dpo`` (LoRA fine-tuning) and ``vargpt-mlx fuse``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from vargpt_mlx.training.callbacks import StepInfo, TrainingCallback

from .app import UserError, app, check_aspect_option, err, fail, guarded, model_option, need_model, out
from .options import Loading, Training

train_app = typer.Typer(no_args_is_help=True,
                        help="Fine-tune (LoRA or full, SFT or DPO); train the nano model from scratch.")
app.add_typer(train_app, name="train")



def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _ProgressCallback(TrainingCallback):
    """The training bar (loss, metrics, speed, memory, ETA), ``train_log.jsonl``, and a line per
    save and per evaluation."""

    def __init__(self, progress: Progress, bar, log_file: Path, adapter_path: Path):
        self.progress, self.bar, self.log_file, self.adapter_path = progress, bar, log_file, adapter_path

    def on_step(self, s: StepInfo) -> None:
        extra = " ".join(f"{k} {v:.3f}" for k, v in s.metrics.items())
        self.progress.update(self.bar, completed=s.step, info=(
            f"loss {s.loss:.4f} {extra} | {s.tokens_per_sec:,.0f} tok/s | peak {s.peak_memory_gb:.2f} GB | "
            f"ETA {_fmt_time(s.eta)}"))
        with open(self.log_file, "a") as f:
            f.write(json.dumps({"step": s.step, "loss": s.loss, **s.metrics, "tokens_per_sec": s.tokens_per_sec,
                                "peak_memory_gb": s.peak_memory_gb, "time": time.time()}) + "\n")

    def on_save(self, step: int) -> None:
        self.progress.console.print(f"step {step}: saved adapters to {self.adapter_path}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.console.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _model_arg(model: Optional[str]) -> str:
    return need_model(model or os.environ.get("VARGPT_MODEL"))


def _run(kind: str, *, model: Optional[str], tokenizer: Optional[Path], data: Path, val_data: Optional[Path],
         adapter_path: Path, resume: bool, overwrite: bool, explicit: dict, options: dict, pn: Optional[str],
         gen_aspect: Optional[str], fine_tune_type: str = "lora"):
    from vargpt_mlx.api import load
    from vargpt_mlx.hub import resolve_model_path
    from vargpt_mlx.image_processor import ImageProcessor
    from vargpt_mlx.training import lora as lora_mod
    from vargpt_mlx.training import run, trainer
    from vargpt_mlx.training.data import file_digest

    model = _model_arg(model)
    defaults_args = trainer.TrainArgs()
    defaults_lora = lora_mod.LoraConfig()
    # options the user set explicitly (None = not given)
    given = {k: v for k, v in explicit.items() if v is not None}
    targets = tuple(t.strip() for t in given.pop("targets").split(",") if t.strip()) if "targets" in given else None
    lora_kw = {"rank": given.get("lora_rank", defaults_lora.rank), "scale": given.get("lora_scale", defaults_lora.scale),
               "dropout": given.get("lora_dropout", defaults_lora.dropout),
               "num_layers": given.get("lora_layers", defaults_lora.num_layers),
               "targets": targets or defaults_lora.targets, "mlp": given.get("lora_mlp", defaults_lora.mlp)}
    lora_explicit = {f for f, o in (("rank", "lora_rank"), ("scale", "lora_scale"), ("dropout", "lora_dropout"),
                                    ("num_layers", "lora_layers"), ("mlp", "lora_mlp")) if o in given}
    if targets is not None:
        lora_explicit.add("targets")
    arg_kw = dict(options)
    for k in ("batch_size", "grad_accum", "seed", "text_loss", "beta", "dpo_loss", "optimizer", "bit_flip"):
        arg_kw[k] = given.get(k, getattr(defaults_args, k))
    args = trainer.TrainArgs(**arg_kw)
    lora_cfg = lora_mod.LoraConfig(**lora_kw, fine_tune_type=fine_tune_type)

    def setup():
        nonlocal args, lora_cfg
        if resume and not run.has_checkpoint(adapter_path):
            fail(f"--resume: no training checkpoint in {adapter_path}")
        if not resume and run.has_checkpoint(adapter_path) and not overwrite:
            fail(f"{adapter_path} already holds a training checkpoint; pass --resume to continue it "
                 "or --overwrite to start over")
        start = 0
        if resume:
            explicit_names = set(lora_explicit) | {k for k in given if k in run.FIXED_ON_RESUME}
            args, lora_cfg, start = run.resume_settings(adapter_path, kind, args, lora_cfg, explicit_names)
        for t in lora_cfg.targets:
            lora_mod._stack_keys(t, lora_cfg.mlp)
        path = resolve_model_path(model)
        processor = ImageProcessor.from_dir(path)
        with err.status("validating data..."):
            validate = run.validate_sft if kind == "sft" else run.validate_preferences
            records = validate(data, processor)
            val_records = validate(val_data, processor) if val_data else None
        with err.status(f"loading {model}..."):
            pipe = load(path, tokenizer=tokenizer)
        err.print(f"data: {len(records)} records in {data}" + (f", {len(val_records)} in {val_data}" if val_records else ""),
                  markup=False, highlight=False)
        return pipe, records, val_records, start

    pipe, records, val_records, start = guarded(setup)
    if resume:
        err.print(f"resuming from step {start} of {adapter_path}")

    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err, transient=False)

    def prepare():
        with progress:
            t = progress.add_task("encoding targets", total=None, info="")

            def on_progress(done, total):
                progress.update(t, completed=done, total=total)

            if kind == "sft":
                task = run.sft_task(pipe, records, val_records, text_loss=args.text_loss, pn=pn,
                                    gen_aspect=gen_aspect, on_progress=on_progress, bit_flip=args.bit_flip,
                                    seed=args.seed)
            else:
                task = run.dpo_task(pipe, records, val_records, beta=args.beta, loss_type=args.dpo_loss, pn=pn,
                                    gen_aspect=gen_aspect, on_progress=on_progress,
                                    split_backward=args.grad_checkpoint)
            if not progress.tasks[0].total:
                progress.update(t, completed=1, total=1, info="none")
            if lora_cfg.full:  # every weight but the VAE's (frozen, as upstream trains)
                pipe.model.unfreeze()
                pipe.model.vae_local.freeze()
                cfg = lora_cfg
            else:
                cfg = lora_mod.apply_lora(pipe.model, lora_cfg, seed=args.seed)
            if kind == "dpo":
                r = progress.add_task("reference log-probs", total=None, info="adapters disabled")
                task.prepare_reference(pipe.model, lambda d, n: progress.update(r, completed=d, total=n))
        return task, cfg

    task, cfg = guarded(prepare)
    from mlx.utils import tree_flatten

    n_train = sum(v.size for _, v in tree_flatten(pipe.model.trainable_parameters()))
    n_all = sum(v.size for _, v in tree_flatten(pipe.model.parameters()))
    if cfg.full:
        err.print(f"full fine-tuning: trainable {n_train / 1e6:.3f}M of {n_all / 1e6:.1f}M parameters (VAE frozen)")
    else:
        err.print(f"LoRA: rank {cfg.rank}, scale {cfg.scale}, {len(cfg.modules)} layers on {','.join(cfg.targets)}; "
                  f"trainable {n_train / 1e6:.3f}M of {n_all / 1e6:.1f}M parameters")
    adapter_path.mkdir(exist_ok=True)  # its parent was checked before loading
    log_file = adapter_path / "train_log.jsonl"
    if not resume and log_file.exists():
        log_file.unlink()
    elif resume and log_file.exists():  # drop the steps logged after the checkpoint (they are redone)
        kept = [line for line in log_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start]
        log_file.write_text("".join(line + "\n" for line in kept))
    meta = {"kind": kind, "data": str(data), "data_digest": file_digest(data), "model": str(model),
            "info": {"kind": kind, "data": str(data), "base_model": str(model)}}
    if resume:
        from vargpt_mlx.training.trainer import read_checkpoint

        state, _, _ = read_checkpoint(adapter_path)
        if state.get("data_digest") not in (None, meta["data_digest"]):
            err.print(f"[yellow]warning:[/] {data} changed since the checkpoint was written")

    train_progress = Progress(SpinnerColumn(), TextColumn(f"[bold]{kind}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), console=err)

    def do_train():
        from vargpt_mlx.training.trainer import TrainingDiverged

        try:
            return trainer.train(pipe.model, task, args, adapter_path, cfg, resume=resume, meta=meta,
                                 callback=_ProgressCallback(train_progress, bar, log_file, adapter_path))
        except TrainingDiverged as e:
            train_progress.stop()
            fail(str(e), 1)

    with train_progress:
        bar = train_progress.add_task(kind, total=args.iters, completed=start, info="")
        result = guarded(do_train)
    out.print(f"done: {result.steps} steps, final loss {result.last_loss:.4f}; adapters in {adapter_path}")


def _check_inputs(kind: str, e: dict, kw: dict) -> None:
    """Every option and path of ``train sft|dpo``, before anything is loaded or written."""
    import math

    from vargpt_mlx.files import check_input_file, check_output_dir
    from vargpt_mlx.options import check_aspect, normalize_pn

    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    def finite(x) -> bool:
        return x is not None and math.isfinite(x)

    need(finite(kw["learning_rate"]) and kw["learning_rate"] > 0, "--learning-rate must be a finite number > 0")
    need(kw["iters"] >= 1, "--iters must be >= 1")
    need(e["seed"] is None or 0 <= e["seed"] < 2**63, f"--seed must be in [0, 2**63), got {e['seed']}")
    need(kw.get("fine_tune_type", "lora") in ("lora", "full"),
         f"--fine-tune-type must be lora or full, not {kw.get('fine_tune_type')!r}")
    for opt, key in (("--batch-size", "batch_size"), ("--grad-accum", "grad_accum"), ("--lora-rank", "lora_rank")):
        need(e[key] is None or e[key] >= 1, f"{opt} must be >= 1, got {e[key]}")
    need(kw["save_every"] >= 1, f"--save-every must be >= 1, got {kw['save_every']}")
    need(kw["steps_per_eval"] >= 1, f"--steps-per-eval must be >= 1, got {kw['steps_per_eval']}")
    need(kw["val_batches"] == -1 or kw["val_batches"] >= 1, "--val-batches must be -1 (all) or >= 1")
    need(finite(kw["weight_decay"]) and kw["weight_decay"] >= 0, "--weight-decay must be a finite number >= 0")
    need(e["lora_scale"] is None or (finite(e["lora_scale"]) and e["lora_scale"] > 0),
         "--lora-scale must be a finite number > 0")
    need(e["lora_dropout"] is None or (finite(e["lora_dropout"]) and 0 <= e["lora_dropout"] < 1),
         "--lora-dropout must be in [0, 1)")
    need(e["lora_layers"] is None or e["lora_layers"] == -1 or e["lora_layers"] >= 1,
         "--lora-layers must be -1 (all) or >= 1")
    need(e["optimizer"] is None or e["optimizer"] in ("adam", "adamw"), "--optimizer must be adam or adamw")
    if e["targets"] is not None:
        names = [t.strip() for t in e["targets"].split(",") if t.strip()]
        bad = [t for t in names if t not in ("llm", "infinity", "vision")]
        need(bool(names) and not bad, f"--targets must be a comma list of llm, infinity, vision, not {e['targets']!r}")
    need(e["beta"] is None or (finite(e["beta"]) and e["beta"] > 0), "--beta must be a finite number > 0")
    need(e["dpo_loss"] is None or e["dpo_loss"] in ("sigmoid", "ipo"), "--loss must be sigmoid or ipo")
    need(e["text_loss"] is None or e["text_loss"] in ("upstream", "assistant"),
         "--text-loss must be upstream or assistant")
    need(e["bit_flip"] is None or (finite(e["bit_flip"]) and 0 <= e["bit_flip"] <= 1), "--bit-flip must be in [0, 1]")
    if kw.get("pn") is not None:
        normalize_pn(kw["pn"])
    check_aspect_option(kw.get("gen_aspect"), "--gen-aspect")
    if kw.get("gen_aspect") is not None:
        check_aspect(kw["gen_aspect"])
    check_input_file(kw["data"], "--data")
    if kw.get("val_data") is not None:
        check_input_file(kw["val_data"], "--val-data")
    if kw.get("tokenizer") is not None:
        need(kw["tokenizer"].is_dir(), f"--tokenizer {kw['tokenizer']} is not a directory")
    adapter_path = kw["adapter_path"]
    if kw.get("resume"):
        need(adapter_path.is_dir(), f"--resume: no training checkpoint in {adapter_path} (it does not exist)")
    check_output_dir(adapter_path, "--adapter-path")
    _model_arg(kw.get("model"))


def _common(kind: str, **kw):
    explicit_keys = ("batch_size", "grad_accum", "seed", "lora_rank", "lora_scale", "lora_dropout", "lora_layers",
                     "targets", "lora_mlp", "optimizer", "text_loss", "beta", "dpo_loss", "bit_flip")
    explicit = {k: kw.pop(k, None) for k in explicit_keys}
    guarded(lambda: _check_inputs(kind, explicit, kw))
    options = {"iters": kw.pop("iters"), "learning_rate": kw.pop("learning_rate"), "save_every": kw.pop("save_every"),
               "steps_per_eval": kw.pop("steps_per_eval"), "val_batches": kw.pop("val_batches"),
               "grad_checkpoint": kw.pop("grad_checkpoint"), "weight_decay": kw.pop("weight_decay")}
    _run(kind, explicit=explicit, options=options, **kw)


_O = typer.Option
T = Training


@train_app.command("sft")
def sft(
    data: Path = _O(..., "--data", help="Training data: sharegpt JSON (messages + images)."),
    adapter_path: Path = T.adapter_path,
    fine_tune_type: str = T.fine_tune_type,
    model: Optional[str] = model_option(),
    tokenizer: Optional[Path] = Loading.tokenizer,
    val_data: Optional[Path] = _O(None, "--val-data", help="Validation data (same format)."),
    iters: int = T.iters,
    batch_size: Optional[int] = T.batch_size("Samples"),
    grad_accum: Optional[int] = T.grad_accum,
    learning_rate: float = T.learning_rate,
    optimizer: Optional[str] = T.optimizer,
    weight_decay: float = T.weight_decay,
    lora_rank: Optional[int] = T.lora_rank,
    lora_scale: Optional[float] = T.lora_scale,
    lora_dropout: Optional[float] = T.lora_dropout,
    lora_layers: Optional[int] = T.lora_layers,
    targets: Optional[str] = T.targets,
    lora_mlp: Optional[bool] = T.lora_mlp,
    grad_checkpoint: bool = T.grad_checkpoint(),
    steps_per_eval: int = T.steps_per_eval,
    val_batches: int = T.val_batches,
    save_every: int = T.save_every,
    seed: Optional[int] = T.seed,
    resume: bool = T.resume,
    overwrite: bool = T.overwrite,
    text_loss: Optional[str] = _O(None, "--text-loss",
                                  help="upstream (t2i text CE counts prompt tokens, as upstream) or assistant (default upstream)."),
    bit_flip: Optional[float] = _O(None, "--bit-flip",
                                   help="Bitwise self-correction strength for image targets; upstream trains "
                                        "with 0.3 (default 0: fixed targets)."),
    pn: Optional[str] = T.pn("generation targets"),
    gen_aspect: Optional[str] = T.gen_aspect("generation targets"),
):
    """LoRA supervised fine-tuning (text CE + 3.0 x bit CE for image targets)."""
    _common("sft", **locals())


@train_app.command("dpo")
def dpo(
    data: Path = _O(..., "--data", help="Preference data: prompt/messages + chosen + rejected."),
    adapter_path: Path = T.adapter_path,
    fine_tune_type: str = T.fine_tune_type,
    model: Optional[str] = model_option(),
    tokenizer: Optional[Path] = Loading.tokenizer,
    val_data: Optional[Path] = _O(None, "--val-data", help="Validation preference data."),
    beta: Optional[float] = _O(None, "--beta", help="DPO beta: strength of the pull towards the reference (default 0.1)."),
    dpo_loss: Optional[str] = _O(None, "--loss", help="sigmoid or ipo (default sigmoid)."),
    iters: int = T.iters,
    batch_size: Optional[int] = T.batch_size("Pairs"),
    grad_accum: Optional[int] = T.grad_accum,
    learning_rate: float = T.learning_rate,
    optimizer: Optional[str] = T.optimizer,
    weight_decay: float = T.weight_decay,
    lora_rank: Optional[int] = T.lora_rank,
    lora_scale: Optional[float] = T.lora_scale,
    lora_dropout: Optional[float] = T.lora_dropout,
    lora_layers: Optional[int] = T.lora_layers,
    targets: Optional[str] = T.targets,
    lora_mlp: Optional[bool] = T.lora_mlp,
    grad_checkpoint: bool = T.grad_checkpoint(", back-propagate one response at a time"),
    steps_per_eval: int = T.steps_per_eval,
    val_batches: int = T.val_batches,
    save_every: int = T.save_every,
    seed: Optional[int] = T.seed,
    resume: bool = T.resume,
    overwrite: bool = T.overwrite,
    pn: Optional[str] = T.pn("image preferences"),
    gen_aspect: Optional[str] = T.gen_aspect("image preferences"),
):
    """LoRA DPO: reference = the base with adapters disabled (log-probs computed once)."""
    _common("dpo", text_loss=None, bit_flip=None, **locals())


@app.command()
def fuse(
    adapter_path: Path = _O(..., "--adapter-path", help="Adapters written by `train`."),
    output: Path = _O(..., "-o", "--output", help="Output model directory (created; its parent must exist)."),
    model: Optional[str] = model_option(),
    tokenizer: Optional[Path] = _O(None, "--tokenizer", help="Tokenizer files to copy (when the model has none)."),
    de_quantize: bool = _O(False, "--de-quantize", help="Write a float model even if the base is quantized."),
    force: bool = _O(False, "--force", help="Replace an existing output directory."),
):
    """Merge LoRA adapters into the base weights: a standalone MLX model directory."""
    model = _model_arg(model)

    def check():
        from vargpt_mlx.files import check_output_dir

        if not adapter_path.is_dir():
            raise UserError(f"adapter path {adapter_path} does not exist or is not a directory")
        if tokenizer is not None and not tokenizer.is_dir():
            raise UserError(f"--tokenizer {tokenizer} is not a directory")
        if output.exists() and not force:
            raise UserError(f"{output} already exists (pass --force to replace it)")
        check_output_dir(output, "--output")

    guarded(check)
    from vargpt_mlx.hub import resolve_model_path
    from vargpt_mlx.training.fuse import fuse_to_dir

    def run():
        with err.status(f"fusing {adapter_path} into {model}..."):
            return fuse_to_dir(resolve_model_path(model), adapter_path, output, de_quantize=de_quantize,
                               tokenizer_dir=tokenizer, force=force)

    path = guarded(run)
    out.print(f"fused model written to {path}")


@train_app.command("nano")
def nano(
    out_dir: Path = _O(..., "-o", "--output", "--out",
                       help="Working directory: data, stage checkpoints, models, eval.json (created; its parent "
                            "must exist)."),
    ship: bool = _O(False, "--ship", help="Install the result as the package's --model nano."),
    smoke: bool = _O(False, "--smoke", help="A few steps of every stage (checks that the recipe runs)."),
    stop_after: Optional[str] = _O(None, "--stop-after", help="Stop after this stage: data, vae, vision, sft or dpo."),
):
    """Train the nano model from scratch (data, VAE, SFT, DPO, eval); rerun to resume."""
    from vargpt_mlx.files import check_output_dir

    guarded(lambda: check_output_dir(out_dir, "--output"))  # before the (heavy) recipe is imported
    from vargpt_mlx.hub import NANO_DIR
    from vargpt_mlx.nano import recipe

    if stop_after is not None and stop_after not in recipe.STAGES[:5]:
        fail(f"--stop-after must be one of {', '.join(recipe.STAGES[:5])}")

    def log(msg: str):
        err.print(msg, markup=False, highlight=False, soft_wrap=True)

    args = recipe.smoke_args() if smoke else recipe.full_args()
    guarded(lambda: recipe.run_recipe(out_dir, args=args, ship_to=NANO_DIR if ship else None, log=log,
                                      stop_after=stop_after))
