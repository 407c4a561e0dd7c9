"""Training data: the sharegpt format, up-front validation, the training template, targets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CKPT
from vargpt_mlx import schedules
from vargpt_mlx.config import VARGPTConfig
from vargpt_mlx.image_processor import ImageProcessor
from vargpt_mlx.tokenizer import load_tokenizer
from vargpt_mlx.training.data import (IMAGE_GEN, DataError, Encoder, load_preference_records, load_sft_records,
                                      target_pixels, target_schedule)
from vargpt_mlx.training.losses import IGNORE_INDEX

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def cfg():
    return VARGPTConfig.from_dir(CKPT)


@pytest.fixture(scope="module")
def enc(tok, cfg):
    return Encoder(tok, cfg.tokens, ImageProcessor.from_dir(CKPT), cfg.pn)


def enc_text(tok, s):
    return list(tok.encode(s, add_special_tokens=False))


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    shutil.copytree(EXAMPLES / "images", d / "images")
    return d


def write(d: Path, records, name="train.json") -> Path:
    p = d / name
    p.write_text(json.dumps(records))
    return p


def t2i(prompt="Draw it.", image="images/red_circle.png"):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "<image_gen>"}],
            "images": [image]}


# ------------------------------------------------------------------------------ template
def test_single_turn_template_and_labels(tok, cfg, enc):
    recs = load_sft_records(EXAMPLES / "sft_und.json")
    s = enc.encode_sft(recs[2])  # system message + two turns, text only
    t = cfg.tokens
    prompt1 = enc_text(tok, "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                            "<|im_start|>assistant\n")
    ans1 = enc_text(tok, "Hello.") + [t.eos_token_id]
    prompt2 = enc_text(tok, "\n<|im_start|>user\nSky color?<|im_end|>\n<|im_start|>assistant\n")
    ans2 = enc_text(tok, "Blue.") + [t.eos_token_id]
    assert s.input_ids.tolist() == prompt1 + ans1 + prompt2 + ans2
    assert s.labels.tolist() == [IGNORE_INDEX] * len(prompt1) + ans1 + [IGNORE_INDEX] * len(prompt2) + ans2
    assert prompt1[0] == t.bos_token_id + 1  # <|im_start|> (1001 in the tiny vocabulary)


def test_default_system_prompt(tok, enc):
    s = enc.encode_sft(load_sft_records(EXAMPLES / "sft_und.json")[0])
    head = enc_text(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is this?")
    assert s.input_ids[:len(head)].tolist() == head


def test_image_gen_expands_to_padded_schedule(cfg, enc, tok):
    s = enc.encode_sft(load_sft_records(EXAMPLES / "sft_t2i.json")[0])
    t = cfg.tokens
    ids = s.input_ids.tolist()
    assert cfg.pn == "0.06M" and s.schedule == schedules.get_schedule("0.06M", 1.0)
    n = ids.count(t.image_gen_pad_token_id)
    assert n == schedules.padded_tokens(s.schedule) == 640
    start = ids.index(t.image_gen_start_token_id)
    assert ids[start + 1:start + 1 + n] == [t.image_gen_pad_token_id] * n
    assert ids[start + 1 + n:] == [t.image_gen_end_token_id, t.eos_token_id]
    # the assistant part (start, pads, end, eos) is supervised, the prompt is not
    assert (s.labels[start:] == s.input_ids[start:]).all() and (s.labels[:start] == IGNORE_INDEX).all()
    assert s.gen_image.name == "red_circle.png" and s.images == []
    big = Encoder(tok, cfg.tokens, enc.processor, "0.25M").encode_sft(load_sft_records(EXAMPLES / "sft_t2i.json")[0])
    assert big.input_ids.tolist().count(t.image_gen_pad_token_id) == 2560


def test_image_input_expands_to_processor_tokens(cfg, enc):
    s = enc.encode_sft(load_sft_records(EXAMPLES / "sft_und.json")[0])  # 96x96 -> 84x84 -> grid (1, 6, 6)
    t = cfg.tokens
    ids = s.input_ids.tolist()
    assert s.grids == [(1, 6, 6)] and ids.count(t.image_token_id) == 9
    i = ids.index(t.vision_start_token_id)
    assert ids[i + 1:i + 10] == [t.image_token_id] * 9 and ids[i + 10] == t.vision_end_token_id
    assert (s.labels[i:i + 11] == IGNORE_INDEX).all()


def test_edit_sample_has_input_and_target(cfg, enc):
    s = enc.encode_sft(load_sft_records(EXAMPLES / "sft_t2i.json")[2])
    ids = s.input_ids.tolist()
    assert [p.name for p in s.images] == ["red_circle.png"] and s.gen_image.name == "blue_circle.png"
    assert ids.index(cfg.tokens.image_token_id) < ids.index(cfg.tokens.image_gen_start_token_id)


def test_preference_pairs_share_the_prompt(enc, cfg):
    (c, r) = enc.encode_pair(load_preference_records(EXAMPLES / "dpo_text.json")[0])
    n = int(np.argmax(c.labels != IGNORE_INDEX))
    assert n == int(np.argmax(r.labels != IGNORE_INDEX))
    assert c.input_ids[:n].tolist() == r.input_ids[:n].tolist()
    assert c.input_ids[n:].tolist() != r.input_ids[n:].tolist()
    ci, ri = enc.encode_pair(load_preference_records(EXAMPLES / "dpo_image.json")[0])
    assert ci.input_ids.tolist() == ri.input_ids.tolist()  # same tokens, different target image
    assert ci.gen_image.name == "red_circle.png" and ri.gen_image.name == "blue_square.png"


# ------------------------------------------------------------------------------ targets
def test_target_pixels_square_matches_upstream_transform():
    path = EXAMPLES / "images" / "red_circle.png"
    x = target_pixels(path, (256, 256))
    assert x.shape == (256, 256, 3) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    # Resize(1.125 * 256 = 288, LANCZOS) on the shorter side -> CenterCrop(256) -> [-1, 1]
    with Image.open(path) as im:
        ref = im.convert("RGB").resize((288, 288), Image.Resampling.LANCZOS).crop((16, 16, 272, 272))
    np.testing.assert_array_equal(x, np.asarray(ref, np.float32) / 255 * 2 - 1)


def test_target_schedule_picks_nearest_aspect(tmp_path):
    p = tmp_path / "wide.png"
    Image.new("RGB", (120, 90), (1, 2, 3)).save(p)  # h/w = 0.75
    sched = target_schedule(p, "0.06M")
    assert sched == schedules.get_schedule("0.06M", 0.75)
    H, W = schedules.image_size(sched)
    assert target_pixels(p, (H, W)).shape == (H, W, 3)
    assert target_schedule(p, "0.06M", "1:1") == schedules.get_schedule("0.06M", 1.0)


# ------------------------------------------------------------------------------ validation
def test_examples_validate():
    assert len(load_sft_records(EXAMPLES / "sft_t2i.json")) == 3
    assert len(load_sft_records(EXAMPLES / "sft_und.json")) == 3
    assert len(load_preference_records(EXAMPLES / "dpo_text.json")) == 2
    assert len(load_preference_records(EXAMPLES / "dpo_image.json")) == 2


def test_sharegpt_conversations_tags_accepted(data_dir):
    rec = {"conversations": [{"from": "human", "value": "Draw it."}, {"from": "gpt", "value": "<image_gen>"}],
           "images": ["images/red_circle.png"]}
    (r,) = load_sft_records(write(data_dir, [rec]))
    assert [m.role for m in r.messages] == ["user", "assistant"]


BAD = {
    "missing image": (t2i(image="images/nope.png"), "not found"),
    "unreadable image": (t2i(image="images/broken.png"), "cannot read image"),
    "too few images": ({**t2i(), "images": []}, "placeholders but 0 images"),
    "too many images": ({**t2i(), "images": ["images/red_circle.png"] * 2}, "placeholders but 2 images"),
    "no messages": ({"images": []}, "has no 'messages'"),
    "empty messages": ({"messages": []}, "'messages' is empty"),
    "missing content": ({"messages": [{"role": "user"}]}, "has no 'content'"),
    "bad role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role"),
    "ends with user": ({"messages": [{"role": "user", "content": "x"}]}, "last message"),
    "two users": ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                                {"role": "assistant", "content": "z"}]}, "alternate"),
    "gen in user turn": ({"messages": [{"role": "user", "content": IMAGE_GEN},
                                       {"role": "assistant", "content": "x"}], "images": ["images/red_circle.png"]},
                         "only appear in assistant"),
    "two gens": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": IMAGE_GEN * 2}],
                  "images": ["images/red_circle.png"] * 2}, "at most one image"),
    "not an object": ("hello", "is not an object"),
    "tiny input image": ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
                          "images": ["images/tiny.png"]}, "too small"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_reported_with_its_index(data_dir, case):
    (data_dir / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (10, 10)).save(data_dir / "images" / "tiny.png")
    rec, msg = BAD[case]
    p = write(data_dir, [t2i(), t2i(), rec])
    with pytest.raises(DataError) as e:
        load_sft_records(p)
    text = str(e.value)
    assert "train.json record 2" in text and msg in text and "\n" not in text


@pytest.mark.parametrize("content,msg", [("not json", "not valid JSON"), ("{}", "JSON list"), ("[]", "no records")])
def test_bad_file(tmp_path, content, msg):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(DataError, match=msg):
        load_sft_records(p)
    with pytest.raises(DataError, match="does not exist"):
        load_sft_records(tmp_path / "missing.json")


@pytest.mark.parametrize("rec,msg", [
    ({"prompt": "x", "chosen": "a"}, "has no 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "has no 'messages' or 'prompt'"),
    ({"prompt": "x", "chosen": "a", "rejected": {"image": "images/red_circle.png"}}, "both be texts or both"),
    ({"prompt": "x", "chosen": {"image": "images/nope.png"}, "rejected": {"image": "images/red_circle.png"}},
     "not found"),
    ({"prompt": "x<image>", "chosen": "a", "rejected": "b"}, "1 <image> placeholders but 0 images"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "chosen": "a", "rejected": "b"}, "last message must be a user"),
    ({"prompt": "x", "chosen": "a <image_gen>", "rejected": "b"}, "may not hold image placeholders"),
])
def test_bad_preference_record(data_dir, rec, msg):
    good = {"prompt": "x", "chosen": "a", "rejected": "b"}
    p = write(data_dir, [good, rec])
    with pytest.raises(DataError) as e:
        load_preference_records(p)
    assert "record 1" in str(e.value) and msg in str(e.value)
