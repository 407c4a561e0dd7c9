"""The one text decoding loop (``generate_step``), as upstream's patched ``_sample``
(``patching_utils/vargpt_sample.py``) runs it for text, i.e. transformers 4.46.1 ``generate``:

* prefill with the prompt's M-RoPE positions (``get_rope_index``);
* each decode step feeds the chosen token's embedding at position ``cache_position + rope_deltas``
  on all three axes (``prepare_inputs_for_generation``);
* logits processors see the whole token history, prompt included, then argmax or sampling;
* generation stops after an eos token (which is emitted) or ``max_tokens`` new tokens.

``ChatSession`` takes the ``<|image_gen_start|>`` branch of that loop (image generation) from the
same steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from .models.linear import decoding
from .models.qwen2 import Qwen2Model

# mlx_lm's repetition processor looks at the last ``context_size`` tokens; HF penalises every token
# of the sequence so far, which this context size covers.
WHOLE_SEQUENCE = 2**31 - 1


def hf_logits_processors(repetition_penalty: float | None = None) -> list[Callable]:
    """Logits processors with HF ``generate`` semantics (``RepetitionPenaltyLogitsProcessor``).

    The penalty applies to every distinct token of the whole history (prompt included):
    logits < 0 are multiplied by it, the others divided.
    """
    return make_logits_processors(repetition_penalty=repetition_penalty,
                                  repetition_context_size=WHOLE_SEQUENCE)


def decode_position_ids(position: int) -> mx.array:
    """(3, 1, 1) position ids of one decode step: the same position on all three axes."""
    return mx.full((3, 1, 1), position, dtype=mx.int32)


def make_sampler(temp: float, top_p: float, key: mx.array) -> Callable[[mx.array], mx.array] | None:
    """A seeded ``logprobs (1, V) -> token (1,)`` sampler for ``generate_step``: ``None`` (greedy)
    at ``temp == 0``, else mlx-lm's top-p filter and a categorical draw at ``temp`` with keys split
    from ``key`` (``mlx_lm.sample_utils.make_sampler``'s draw, without global random state)."""
    from mlx_lm.sample_utils import apply_top_p

    if temp < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temp >= 0 and 0 < top_p <= 1 (got temp={temp}, top_p={top_p})")
    if temp == 0:
        return None
    state = {"key": key}

    def sampler(logprobs: mx.array) -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

    return sampler


def generate_step(hidden: mx.array, feed: Callable[[int], mx.array], lm_head: Callable[[mx.array], mx.array],
                  *, sampler: Callable[[mx.array], mx.array] | None = None,
                  logits_processors: Sequence[Callable] = (), history: Sequence[int] = (),
                  ) -> Iterator[tuple[int, mx.array]]:
    """The decoding loop every text path runs (chat, server, verify, benchmarks).

    Args:
        hidden: (1, L, H) hidden states whose last row predicts the first token.
        feed: runs one decode step on a chosen token id and returns its (1, 1, H) hidden states.
        sampler: callable on log-probabilities (1, V) -> (1,) (``make_sampler``); ``None`` is
            HF's greedy choice, argmax over the processed logits.
        logits_processors: ``(history, logits) -> logits`` callables, applied in order.
        history: the token ids the processors see before the first new token.
    Yields:
        ``(token_id, logits)``: each chosen token and the raw float logits (V,) it was chosen
        from, without end. A token is fed only when the next one is asked for, so the last token
        a caller takes never enters the cache (as in upstream's loop).
    """
    history = mx.array(list(history), dtype=mx.int32)
    while True:
        with decoding():  # one-row products as BLAS matrix-vector products (models.linear)
            logits = lm_head(hidden[:, -1, :]).astype(mx.float32)
        raw = logits[0]  # taken first: mlx_lm processors update ``logits`` in place
        for processor in logits_processors:
            logits = processor(history, logits)
        if sampler is None:
            token = mx.argmax(logits, axis=-1)
        else:
            token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        token_id = int(token.item())
        yield token_id, raw
        history = mx.concatenate([history, mx.array([token_id], dtype=mx.int32)])
        with decoding():
            hidden = feed(token_id)


def stream_generate(llm: Qwen2Model, lm_head: Callable[[mx.array], mx.array], inputs_embeds: mx.array,
                    position_ids: mx.array, rope_deltas: int, *, cache: list | None = None,
                    sampler: Callable[[mx.array], mx.array] | None = None,
                    logits_processors: Sequence[Callable] | None = None,
                    repetition_penalty: float | None = None, max_tokens: int = 256,
                    eos_token_ids: Sequence[int] = (), prompt_ids: Sequence[int] | None = None,
                    ) -> Iterator[tuple[int, mx.array]]:
    """Prefill one prompt (batch 1), then stream ``generate_step``'s tokens up to an eos (emitted)
    or ``max_tokens``.

    Args:
        llm: the language model; ``lm_head`` maps its hidden states to vocabulary logits.
        inputs_embeds: (1, L, H) prompt embeddings (vision features already scattered in).
        position_ids: (3, 1, L) prefill positions (``get_rope_index``).
        rope_deltas: the prompt's ``rope_deltas`` (0 for text-only prompts).
        cache: per-layer KV caches to continue; a fresh ``llm.make_cache()`` when ``None``.
        repetition_penalty: HF ``repetition_penalty`` over the whole history
            (``hf_logits_processors``), applied before ``logits_processors`` as HF runs its
            built-in processors before custom ones.
        prompt_ids: the prompt's token ids, the start of the history the processors see.
        sampler, logits_processors: as ``generate_step``.
    """
    cache = llm.make_cache() if cache is None else cache

    def feed(token_id: int) -> mx.array:
        pos = decode_position_ids(cache[0].offset + rope_deltas)
        return llm(llm.embed(mx.array([[token_id]])), pos, cache=cache)

    hidden = llm(inputs_embeds, position_ids.astype(mx.int32), cache=cache)
    processors = hf_logits_processors(repetition_penalty) + list(logits_processors or ())
    steps = generate_step(hidden, feed, lm_head, sampler=sampler, logits_processors=processors,
                          history=prompt_ids or ())
    for token_id, logits in itertools.islice(steps, max_tokens):
        yield token_id, logits
        if token_id in eos_token_ids:
            return
