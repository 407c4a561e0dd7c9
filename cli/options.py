"""Options that several commands share, each defined once with its default and help (mflux-style
option groups). A command takes a group's option as its parameter's default, e.g.
``cfg: float = Drawing.cfg``; typer only reads these definitions, so one serves every command.
"""

from __future__ import annotations

from pathlib import Path

import typer

_O = typer.Option


class Loading:
    """How the model is loaded: ``generate``, ``edit``, ``chat``, ``serve``, ``train sft|dpo``."""

    tokenizer = _O(None, "--tokenizer", help="Directory with the tokenizer files, if the model has none.")
    adapter_path = _O(None, "--adapter-path", help="LoRA adapters to apply.")  # not train's: that is its output


class Drawing:
    """How images are drawn: ``generate`` and ``edit``."""

    n = _O(1, "--n", "-n", help="Number of images (one prompt prefill, drawn as a batch).")
    seed = _O(None, "--seed", help="Seed; image i uses seed+i (default: random, printed).")
    cfg = _O(3.0, "--cfg", help="Classifier-free guidance scale (upstream: 3).")
    tau = _O(0.5, "--tau", help="Temperature of the bit logits (upstream: 0.5).")
    top_k = _O(900, "--top-k", help="Top-k per bit (upstream: 900, a no-op on two choices).")
    top_p = _O(0.97, "--top-p", help="Top-p per bit (upstream: 0.97).")
    pn = _O(None, "--pn", help="Resolution: 0.016M (nano), 0.06M, 0.25M, 0.60M or 1M (default: the checkpoint's, "
                               "0.25M = 512x512).")
    aspect = _O("1:1", "--aspect", help="Width:height (W:H), e.g. 1:1, 4:3, 16:9, 9:16; snapped to the nearest of 15 "
                                        "ratios from 3:1 to 1:3.")
    batch_size = _O(None, "--batch-size", help="Images drawn together (default: all --n; less uses less memory).")

    @staticmethod
    def output(default: str):
        return _O(Path(default), "--output", "-o", help="PNG to write; with --n > 1: OUT_0.png, OUT_1.png, ... The "
                                                        "directory must exist.")

    @staticmethod
    def assistant_prefix(default_help: str):
        return _O(None, "--assistant-prefix",
                  help=f"Text the answer starts with before <|image_gen_start|> (default: {default_help}).")


class Training:
    """``train sft`` and ``train dpo``. Options left at ``None`` take ``TrainArgs`` / ``LoraConfig``'s
    defaults (named in the help), so that ``--resume`` can tell which ones the user set."""

    adapter_path = _O(..., "--adapter-path", help="Directory for adapters and checkpoints.")
    fine_tune_type = _O("lora", "--fine-tune-type", help="lora (adapters) or full (every weight but the VAE; "
                                                         "adapters.safetensors then holds all trained weights).")
    iters = _O(100, "--iters", help="Optimizer updates.")
    grad_accum = _O(None, "--grad-accum", help="Micro-batches per update (default 1).")
    learning_rate = _O(1e-5, "--learning-rate", "--lr", help="Learning rate (constant).")
    optimizer = _O(None, "--optimizer", help="adam or adamw (default adam).")
    weight_decay = _O(0.01, "--weight-decay", help="Weight decay (with --optimizer adamw).")
    lora_rank = _O(None, "--lora-rank", help="LoRA rank (default 8).")
    lora_scale = _O(None, "--lora-scale", help="LoRA scale: the update is scale x B A (default 20.0).")
    lora_dropout = _O(None, "--lora-dropout", help="Dropout on the LoRA input, in [0, 1) (default 0.0).")
    lora_layers = _O(None, "--lora-layers", help="Last N layers of each target stack, -1 all (default 16).")
    targets = _O(None, "--targets", help="Comma list of llm,infinity,vision (default llm,infinity).")
    lora_mlp = _O(None, "--lora-mlp/--no-lora-mlp", help="LoRA on LLM/vision MLPs too.")
    steps_per_eval = _O(200, "--steps-per-eval", help="Validation every N updates (with --val-data).")
    val_batches = _O(-1, "--val-batches", help="Validation batches per eval, -1 all.")
    save_every = _O(100, "--save-every", help="Checkpoint every N updates (and at the end).")
    seed = _O(None, "--seed", help="Seed of data order, LoRA init and dropout (default 0).")
    resume = _O(False, "--resume", help="Continue the checkpoint in --adapter-path.")
    overwrite = _O(False, "--overwrite", help="Start over even if --adapter-path holds a checkpoint.")

    @staticmethod
    def batch_size(items: str):
        return _O(None, "--batch-size", help=f"{items} per micro-batch (default 1).")

    @staticmethod
    def grad_checkpoint(more: str = ""):
        return _O(False, "--grad-checkpoint",
                  help=f"Save memory: recompute layers in backward, chunk long attention / MLPs{more}.")

    @staticmethod
    def pn(images: str):
        return _O(None, "--pn", help=f"Resolution of {images} (default: the model's).")

    @staticmethod
    def gen_aspect(images: str):
        return _O(None, "--gen-aspect", help=f"Aspect (W:H) of {images}, e.g. 1:1 (default: nearest to each image).")


__all__ = ["Drawing", "Loading", "Training"]
