"""3-D M-RoPE position ids (t, h, w) for a Qwen2-VL prompt: static numpy bookkeeping.

Mirrors ``Qwen2VLForConditionalGeneration.get_rope_index`` of transformers 4.46.1, which upstream
calls only in ``prepare_inputs_for_generation`` (the prefill of ``generate``). A bare forward uses
``plain_position_ids`` (0..L-1 on every axis) and decode steps use ``cache_position + rope_deltas``.
"""

from __future__ import annotations

import numpy as np


def plain_position_ids(batch: int, length: int, offset: int = 0) -> np.ndarray:
    """(3, batch, length) int64 positions ``offset .. offset+length-1`` on all three axes."""
    pos = np.arange(offset, offset + length, dtype=np.int64)
    return np.broadcast_to(pos, (3, batch, length)).copy()


def _vision_block_positions(grid_thw, spatial_merge_size: int, start: int) -> np.ndarray:
    """(3, t*h*w) positions of one merged image/video grid placed at text position ``start``."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // spatial_merge_size, int(grid_thw[2]) // spatial_merge_size
    t_idx, h_idx, w_idx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([t_idx.ravel(), h_idx.ravel(), w_idx.ravel()]).astype(np.int64) + start


def _text_positions(length: int, start: int) -> np.ndarray:
    """(3, length) consecutive positions from ``start`` on all three axes."""
    return np.broadcast_to(np.arange(length, dtype=np.int64) + start, (3, length))


def _sequence_positions(tokens: list[int], image_grids, video_grids, *, image_token_id: int,
                        video_token_id: int, vision_start_token_id: int,
                        spatial_merge_size: int) -> np.ndarray:
    """(3, len(tokens)) positions of one unpadded sequence; consumes grids from the two iterators.

    Same walk as upstream: count the vision blocks by the token following each vision_start, then
    repeatedly take whichever of the next image / video pad token comes first.
    """
    arr = np.asarray(tokens)
    starts = np.flatnonzero(arr == vision_start_token_id)
    following = arr[starts[starts + 1 < len(arr)] + 1]
    remain_images = int((following == image_token_id).sum())
    remain_videos = int((following == video_token_id).sum())
    parts: list[np.ndarray] = []
    st = 0
    for _ in range(remain_images + remain_videos):
        ed_image = tokens.index(image_token_id, st) if remain_images > 0 else len(tokens) + 1
        ed_video = tokens.index(video_token_id, st) if remain_videos > 0 else len(tokens) + 1
        if ed_image < ed_video:
            grid, ed = next(image_grids), ed_image
            remain_images -= 1
        else:
            grid, ed = next(video_grids), ed_video
            remain_videos -= 1
        st_idx = int(parts[-1].max()) + 1 if parts else 0
        parts.append(_text_positions(ed - st, st_idx))
        block = _vision_block_positions(grid, spatial_merge_size, ed - st + st_idx)
        parts.append(block)
        st = ed + block.shape[1]
    if st < len(tokens):
        st_idx = int(parts[-1].max()) + 1 if parts else 0
        parts.append(_text_positions(len(tokens) - st, st_idx))
    return np.concatenate(parts, axis=1)


def get_rope_index(input_ids, image_grid_thw=None, attention_mask=None, *, image_token_id: int,
                   video_token_id: int, vision_start_token_id: int, spatial_merge_size: int = 2,
                   video_grid_thw=None) -> tuple[np.ndarray, np.ndarray]:
    """``get_rope_index`` of transformers 4.46.1 Qwen2-VL.

    Args:
        input_ids: (B, L) token ids, image/video pad tokens already expanded.
        image_grid_thw: (n_images, 3) patch grids in prompt order, or ``None``.
        attention_mask: (B, L) 1/0, or ``None`` (all ones).
        video_grid_thw: (n_videos, 3) grids, or ``None``.
    Returns:
        position_ids: (3, B, L) int64. With images/videos, padded slots hold 1; text-only prompts
            use ``cumsum(mask) - 1`` with padded slots 1 (or 0..L-1 without a mask).
        rope_deltas: (B, 1) int64, ``max position + 1 - L`` (the offset decode steps add).
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    if image_grid_thw is None and video_grid_thw is None:
        return _text_rope_index(input_ids, attention_mask)
    mask = np.ones((B, L), np.int64) if attention_mask is None else np.asarray(attention_mask)
    position_ids = np.ones((3, B, L), np.int64)
    deltas = np.zeros((B, 1), np.int64)
    image_grids = iter(np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else ())
    video_grids = iter(np.asarray(video_grid_thw).reshape(-1, 3) if video_grid_thw is not None else ())
    for i in range(B):
        keep = mask[i] == 1
        pos = _sequence_positions(input_ids[i][keep].tolist(), image_grids, video_grids,
                                  image_token_id=image_token_id, video_token_id=video_token_id,
                                  vision_start_token_id=vision_start_token_id,
                                  spatial_merge_size=spatial_merge_size)
        position_ids[:, i, keep] = pos
        deltas[i, 0] = pos.max() + 1 - L
    return position_ids, deltas


def _text_rope_index(input_ids: np.ndarray, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """The no-vision branch of ``get_rope_index``."""
    B, L = input_ids.shape
    if attention_mask is None:
        return plain_position_ids(B, L), np.zeros((B, 1), np.int64)
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)
    position_ids = np.broadcast_to(pos, (3, B, L)).copy()
    deltas = pos.max(axis=-1, keepdims=True) + 1 - L
    return position_ids, deltas
