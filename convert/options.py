"""The converter's options, checked without importing MLX (the command line checks them first)."""

from __future__ import annotations

import re

from vargpt_mlx.errors import InputError


class ConvertError(InputError):
    """A conversion that cannot be done (bad source, bad options, unsafe output directory)."""


DEFAULT_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
DTYPE_NAMES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32")
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def check_dtype(name: str | None) -> None:
    if name is not None and name.lower() not in DTYPE_NAMES:
        raise ConvertError(f"--dtype must be float16, bfloat16 or float32, got {name!r}")


def check_quant(bits: int, group_size: int, scope: str = "default") -> None:
    if bits not in Q_BITS:
        raise ConvertError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, got {bits}")
    if group_size not in Q_GROUP_SIZES:
        raise ConvertError(f"--q-group-size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, got {group_size}")
    if scope not in ("default", "all"):
        raise ConvertError(f"quantization scope must be 'default' or 'all', got {scope!r}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> bytes (K/M/G/T are powers of 1024, as mlx-lm's shard limit); plain ints are bytes."""
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ConvertError(f"cannot read size {text!r} (examples: 5GB, 500MB, 1048576)")
        n = int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))
    if n <= 0:
        raise ConvertError(f"size must be positive, got {text!r}")
    return n


__all__ = ["ConvertError", "DEFAULT_SHARD_BYTES", "DTYPE_NAMES", "Q_BITS", "Q_GROUP_SIZES", "check_dtype", "check_quant",
           "parse_size"]
