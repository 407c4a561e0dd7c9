"""Python API: ``load`` a model once, then chat, generate or edit with it.

    from vargpt_mlx import load
    pipe = load("path/or/VARGPT-family/VARGPT-v1.1")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .config import VARGPTConfig
from .hub import resolve_model_path
from .image_processor import ImageProcessor
from .loading import load_model
from .models.vargpt import VARGPT
from .tokenizer import check_token_ids, load_tokenizer


@dataclass
class Pipeline:
    """A loaded model with its tokenizer and image processor."""

    model: VARGPT
    tokenizer: object  # mlx_lm TokenizerWrapper
    processor: ImageProcessor
    path: Path

    @property
    def config(self) -> VARGPTConfig:
        return self.model.config


def load(model: str | Path, *, dtype: mx.Dtype | None = None, tokenizer: str | Path | None = None) -> Pipeline:
    """Load a checkpoint directory (upstream or converted) or a Hugging Face repo id.

    ``tokenizer``: a directory with tokenizer files, when the model directory has none.
    """
    path = resolve_model_path(model)
    m = load_model(path, dtype=dtype)
    tok = load_tokenizer(Path(tokenizer) if tokenizer else path,
                         eos_token_ids=[m.config.tokens.eos_token_id])
    check_token_ids(tok, m.config)
    return Pipeline(model=m, tokenizer=tok, processor=ImageProcessor.from_dir(path), path=path)
