"""Multi-scale token schedules of the Infinity decoder, as data.

Mirrors upstream ``infinity/utils/dynamic_resolution.py``:

* a 13-step list of per-scale token grids ``(h, w)`` per aspect ratio ``h/w``;
* ``pn`` (total pixels) selects a prefix of it: 0.06M = 7 scales, 0.25M = 10, 0.60M = 12, 1M = 13;
  0.016M = 5 scales (128x128 at 1:1) is this port's addition for the nano model (upstream has no
  setting that small; it is the same prefix rule, so every other code path is unchanged);
* the inverse ratios (``int(1000/r)/1000``) are the transposed lists;
* pixel size = last grid x 16 (the VAE stride);
* the time extent ``t`` of the upstream tables is forced to 1 by VARGPT (images only), so
  schedules here are plain ``(h, w)`` lists.

Aspect ratios are *height / width* everywhere in this module, as upstream keys them. The
command-line string form ``"W:H"`` follows the photographic convention (width first):
``"16:9"`` is a wide image, ``h/w = 9/16 = 0.5625``, whose nearest key is 0.571.
"""

from __future__ import annotations

from .errors import InputError

VAE_STRIDE = 16

# 13-step (h, w) lists for h/w >= 1 (upstream ``ratio2hws``).
_RATIO2HWS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
            (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
            (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
            (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
            (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
            (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
            (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
            (72, 24), (90, 30), (111, 37)),
}


def _full_schedules() -> dict[float, tuple[tuple[int, int], ...]]:
    """Upstream ``full_ratio2hws``: each ratio followed by its transposed inverse."""
    full: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio, hws in _RATIO2HWS.items():
        full[ratio] = hws
        if ratio != 1.0:
            full[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return full


FULL_SCHEDULES: dict[float, tuple[tuple[int, int], ...]] = _full_schedules()
"""Aspect key (h/w) -> the 13-step 1M list."""

ASPECT_RATIOS: tuple[float, ...] = tuple(FULL_SCHEDULES)
"""The 15 aspect keys (h/w), in upstream order: 1.0, 1.25, 0.8, 1.333, 0.75, ..., 3.0, 0.333."""

PN_NUM_SCALES: dict[str, int] = {"0.016M": 5, "0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
"""Total-pixel setting -> number of scales (a prefix of the 13-step list)."""


def resolve_aspect(aspect: float | str = 1.0) -> float:
    """The aspect key (h/w) nearest to ``aspect``.

    ``aspect`` is a height/width ratio (float or numeric string such as ``"0.75"``), or a
    ``"W:H"`` string in the photographic convention (``"4:3"`` -> h/w 0.75, ``"16:9"`` -> 0.5625
    -> key 0.571). Ties go to the earlier key, as upstream's ``np.argmin`` does.
    """
    if isinstance(aspect, str):
        text = aspect.strip()
        if ":" in text:
            w_str, h_str = text.split(":", 1)
            try:
                w, h = float(w_str), float(h_str)
            except ValueError:
                raise InputError(f"aspect {aspect!r} is not 'W:H'") from None
            if w <= 0 or h <= 0:
                raise InputError(f"aspect {aspect!r} must have positive sides")
            h_div_w = h / w
        else:
            try:
                h_div_w = float(text)
            except ValueError:
                raise InputError(f"aspect {aspect!r} is neither a number nor 'W:H'") from None
    else:
        h_div_w = float(aspect)
    if not h_div_w > 0:
        raise InputError(f"aspect ratio must be positive, got {aspect!r}")
    return min(ASPECT_RATIOS, key=lambda r: abs(h_div_w - r))


def get_schedule(pn: str, aspect: float | str = 1.0) -> list[tuple[int, int]]:
    """Upstream ``dynamic_resolution_h_w[aspect][pn]['scales']`` with t dropped (t = 1)."""
    if pn not in PN_NUM_SCALES:
        raise InputError(f"unknown pn {pn!r}; expected one of {sorted(PN_NUM_SCALES)}")
    return list(FULL_SCHEDULES[resolve_aspect(aspect)][: PN_NUM_SCALES[pn]])


def image_size(schedule: list[tuple[int, int]]) -> tuple[int, int]:
    """Pixel size ``(H, W)`` produced by a schedule: its last grid times the VAE stride."""
    h, w = schedule[-1]
    return h * VAE_STRIDE, w * VAE_STRIDE


def total_tokens(schedule: list[tuple[int, int]]) -> int:
    """L = sum of h*w over the scales."""
    return sum(h * w for h, w in schedule)


def padded_tokens(schedule: list[tuple[int, int]], multiple: int = 128) -> int:
    """L rounded up to ``multiple`` (upstream ``pad_to_multiplier``; the training pad-slot count)."""
    n = total_tokens(schedule)
    return -(-n // multiple) * multiple


def rope_grid(aspect: float | str = 1.0) -> tuple[int, int]:
    """Last grid of the 1M schedule of ``aspect``: the 2-D RoPE normalisation grid."""
    return FULL_SCHEDULES[resolve_aspect(aspect)][-1]


def aspect_of(schedule: list[tuple[int, int]]) -> float:
    """The aspect key whose pn schedule equals ``schedule``.

    Upstream looks the rotary table up by the schedule itself (``str(tuple(scale_schedule))``),
    so only the 15 x 4 tabulated schedules are valid; anything else raises ``ValueError``.
    """
    sched = tuple(tuple(int(v) for v in hw) for hw in schedule)
    for ratio, full in FULL_SCHEDULES.items():
        if len(sched) in PN_NUM_SCALES.values() and full[: len(sched)] == sched:
            return ratio
    raise ValueError(f"schedule {list(sched)} is not a tabulated (aspect, pn) schedule")


def scale_of_token(schedule: list[tuple[int, int]]) -> list[int]:
    """Scale index of each of the L tokens of a schedule (scale-major, row-major inside)."""
    return [k for k, (h, w) in enumerate(schedule) for _ in range(h * w)]
