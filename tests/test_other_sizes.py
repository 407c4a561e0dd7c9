"""The port is not tied to the public fixture's sizes: a second configuration shaped like the
hidden parity bundle (3 LLM layers, 1 KV head, mrope [4,6,6], vision 48/3/3, Infinity 256/4/4,
32-group VAE [1,2,4,4,4], pn 0.25M = 512x512 in 10 scales) runs every path end to end with
random weights. (Numerical parity is proven on the public bundle; this checks shapes and
control flow for other sizes, the real 0.25M schedule and the 32-group GroupNorm branch.)"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import CKPT
from vargpt_mlx import schedules
from vargpt_mlx.config import VARGPTConfig
from vargpt_mlx.models.vargpt import VARGPT, embed_multimodal
from vargpt_mlx.pipelines.image_generation import GenerationSettings, draw_images, prefill_prompt
from vargpt_mlx.training.losses import t2i_sft_loss


@pytest.fixture(scope="module")
def model() -> VARGPT:
    cfg = json.loads((CKPT / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=1)
    cfg["rope_scaling"]["mrope_section"] = [4, 6, 6]
    cfg["vision_config"] = {"depth": 3, "embed_dim": 48, "num_heads": 3, "hidden_size": 128}
    arch = {"infinity": {"embed_dim": 256, "depth": 4, "num_heads": 4, "block_chunks": 2, "text_channels": 256},
            "vae": {"base_ch": 32, "encoder_ch_mult": [1, 2, 4, 4, 4], "decoder_ch_mult": [1, 2, 4, 4, 4]},
            "pn": "0.25M"}
    mx.random.seed(3)
    m = VARGPT(VARGPTConfig.from_dict(cfg, arch))
    m.eval()
    return m


def test_generation_at_025M(model):
    tok = model.config.tokens
    prompt = np.array([[tok.bos_token_id + 1, 101, 103, 250, 251, tok.eos_token_id, 103]])
    (res,) = draw_images(model, *prefill_prompt(model, prompt), GenerationSettings(argmax=True))
    assert res.schedule == schedules.get_schedule("0.25M") and len(res.schedule) == 10
    assert res.image.shape == (512, 512, 3) and res.image.dtype == np.uint8
    assert [tuple(b.shape) for b in res.bits] == [(1, h, w, 32) for h, w in res.schedule]


def test_understanding_with_image(model):
    tok = model.config.tokens
    ids = np.array([[101, tok.vision_start_token_id] + [tok.image_token_id] * 6 + [tok.vision_end_token_id, 102]])
    pv = mx.random.normal((24, 3 * 2 * 14 * 14))
    emb = embed_multimodal(model, mx.array(ids), pv, np.array([[1, 4, 6]]))
    assert emb.shape == (1, ids.shape[1], 128)


def test_t2i_training_loss_at_025M(model):
    tok = model.config.tokens
    sched = schedules.get_schedule("0.25M")
    n_pad = schedules.padded_tokens(sched)
    assert n_pad == 2560
    ids = np.array([[tok.bos_token_id + 1, 101, 250, tok.image_gen_start_token_id]
                    + [tok.image_gen_pad_token_id] * n_pad + [tok.image_gen_end_token_id, tok.eos_token_id]])
    x = mx.random.uniform(-1, 1, (1, 512, 512, 3))
    out = t2i_sft_loss(model, mx.array(ids), x, sched)
    assert out.bit_logits.shape == (1, schedules.total_tokens(sched), 64)
    assert np.isfinite(out.loss.item())
