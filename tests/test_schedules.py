"""Scale schedules vs upstream ``infinity/utils/dynamic_resolution.py`` and the fixture runs."""

from __future__ import annotations

import pytest

from vargpt_mlx import schedules as S

SQUARE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
          (40, 40), (48, 48), (64, 64)]

# h/w -> (0.25M L, (H px, W px)) of upstream's ``dynamic_resolution_h_w`` table
RATIO_025M = {
    1.25: (2814, (560, 448)),
    1.333: (2657, (576, 432)),
    1.5: (2759, (624, 416)),
    1.75: (2628, (672, 384)),
    2.0: (2681, (736, 368)),
    2.5: (2555, (800, 320)),
    3.0: (2588, (864, 288)),
}
INVERSE = {1.25: 0.8, 1.333: 0.75, 1.5: 0.666, 1.75: 0.571, 2.0: 0.5, 2.5: 0.4, 3.0: 0.333}


def test_aspect_keys():
    assert S.ASPECT_RATIOS == (1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5,
                               2.5, 0.4, 3.0, 0.333)
    assert S.PN_NUM_SCALES == {"0.016M": 5, "0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
    assert S.get_schedule("0.016M") == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]  # nano: 128 px, L = 121


@pytest.mark.parametrize("pn,n,L,padded,px", [
    ("0.06M", 7, 521, 640, 256),
    ("0.25M", 10, 2521, 2560, 512),
    ("0.60M", 12, 6425, 6528, 768),
    ("1M", 13, 10521, 10624, 1024),
])
def test_square_schedules(pn, n, L, padded, px):
    sched = S.get_schedule(pn, 1.0)
    assert sched == SQUARE[:n]
    assert S.total_tokens(sched) == L
    assert S.padded_tokens(sched) == padded
    assert S.image_size(sched) == (px, px)


@pytest.mark.parametrize("ratio", sorted(RATIO_025M))
def test_ratio_025m_and_inverse(ratio):
    L, (H, W) = RATIO_025M[ratio]
    sched = S.get_schedule("0.25M", ratio)
    assert len(sched) == 10 and S.total_tokens(sched) == L and S.image_size(sched) == (H, W)
    inv = S.get_schedule("0.25M", INVERSE[ratio])
    assert inv == [(w, h) for h, w in sched]
    assert S.total_tokens(inv) == L and S.image_size(inv) == (W, H)
    # 0.60M / 1M extend the 0.25M list; every pn is a prefix of the 13-step list
    full = S.get_schedule("1M", ratio)
    assert full[:10] == sched and S.get_schedule("0.60M", ratio) == full[:12]
    assert S.get_schedule("0.06M", ratio) == full[:7]
    # the last scale keeps the aspect ratio within 1 %
    h, w = full[-1]
    assert abs(h / w - ratio) < 0.01


def test_full_13_step_tails():
    tails = {1.25: [(45, 36), (55, 44), (70, 56)], 1.333: [(48, 36), (60, 45), (72, 54)],
             1.5: [(48, 32), (63, 42), (78, 52)], 1.75: [(56, 32), (70, 40), (84, 48)],
             2.0: [(60, 30), (74, 37), (90, 45)], 2.5: [(65, 26), (80, 32), (100, 40)],
             3.0: [(72, 24), (90, 30), (111, 37)]}
    for ratio, tail in tails.items():
        assert S.get_schedule("1M", ratio)[10:] == tail


def test_aspect_parsing():
    assert S.resolve_aspect("1:1") == 1.0
    assert S.resolve_aspect("4:3") == 0.75       # W:H, wide
    assert S.resolve_aspect("3:4") == 1.333      # tall
    assert S.resolve_aspect("16:9") == 0.571     # 9/16 = 0.5625
    assert S.resolve_aspect("9:16") == 1.75      # 16/9 = 1.78
    assert S.resolve_aspect("0.75") == 0.75
    assert S.resolve_aspect(1.02) == 1.0
    assert S.get_schedule("0.25M", "16:9") == S.get_schedule("0.25M", 0.571)
    for bad in ("abc", "0:1", "-1", 0.0):
        with pytest.raises(ValueError):
            S.resolve_aspect(bad)
    with pytest.raises(ValueError):
        S.get_schedule("2M")


def test_rope_grid_and_schedule_lookup():
    assert S.rope_grid(1.0) == (64, 64)
    assert S.rope_grid(0.75) == (54, 72)
    assert S.rope_grid("16:9") == (48, 84)
    # every tabulated schedule maps back to exactly its own aspect (upstream keys by schedule)
    for ratio in S.ASPECT_RATIOS:
        for pn in S.PN_NUM_SCALES:
            assert S.aspect_of(S.get_schedule(pn, ratio)) == ratio
    with pytest.raises(ValueError):
        S.aspect_of([(1, 1), (2, 2)])


def test_scale_of_token():
    sched = S.get_schedule("0.06M")
    d = S.scale_of_token(sched)
    assert len(d) == 521 and d[0] == 0 and d[1:5] == [1] * 4 and d[-1] == 6
