"""Multi-turn multimodal chat with a persistent KV cache, including upstream's image-drawing branch.

    from vargpt_mlx.api import load
    from vargpt_mlx.chat import ChatSession, ImageEvent, chat

    pipe = load("path/to/VARGPT-v1.1")
    session = ChatSession(pipe, temp=0.0, seed=0, out_dir="images")
    for piece in session.send("What is in this picture?", images=["cat.png"]):
        print(piece, end="") if isinstance(piece, str) else print(f"\\n[image: {piece.path}]")
    for piece in session.send("And what colour is it?"):   # only this turn's tokens are prefilled
        ...
    text = chat(pipe, "Hello!")                              # one-shot helper

How a turn is processed
-----------------------
* **Prompt.** The conversation is rendered with the tokenizer's own chat template
  (``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``; the Qwen2-VL
  template adds the default system prompt and renders an image item as
  ``<|vision_start|><|image_pad|><|vision_end|>``). A user turn holds its text *before* its images,
  as upstream's examples do. Only the part of the rendering that is new is tokenized: for the first
  turn the whole prompt, afterwards what the template renders after the previous assistant reply
  (``<|im_end|>\\n<|im_start|>user\\n...<|im_start|>assistant\\n``). Each ``<|image_pad|>`` is
  expanded to ``num_image_tokens(grid)`` copies and the vision tower's features are scattered into
  those slots (``embed_multimodal``).
* **Positions.** The new tokens get the 3-D M-RoPE positions that ``get_rope_index`` gives them
  inside the whole conversation: text continues at (largest position so far) + 1 and an image block
  starts there too. Decode steps use ``cache offset + rope_deltas`` on all three axes, as upstream's
  ``prepare_inputs_for_generation`` does. So a turn on the kept cache computes exactly what a fresh
  prefill of the whole conversation's tokens would (``tests/test_chat.py`` checks every hidden
  state).
* **Decoding.** Logits processors (``(history, logits) -> logits``, history = every token of the
  conversation), then argmax (``temp == 0``) or sampling at ``temp`` with mlx-lm's top-p filter,
  drawn with explicit PRNG keys split from ``seed`` (reproducible, no global random state). A reply
  ends at the config's eos (``<|im_end|>``, not shown), after ``max_tokens`` tokens, or after an
  image. Special tokens are kept in the cache but not shown in the streamed text.
* **What the cache holds between turns.** Every token fed to the model: the prompts, the reply
  tokens as generated (not re-tokenized text). The token chosen last is never fed during its own
  turn (as upstream); the next turn feeds it first if the template does not already start with it
  (after an eos the template's leading ``<|im_end|>`` is that token; after ``max_tokens`` the last
  token is fed, then ``<|im_end|>\\n``). So the cache always holds the conversation exactly as the
  template renders it, the assistant text being the generated tokens.

Image generation inside a chat (upstream ``patching_utils/vargpt_sample.py``, ``_sample``)
-----------------------------------------------------------------------------------------
When the model chooses ``<|image_gen_start|>`` the start token is fed with the cache, the token
after it (t2) is chosen as upstream does and discarded (upstream never embeds it), and
``draw_images`` draws the image from that state: its cross-attention memory is the
final-norm hidden states of *every* token of the conversation so far (the session keeps them for
prefill and decode steps alike), the start token's row last. The reply ends after the image, as
upstream's loop does. The PNG is written atomically to ``out_dir``
(``vargpt-<date>-<time>-seed<seed>.png``). Image seed: ``seed + number of images drawn before in
the session`` when ``seed`` is given, else wall-clock milliseconds (upstream's choice).

Upstream has no next turn after an image (its loop returns ``prompt + <|image_gen_start|> + t2``
and the README drops t2). The image's scale tokens therefore go to a copy of the KV cache (they
are generation scaffolding: cond-branch tokens at plain positions), and the session's cache holds
the context plus ``<|image_gen_start|>``; the next turn feeds ``<|image_gen_end|>`` first,
then the template's continuation. The history is thus
``...<|im_start|>assistant\\n{text}<|image_gen_start|><|image_gen_end|><|im_end|>\\n...``: the image
is marked in the history but its content is not (the training layout puts
``<|image_gen_pad|>`` x N scale embeddings between the two tokens; no such image content is
replayed here). A later image in the same session is drawn the same way. Upstream's limit applies:
image generation needs a context of at most ``text_maxlen`` (512) tokens (the unconditional
memory ``cfg_uncond`` has 512 rows); past that the turn ends after the start token with an
``ImageEvent`` whose ``error`` says so, and the chat continues (``reset`` to draw again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .api import Pipeline, apply_adapters, image_metadata, load
from .image_processor import ImageError, ImageInput
from .models.vargpt import embed_multimodal
from .pipelines.image_generation import GenerationSettings, context_error, draw_images
from .text_generation import decode_position_ids, generate_step, make_sampler

# Stands for the previous assistant reply when rendering the template, to find what follows it.
_SENTINEL = "\u2063VARGPT-MLX-REPLY\u2063"


class ChatError(ValueError):
    """A chat request that cannot be served (empty turn, bad images, template problems)."""


@dataclass
class ImageEvent:
    """An image the model drew during a reply (yielded by ``ChatSession.send``)."""

    path: Path | None  # the PNG written (None when ``error``)
    image: np.ndarray | None  # (H, W, 3) uint8 RGB
    seed: int | None
    error: str | None = None  # why no image was drawn


@dataclass
class TurnStats:
    """What one ``send`` did (``ChatSession.last_turn``)."""

    prompt_tokens: int = 0  # tokens prefilled for this turn (only the new ones)
    tokens: list[int] = field(default_factory=list)  # tokens chosen, the final eos / start token included
    finish: str = ""  # "eos", "length", "image" or "interrupted"
    prompt_s: float = 0.0
    generation_s: float = 0.0
    image_s: float = 0.0
    text: str = ""
    images: list[Path] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s else 0.0


def eos_token_ids(pipeline: Pipeline) -> set[int]:
    """Ids that end a reply: ``config.json``'s eos plus ``generation_config.json``'s (what HF
    ``generate`` stops on upstream), when that file exists."""
    ids = {pipeline.config.tokens.eos_token_id}
    gen_cfg = Path(pipeline.path) / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        ids |= {int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}
    return ids


def save_png(image: np.ndarray, out_dir: str | Path, seed: int, info: dict[str, str] | None = None) -> Path:
    """Write an RGB uint8 image as ``vargpt-<date>-<time>-seed<seed>[-n].png`` with ``info`` as PNG
    text chunks (``api.save_image``: atomic, the umask's file mode)."""
    from PIL import Image

    from .api import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"vargpt-{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"
    path, n = out_dir / f"{stem}.png", 1
    while path.exists():
        path, n = out_dir / f"{stem}-{n}.png", n + 1
    im = Image.fromarray(np.ascontiguousarray(image))
    im.info.update(info or {})
    return save_image(im, path)


class ChatSession:
    """A conversation with one loaded model that keeps the LLM's KV cache between turns.

    Args:
        pipeline: ``vargpt_mlx.api.load(...)``'s result.
        system: system prompt (default: the template's, "You are a helpful assistant.").
        max_tokens: most tokens per reply, at most the model's context.
        temp, top_p: sampling (``temp == 0``: greedy, upstream's default; ``top_p == 1``: off).
        seed: seeds text sampling and drawn images (``None``: wall clock).
        out_dir: where drawn images are written.
        image_settings: image-generation settings (default: upstream's cfg 3, tau 0.5, top-k 900,
            top-p 0.97, the checkpoint's pn); the seed is set per image as the module doc says.
        logits_processors: ``(history, logits) -> logits`` callables applied before sampling.
        on_image_scale: ``(k, n_scales)`` progress callback while an image is drawn.
    """

    def __init__(self, pipeline: Pipeline, system: str | None = None, *, max_tokens: int = 512,
                 temp: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 out_dir: str | Path = ".", image_settings: GenerationSettings | None = None,
                 logits_processors: Sequence[Callable] = (),
                 on_image_scale: Callable[[int, int], None] | None = None):
        context = pipeline.config.llm.max_position_embeddings
        if not 1 <= max_tokens <= context:
            raise ChatError(f"max_tokens must be in 1..{context}, the model's context (got {max_tokens})")
        self.pipeline = pipeline
        self.model = pipeline.model
        self.tokenizer = pipeline.tokenizer
        self.tokens = pipeline.config.tokens
        self.system = system
        self.max_tokens = max_tokens
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.image_settings = image_settings or GenerationSettings()
        self.logits_processors = list(logits_processors)
        self.on_image_scale = on_image_scale
        if temp < 0 or not 0 < top_p <= 1:
            raise ChatError(f"need temp >= 0 and 0 < top_p <= 1 (got temp={temp}, top_p={top_p})")
        key_seed = seed if seed is not None else int(time.time() * 1000)
        self._sampler = make_sampler(temp, top_p, mx.random.key(key_seed))
        self._dtype = self.model.model.norm.weight.dtype  # never quantized
        self._hidden_special = set(getattr(self.tokenizer, "all_special_ids", ()) or ())
        self.eos_ids = eos_token_ids(pipeline)
        self.images_drawn = 0
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the conversation: empty cache, history and hidden states (sampling keys go on)."""
        self.cache = self.model.model.make_cache()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.token_ids: list[int] = []  # every token in the cache, in order
        self.image_grids: list[tuple[int, int, int]] = []  # grids of the images in the cache, in order
        self._hidden: list[mx.array] = []  # (n_i, H) final-norm hidden states of those tokens
        self._next_pos = 0  # largest M-RoPE position in the cache + 1
        self._pending: list[int] = []  # chosen tokens the next turn must feed first
        self.last_turn: TurnStats | None = None
        self._history_images: list = []  # images of a ``start_from`` history, prefilled by the next turn

    def start_from(self, messages: Sequence[dict], images: Sequence[ImageInput] = ()) -> None:
        """Begin from a conversation the caller holds (a stateless client such as an
        OpenAI-compatible server's, which sends the whole history with every request).

        ``messages`` replace the conversation, a system message included if any (``system`` is
        not added): ``role`` / ``content`` dicts as the chat template takes them, a user turn's
        content a list of ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` items, an
        assistant reply its text. ``images``: the images of the ``{"type": "image"}`` items, in
        order. Nothing is computed here: the next ``send`` prefills the whole conversation as the
        template renders it, then its own turn; later turns continue on the cache as usual.
        """
        self.reset()
        self.messages = [dict(m) for m in messages]
        self._history_images = list(images)

    @property
    def hidden(self) -> mx.array:
        """(n, H) final-norm hidden states of every token in the cache."""
        if len(self._hidden) > 1:
            self._hidden = [mx.concatenate(self._hidden, axis=0)]
        return self._hidden[0] if self._hidden else mx.zeros((0, self.model.config.llm.hidden_size))

    @property
    def rope_deltas(self) -> int:
        """Offset decode positions add to the cache offset (``max position + 1 - length``)."""
        return self._next_pos - len(self.token_ids)

    def _forward(self, ids: list[int], embeds: mx.array, positions: mx.array) -> mx.array:
        h = self.model.model(embeds, positions, cache=self.cache)
        self.token_ids.extend(ids)
        self._hidden.append(h[0])
        self._next_pos = int(positions.max().item()) + 1 if positions.size else self._next_pos
        return h

    def _feed_token(self, token_id: int) -> mx.array:
        """Feed one token at ``cache offset + rope_deltas`` (an upstream decode step)."""
        pos = decode_position_ids(len(self.token_ids) + self.rope_deltas)
        h = self._forward([token_id], self.model.model.embed(mx.array([[token_id]])), pos)
        self._pending = []
        return h

    def _sync_cache(self) -> None:
        """Bring every layer's cache back to ``token_ids`` (after an interrupted forward)."""
        for c in self.cache:
            if c.offset > len(self.token_ids):
                c.trim(c.offset - len(self.token_ids))

    # ------------------------------------------------------------------ prompt
    def _render_new(self, user_msg: dict) -> str:
        """Template text of this turn: all of it first, then only what follows the last reply."""
        tpl = self.tokenizer.apply_chat_template
        has_reply = any(m["role"] == "assistant" for m in self.messages)
        if not has_reply or not self.token_ids:  # empty cache: the whole conversation
            return tpl(self.messages + [user_msg], add_generation_prompt=True, tokenize=False)
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        msgs = self.messages[:last] + [{"role": "assistant", "content": _SENTINEL}] + self.messages[last + 1:]
        text = tpl(msgs + [user_msg], add_generation_prompt=True, tokenize=False)
        at = text.rfind(_SENTINEL)
        if at < 0:
            raise ChatError("the chat template does not render assistant replies verbatim")
        return text[at + len(_SENTINEL):]

    def _prepare(self, text: str, images: Sequence[ImageInput]):
        """Token ids, pixel values and grids of this turn (nothing in the session changes)."""
        if not text.strip() and not images:
            raise ChatError("empty message: give text or at least one image")
        content = ([{"type": "text", "text": text}] if text else []) + [{"type": "image"} for _ in images]
        user_msg = {"role": "user", "content": content}
        images = (self._history_images if not self.token_ids else []) + list(images)  # + start_from's
        pixel_values = grids = None
        n_tokens: list[int] = []
        if images:
            pv, grids = self.pipeline.processor(list(images))
            pixel_values = mx.array(pv).astype(self._dtype)
            n_tokens = self.pipeline.processor.num_image_tokens(grids)
        seg = self._render_new(user_msg)
        raw = self.tokenizer.encode(seg, add_special_tokens=False)
        pad = self.tokens.image_token_id
        if raw.count(pad) != len(images):
            raise ChatError(f"the prompt has {raw.count(pad)} image placeholders for {len(images)} images")
        ids: list[int] = list(self._pending)
        counts = iter(n_tokens)
        for t in raw:
            ids.extend([t] * next(counts) if t == pad else [t])
        limit = self.model.config.llm.max_position_embeddings
        if len(self.token_ids) + len(ids) > limit:
            raise ChatError(f"the conversation would be {len(self.token_ids) + len(ids)} tokens; the model's "
                            f"context is {limit} tokens")
        return user_msg, ids, pixel_values, grids

    # ------------------------------------------------------------------ turn
    def send(self, text: str, images: Sequence[ImageInput] = ()) -> Iterator[str | ImageEvent]:
        """Add a user turn (text before images) and stream the reply.

        Yields text pieces (``str``) as the streaming detokenizer releases them, and an
        ``ImageEvent`` when the model draws an image. Input problems raise ``ChatError`` /
        ``ImageError`` here, before anything changes. The turn runs as the iterator is consumed;
        if it is closed early, the reply so far stays in the conversation.
        """
        user_msg, ids, pixel_values, grids = self._prepare(text, list(images))
        return self._turn(user_msg, ids, pixel_values, grids, len(self.messages))

    def _prefill(self, ids: list[int], pixel_values, grids) -> mx.array:
        """Feed this turn's new tokens; on any failure the session is left as it was."""
        saved = (len(self.token_ids), len(self._hidden), self._next_pos, list(self._pending))
        try:
            pos, _ = self.model.rope_index(np.asarray(ids)[None], grids)
            pos = mx.array(pos + self._next_pos).astype(mx.int32)  # continue after the conversation
            embeds = embed_multimodal(self.model, mx.array([ids]), pixel_values, grids)
            self._pending = []
            h = self._forward(ids, embeds, pos)
            mx.eval(h)
            return h
        except BaseException:
            n, n_hidden, self._next_pos, self._pending = saved
            del self.token_ids[n:], self._hidden[n_hidden:]
            self._sync_cache()
            raise

    def _turn(self, user_msg, ids, pixel_values, grids, n_messages: int) -> Iterator[str | ImageEvent]:
        if len(self.messages) != n_messages:
            raise ChatError("the conversation changed since send() was called; consume each reply first")
        stats = self.last_turn = TurnStats(prompt_tokens=len(ids), finish="interrupted")
        t0 = time.perf_counter()
        h = self._prefill(ids, pixel_values, grids)
        self._history_images = []
        stats.prompt_s = time.perf_counter() - t0
        self.messages.append(user_msg)
        if grids is not None:
            self.image_grids += [tuple(int(x) for x in g) for g in np.asarray(grids)]
        detok = self.tokenizer.detokenizer
        t0 = time.perf_counter()
        try:
            yield from self._reply(h, stats, detok, t0)
            detok.finalize()
            piece = detok.last_segment
            if piece:
                yield piece
        finally:
            self._end_turn(stats, detok, t0)

    def _reply(self, h: mx.array, stats: TurnStats, detok, t0: float) -> Iterator[str | ImageEvent]:
        """Decode the reply with ``generate_step``, streaming its text as the detokenizer releases it."""
        steps = generate_step(h, self._feed_token, self.model.lm_head, sampler=self._sampler,
                              logits_processors=self.logits_processors, history=self.token_ids)
        for _ in range(self.max_tokens):
            token_id, _ = next(steps)  # feeds the previous token first
            stats.tokens.append(token_id)
            if token_id in self.eos_ids:
                stats.finish = "eos"  # not fed: the template's continuation starts with <|im_end|>
                return
            if token_id == self.tokens.image_gen_start_token_id:
                stats.finish, stats.generation_s = "image", time.perf_counter() - t0
                yield from self._draw_image(stats, steps)
                return
            self._pending = [token_id]  # chosen, not yet fed
            if token_id not in self._hidden_special:
                detok.add_token(token_id)
                piece = detok.last_segment
                if piece:
                    yield piece
        stats.finish = "length"  # upstream stops without feeding the last token; the next turn does

    def _end_turn(self, stats: TurnStats, detok, t0: float) -> None:
        """However the turn ended, the conversation keeps the reply so far and the cache matches it."""
        tok = self.tokens
        if stats.finish != "image":
            stats.generation_s = time.perf_counter() - t0
        self._sync_cache()
        detok.finalize()
        ended = stats.finish in ("eos", "image")  # the last token ends the reply, it is not text
        content = self.tokenizer.decode(stats.tokens[:-1] if ended else stats.tokens)
        if stats.finish == "image":
            content += "".join(self.tokenizer.convert_ids_to_tokens(
                [tok.image_gen_start_token_id, tok.image_gen_end_token_id]))
        self.messages.append({"role": "assistant", "content": content})
        stats.text = detok.text

    def _draw_image(self, stats: TurnStats, steps: Iterator[tuple[int, mx.array]]) -> Iterator[ImageEvent]:
        """Upstream's branch: feed the start token, choose (and drop) t2, draw."""
        tok = self.tokens
        t0 = time.perf_counter()
        next(steps)  # feeds the start token; t2 is chosen as upstream does, never embedded
        self._pending = [tok.image_gen_end_token_id]
        if (msg := context_error(self.model, len(self.token_ids) - 1, "conversation")) is not None:
            yield ImageEvent(None, None, None, error=f"{msg}; reset to draw")
            return
        seed = (self.seed + self.images_drawn) if self.seed is not None else int(time.time() * 1000) % 2**63
        settings = replace(self.image_settings, seed=seed)
        (result,) = draw_images(self.model, self.cache, self.hidden, settings, on_scale=self.on_image_scale)
        self.images_drawn += 1
        prompt = " ".join(c["text"] for c in self.messages[-1]["content"] if c["type"] == "text")
        path = save_png(result.image, self.out_dir, seed,
                        image_metadata(self.pipeline, "chat", prompt, self.image_settings, seed))
        stats.image_s = time.perf_counter() - t0
        stats.images.append(path)
        yield ImageEvent(path, result.image, seed)


def chat(pipeline_or_path: Pipeline | str | Path, prompt: str, images: Sequence[ImageInput] = (), *,
         tokenizer: str | Path | None = None, adapter_path: str | Path | None = None,
         **opts) -> str:
    """One-shot chat: the reply text to ``prompt`` (with ``images``).

    ``pipeline_or_path``: a loaded ``Pipeline`` or a model directory / repo id (loaded with
    ``tokenizer`` if given). ``adapter_path``: LoRA adapters applied to the model (in place).
    Other keyword arguments go to ``ChatSession`` (``system``, ``max_tokens``, ``temp``,
    ``top_p``, ``seed``, ``out_dir``, ...). Images the model draws are written to ``out_dir``.
    """
    if isinstance(pipeline_or_path, Pipeline):
        pipe = pipeline_or_path
        if adapter_path is not None:
            apply_adapters(pipe.model, adapter_path)
    else:
        pipe = load(pipeline_or_path, tokenizer=tokenizer, adapter_path=adapter_path)
    session = ChatSession(pipe, **opts)
    return "".join(p for p in session.send(prompt, images) if isinstance(p, str))


__all__ = ["ChatError", "ChatSession", "ImageEvent", "TurnStats", "chat", "save_png", "ImageError"]
