"""A small byte-level BPE tokenizer trained on the nano world's text.

Same pre-tokenizer (Qwen2's split pattern + byte level), normalizer and decoder as
``vargpt_mlx.tokenizer.build_tokenizer_files``; ``vocab_size`` ordinary tokens (the 256 byte
symbols included, so any text encodes), then ``QWEN2_VL_SPECIAL + VARGPT_SPECIAL`` with the ids
right after them (contiguous), and the same ``tokenizer_config.json`` (chat template included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..tokenizer import QWEN2_VL_SPECIAL, SPLIT_PATTERN, VARGPT_SPECIAL, TokenizerError, tokenizer_config


def build_nano_tokenizer(out_dir: str | Path, corpus_lines: Iterable[str], vocab_size: int = 512,
                         min_frequency: int = 2) -> dict[str, int]:
    """Train the BPE on ``corpus_lines``, write ``tokenizer.json`` + ``tokenizer_config.json``
    to ``out_dir``; return the special-token ids (``vocab_size`` ... ``vocab_size + 16``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 257:
        raise TokenizerError("vocab_size must exceed the 256 byte symbols")
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator((line for line in corpus_lines), trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=False)
    specials = QWEN2_VL_SPECIAL + VARGPT_SPECIAL
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    special_ids = {s: tok.token_to_id(s) for s in specials}
    if sorted(special_ids.values()) != list(range(n, n + len(specials))):
        raise TokenizerError(f"special token ids {special_ids} do not follow the {n} ordinary tokens")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(specials), indent=2,
                                                              ensure_ascii=False))
    return special_ids
