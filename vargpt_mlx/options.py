"""User-facing generation options, validated: resolution, aspect, sampling values, image counts.

Light on purpose (no MLX import), so the command line checks every option before it loads
anything; ``vargpt_mlx.api`` re-exports these names.
"""

from __future__ import annotations

import math
import numbers
import secrets

from . import schedules
from .errors import InputError

ASPECT_RANGE = (0.3, 3.3)  # h/w accepted: the tabulated ratios run from 1:3 to 3:1
MAX_SEED = 2**63 - 1
MAX_IMAGES = 1000  # images per call (each is a file / a batch row)
MAX_REPLY_TOKENS = 32768  # the largest context of a VARGPT checkpoint (Qwen2-7B's max_position_embeddings)


def normalize_pn(pn: str | None) -> str | None:
    """``"0.25m"``, ``"0.6M"``, ``"1"`` ... -> the schedule key (``"0.25M"``, ``"0.60M"``, ``"1M"``)."""
    if pn is None:
        return None
    text = str(pn).strip().upper().removesuffix("M")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    for key in schedules.PN_NUM_SCALES:
        if math.isclose(value, float(key[:-1])):
            return key
    raise InputError(f"unknown pn {pn!r}; expected one of {', '.join(schedules.PN_NUM_SCALES)}")


def check_aspect(aspect: float | str) -> float:
    """The tabulated aspect key (h/w) for ``aspect`` ("W:H" or h/w); outside 1:3 .. 3:1 is an error."""
    text = str(aspect).strip()
    if ":" in text:
        w, _, h = text.partition(":")
        try:
            ratio = float(h) / float(w)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"aspect {aspect!r} is not 'W:H' with positive numbers (e.g. 16:9)") from None
    else:
        try:
            ratio = float(text)
        except ValueError:
            raise InputError(f"aspect {aspect!r} is neither 'W:H' (e.g. 16:9) nor a number (h/w)") from None
    if not (math.isfinite(ratio) and ratio > 0):
        raise InputError(f"aspect {aspect!r} must be a positive ratio (e.g. 16:9)")
    if not ASPECT_RANGE[0] <= ratio <= ASPECT_RANGE[1]:
        raise InputError(f"aspect {aspect!r} is outside the supported range 3:1 .. 1:3")
    return schedules.resolve_aspect(ratio)


def aspect_label(key: float) -> str:
    """``0.75`` -> ``"4:3"`` (W:H) for the tabulated keys; other values as h/w."""
    names = {1.0: "1:1", 1.25: "4:5", 0.8: "5:4", 1.333: "3:4", 0.75: "4:3", 1.5: "2:3", 0.666: "3:2",
             1.75: "4:7", 0.571: "7:4", 2.0: "1:2", 0.5: "2:1", 2.5: "2:5", 0.4: "5:2", 3.0: "1:3",
             0.333: "3:1"}
    return names.get(key, f"{key:g}")


def check_sampling(*, seed: int | None, cfg: float, tau: float, top_k: int, top_p: float) -> int:
    """Check upstream's sampling settings; returns the seed (``None``: a random one)."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise InputError(f"tau must be > 0, got {tau}")
    if not (math.isfinite(cfg) and cfg >= 0):
        raise InputError(f"cfg must be a finite number >= 0, got {cfg}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise InputError(f"top_p must be in [0, 1], got {top_p}")
    return int(seed)


def check_count(n: int, batch_size: int | None) -> None:
    """``n`` images in batches of ``batch_size`` (``None``: all at once)."""
    if not 1 <= n <= MAX_IMAGES:
        raise InputError(f"n must be in 1..{MAX_IMAGES}, got {n}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")


__all__ = ["ASPECT_RANGE", "MAX_IMAGES", "MAX_REPLY_TOKENS", "MAX_SEED", "aspect_label", "check_aspect", "check_count",
           "check_sampling", "normalize_pn"]
