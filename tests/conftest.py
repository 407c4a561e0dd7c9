"""Shared pytest fixtures: the public parity bundle copied from upstream's reference run."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "public"
CKPT = FIXTURES / "checkpoint"
CKPT_BF16 = FIXTURES / "checkpoint_bf16"


@pytest.fixture(scope="session")
def refs() -> dict[str, np.ndarray]:
    """Every reference tensor of the upstream run, as numpy arrays."""
    return load_file(str(FIXTURES / "refs.safetensors"))


@pytest.fixture(scope="session")
def refs_info() -> dict:
    import json

    return json.loads((FIXTURES / "refs.json").read_text())


@pytest.fixture(scope="session")
def config():
    from vargpt_mlx.config import VARGPTConfig

    return VARGPTConfig.from_dir(CKPT)


@pytest.fixture(scope="session")
def raw_weights() -> dict[str, mx.array]:
    """The upstream float32 state dict, keys exactly as upstream wrote them."""
    return dict(mx.load(str(CKPT / "model.safetensors")))


def sub_weights(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    """Keys under ``prefix.`` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}


TINY_TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_tokenizer"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The fixture checkpoint plus the tiny tokenizer in one directory (as a released model has);
    a fresh copy per test module."""
    import shutil

    d = tmp_path_factory.mktemp("model") / "vargpt-tiny"
    d.mkdir()
    for src in list(CKPT.iterdir()) + list(TINY_TOKENIZER.iterdir()):
        shutil.copy(src, d / src.name)
    return d
