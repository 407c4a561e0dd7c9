"""Text decoding loop of the language model: what upstream's patched ``_sample`` does for text.

Mirrors transformers 4.46.1 ``generate`` (greedy or sampled) on ``VARGPTQwen2VLForConditionalGeneration``:

* prefill with the prompt's M-RoPE positions (``get_rope_index``);
* each decode step feeds the chosen token's embedding at position ``cache_position + rope_deltas``
  on all three axes (``prepare_inputs_for_generation``);
* logits processors see the whole token history, prompt included, then argmax or sampling;
* generation stops after an eos token (which is emitted) or ``max_tokens`` new tokens.

The ``<|image_gen_start|>`` branch of upstream's loop (image generation) is not handled here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

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


def _choose(logits: mx.array, history: mx.array, sampler, logits_processors) -> mx.array:
    """Processed logits (1, V) -> chosen token (1,): processors, then argmax or ``sampler(logprobs)``."""
    for processor in logits_processors:
        logits = processor(history, logits)
    if sampler is None:
        return mx.argmax(logits, axis=-1)
    return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def stream_generate(llm: Qwen2Model, lm_head: Callable[[mx.array], mx.array], inputs_embeds: mx.array,
                    position_ids: mx.array, rope_deltas: int, *, cache: list | None = None,
                    sampler: Callable[[mx.array], mx.array] | None = None,
                    logits_processors: Sequence[Callable] | None = None,
                    repetition_penalty: float | None = None, max_tokens: int = 256,
                    eos_token_ids: Sequence[int] = (), prompt_ids: Sequence[int] | None = None,
                    ) -> Iterator[tuple[int, mx.array]]:
    """Stream the new tokens of one prompt (batch 1).

    Args:
        llm: the language model; ``lm_head`` maps its hidden states to vocabulary logits.
        inputs_embeds: (1, L, H) prompt embeddings (vision features already scattered in).
        position_ids: (3, 1, L) prefill positions (``get_rope_index``).
        rope_deltas: the prompt's ``rope_deltas`` (0 for text-only prompts).
        cache: per-layer KV caches to continue; a fresh ``llm.make_cache()`` when ``None``.
        sampler: ``mlx_lm.sample_utils.make_sampler(...)``-style callable on log-probabilities
            (1, V) -> (1,); ``None`` is greedy argmax over the processed logits.
        logits_processors: ``(history, logits) -> logits`` callables, applied in order.
        repetition_penalty: HF ``repetition_penalty`` over the whole history
            (``hf_logits_processors``), applied before ``logits_processors`` as HF runs its
            built-in processors before custom ones.
        max_tokens: most new tokens to produce.
        eos_token_ids: ids that end generation (emitted before stopping).
        prompt_ids: the prompt's token ids, the start of the history the processors see.
    Yields:
        ``(token_id, logits)``: each chosen token and the raw (unprocessed) float logits (V,) it
        was chosen from.
    """
    cache = llm.make_cache() if cache is None else cache
    history = mx.array(list(prompt_ids or ()), dtype=mx.int32)
    processors = hf_logits_processors(repetition_penalty) + list(logits_processors or ())
    hidden = llm(inputs_embeds, position_ids.astype(mx.int32), cache=cache)
    for _ in range(max_tokens):
        logits = lm_head(hidden[:, -1, :]).astype(mx.float32)
        raw = logits[0]  # taken first: mlx_lm processors update ``logits`` in place
        token = _choose(logits, history, sampler, processors)
        token_id = int(token.item())
        yield token_id, raw
        if token_id in eos_token_ids:
            return
        history = mx.concatenate([history, token.astype(mx.int32).reshape(1)])
        step_pos = decode_position_ids(cache[0].offset + rope_deltas)
        hidden = llm(llm.embed(token.reshape(1, 1)), step_pos, cache=cache)
