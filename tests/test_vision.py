"""Qwen2-VL vision tower vs upstream ``model.visual`` (ref ``und.vision_embeds``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.conftest import sub_weights
from vargpt_mlx.image_processor import ImageProcessor
from vargpt_mlx.models.vision import DROPPED, VisionTransformer, grid_position_ids, sanitize, segment_ids
from vargpt_mlx.tolerances import compare


@pytest.fixture(scope="module")
def visual(config, raw_weights) -> VisionTransformer:
    model = VisionTransformer(config.vision)
    model.load_weights(list(sanitize(sub_weights(raw_weights, "visual")).items()), strict=True)
    return model


def test_parameter_names_match_upstream(config, raw_weights):
    upstream = sub_weights(raw_weights, "visual")
    ours = dict(tree_flatten(VisionTransformer(config.vision).parameters()))
    assert set(ours) == set(upstream) - set(DROPPED)
    for k, v in sanitize(upstream).items():
        assert ours[k].shape == v.shape, k


def test_vision_embeds_match_upstream(visual, refs):
    out = visual(mx.array(refs["und.pixel_values"]), refs["und.image_grid_thw"])
    check = compare("und.vision_embeds", out, refs["und.vision_embeds"], tol="fp32")
    assert check.ok, check


def test_images_attend_only_to_themselves(visual, refs, config):
    """Two images in one call give the same embeddings as two separate calls (cu_seqlens)."""
    processor = ImageProcessor()
    first = refs["und.image_u8"]
    second = np.ascontiguousarray(first.transpose(1, 0, 2)[:, ::-1])  # 84x56: grid (1, 6, 4)
    pixel_values, grid = processor([first, second])
    together = np.asarray(visual(mx.array(pixel_values), grid))
    apart = [np.asarray(visual(mx.array(pv), g)) for pv, g in (processor([first]), processor([second]))]
    assert together.shape == (6 + 6, config.vision.hidden_size)
    for name, got, ref in (("first", together[:6], apart[0]), ("second", together[6:], apart[1])):
        check = compare(name, got, ref, tol="fp32")
        assert check.ok, check
    check = compare("first vs ref", together[:6], refs["und.vision_embeds"], tol="fp32")
    assert check.ok, check


def test_rope_positions_follow_merge_windows():
    pos = grid_position_ids(np.array([[1, 2, 4]]), merge_size=2)
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert [tuple(p) for p in pos] == expected


def test_segments_split_images_and_frames():
    assert segment_ids(np.array([[2, 2, 2], [1, 2, 4]])).tolist() == [0] * 4 + [1] * 4 + [2] * 8
    assert VisionTransformer.segment_mask(np.array([[1, 4, 6]])) is None


def test_trainable(visual, refs):
    """Gradients reach every parameter through the pure-MLX forward."""
    pixel_values = mx.array(refs["und.pixel_values"])
    grid = refs["und.image_grid_thw"]

    def loss(model):
        return (model(pixel_values, grid) ** 2).mean()

    _, grads = nn.value_and_grad(visual, loss)(visual)
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(dict(tree_flatten(visual.parameters())))
    assert all(bool(mx.all(mx.isfinite(g))) for g in flat.values())
    assert float(mx.abs(flat["patch_embed.proj.weight"]).sum()) > 0
